#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go (about 12 minutes on one H100, estimated from runs of its steps): the GPU tests, then the prefill/decode
# benchmark (Qwen2-0.5B at batch 1 and 8, then Qwen2-7B shapes) and the token-reduction benchmark in bfloat16 with SDPA. Tables go into BENCHMARKS.md's CUDA sections and
# benchmarks/results/*_cuda.*; logs into $LOGS (default benchmarks/results/gpu_logs).
#
#   bash benchmarks/gpu_run.sh
#
# Each step runs even if an earlier one failed; the exit status is the number of failed steps. Where the tree's git
# metadata is not the code's (a copy sent to a GPU machine), set VISOR_CODE_VERSION=<commit> for the tables' "Code:".
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOGS=${LOGS:-benchmarks/results/gpu_logs}
PY=${PYTHON:-python3}
mkdir -p "$LOGS"
failed=0
step() {  # step NAME COMMAND...: run, log to $LOGS/NAME.log, count failures
    local name=$1; shift
    echo "=== $name: $*"
    local start=$SECONDS
    "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOGS/gpu.txt"
$PY -c "import torch, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$LOGS/gpu.txt"

step tests $PY -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py tests/test_dense_equivalence.py tests/test_generation.py
step smoke $PY benchmarks/bench_prefill.py --device cuda --smoke  # writes into a temporary folder
step prefill $PY benchmarks/bench_prefill.py --device cuda --dtype bfloat16 --attn sdpa \
    --vision-tokens 729 1485 2916 7290 --repeats 5 --warmup 2 --benchmarks-md BENCHMARKS.md
step prefill_batch8 $PY benchmarks/bench_prefill.py --device cuda --dtype bfloat16 --attn sdpa --batch-size 8 \
    --vision-tokens 1485 2916 --repeats 3 --warmup 1 --new-tokens 16 --benchmarks-md BENCHMARKS.md
step prefill_7b $PY benchmarks/bench_prefill.py --device cuda --dtype bfloat16 --attn sdpa --language-model qwen2-7b \
    --vision-tokens 2916 7290 --repeats 3 --warmup 1 --new-tokens 16 --benchmarks-md BENCHMARKS.md
step token_reduction $PY benchmarks/bench_prefill.py --device cuda --dtype bfloat16 --attn sdpa \
    --token-reduction visionzip vispruner pack --keep-ratio 0.25 --repeats 3 --warmup 1 --benchmarks-md BENCHMARKS.md
echo "=== failed steps: $failed"
exit "$failed"
