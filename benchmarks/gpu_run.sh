#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one call (bfloat16, SDPA; tables into BENCHMARKS.md's CUDA sections and
# benchmarks/results/*_cuda*; logs into $LOGS, default benchmarks/results/gpu_logs):
#
#   bash benchmarks/gpu_run.sh            # on the GPU machine
#   bash benchmarks/gpu_run.sh --smoke    # every command below on the CPU, tiny shapes, nothing written to the repo
#
# Steps, most important first (an estimate for one H100, about 11 minutes in all: the eager steps from the steps'
# times in runs A and B of BENCHMARKS.md (~25 s per N_v at batch 1, 0.5B); the compiled steps assume ~30 s of
# torch.compile per model and budget (prefill and decode graphs each in prefill_compiled), not measured on a GPU yet):
#   tests            tests/test_gpu.py (dense equivalence in fp32/bf16, cached vs uncached, batch vs single)  ~35 s
#   compiled_decode  0.5B: a decode step compiled whole with each model's static cache, mode="reduce-overhead"
#                    (CUDA graphs), dense vs VISOR 0/2/4/8: kernels a step and ms a step (count_ops.py --compile) ~160 s
#   prefill_compiled 0.5B batch 1, N_v 2916: both models' forward compiled, torch.compile(dynamic=True), dense vs
#                    VISOR 0/2/4/8; prefill and decode (dynamic cache) through the compiled forward, compile time
#                    apart (bench_prefill.py --compile)                                                         ~200 s
#   mixed            0.5B: a batch of budgets 0 0 0 0 2 2 4 8 against dense on the same 8, throughput next to the sum
#                    of the samples run alone (bench_prefill.py --mixed-budgets)                                ~40 s
#   prefill_batch8   0.5B batch 8, N_v 2916                                                                      ~35 s
#   prefill_batch32  0.5B batch 32, N_v 1485                                                                     ~40 s
#   prefill          0.5B batch 1, N_v 2916 7290                                                                 ~50 s
#   prefill_7b       Qwen2-7B shapes, batch 1, N_v 7290 (the compute-bound case)                                 ~50 s
#   compiled_decode_7b  Qwen2-7B: compiled decode, dense vs VISOR 0                                              ~75 s
# Prefill is eager in every step but prefill_compiled.
#
# Each step runs even if an earlier one failed; the exit status is the number of failed steps. Where the tree's git
# metadata is not the code's (a copy sent to a GPU machine), set VISOR_CODE_VERSION=<commit> for the tables' "Code:".
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
if [ "$SMOKE" = 1 ]; then
    # the same Python paths on the CPU: --smoke shapes, tiny sizes, temporary output folders, no BENCHMARKS.md
    LOGS=${LOGS:-$(mktemp -d -t visor_gpu_run_smoke_XXXX)}
    RUN=(--device cpu --smoke); MD=()
    size() { echo 32; }   # any N_v list becomes one small size
else
    LOGS=${LOGS:-benchmarks/results/gpu_logs}
    RUN=(--device cuda --dtype bfloat16 --attn sdpa); MD=(--benchmarks-md BENCHMARKS.md)
    size() { echo "$@"; }
fi
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

if [ "$SMOKE" = 0 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOGS/gpu.txt"
fi
$PY -c "import torch, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$LOGS/gpu.txt"

step tests $PY -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py
if [ "$SMOKE" = 1 ]; then  # count_ops's default sizes and steps (the graphs of `count_ops.py --smoke --compile`); no CUDA graphs
    step compiled_decode $PY benchmarks/count_ops.py "${RUN[@]}" --compile --budgets 0 8
else
    step compiled_decode $PY benchmarks/count_ops.py "${RUN[@]}" --compile --compile-mode reduce-overhead \
        --vision-tokens 2916 --text-tokens 64 --budgets 0 2 4 8 --decode-steps 32 --repeats 3
fi
if [ "$SMOKE" = 1 ]; then  # two budgets: on a small CPU each model and budget takes minutes of Inductor's C++ compiles
    step prefill_compiled $PY benchmarks/bench_prefill.py "${RUN[@]}" --compile --vision-tokens $(size 2916) \
        --budgets 0 8 --repeats 3 --warmup 1 --new-tokens 16
else
    step prefill_compiled $PY benchmarks/bench_prefill.py "${RUN[@]}" --compile --vision-tokens $(size 2916) \
        --budgets 0 2 4 8 --repeats 3 --warmup 1 --new-tokens 16 "${MD[@]}"
fi
step mixed $PY benchmarks/bench_prefill.py "${RUN[@]}" --mixed-budgets 0 0 0 0 2 2 4 8 --vision-tokens $(size 2916) \
    --repeats 3 --warmup 1 --new-tokens 16 "${MD[@]}"
step prefill_batch8 $PY benchmarks/bench_prefill.py "${RUN[@]}" --batch-size 8 --vision-tokens $(size 2916) \
    --budgets 0 2 4 8 --repeats 3 --warmup 1 --new-tokens 16 "${MD[@]}"
step prefill_batch32 $PY benchmarks/bench_prefill.py "${RUN[@]}" --batch-size 32 --vision-tokens $(size 1485) \
    --budgets 0 2 4 8 --repeats 3 --warmup 1 --new-tokens 8 "${MD[@]}"
step prefill $PY benchmarks/bench_prefill.py "${RUN[@]}" --vision-tokens $(size 2916 7290) \
    --budgets 0 2 4 8 --repeats 3 --warmup 1 --new-tokens 16 "${MD[@]}"
step prefill_7b $PY benchmarks/bench_prefill.py "${RUN[@]}" --language-model qwen2-7b --vision-tokens $(size 7290) \
    --budgets 0 2 4 8 --repeats 3 --warmup 1 --new-tokens 16 "${MD[@]}"
if [ "$SMOKE" = 1 ]; then
    step compiled_decode_7b $PY benchmarks/count_ops.py "${RUN[@]}" --language-model qwen2-7b --compile --budgets 0
else
    step compiled_decode_7b $PY benchmarks/count_ops.py "${RUN[@]}" --language-model qwen2-7b --compile \
        --compile-mode reduce-overhead --vision-tokens 7290 --text-tokens 64 --budgets 0 --decode-steps 16 --repeats 3
fi
echo "=== logs in $LOGS; failed steps: $failed"
exit "$failed"
