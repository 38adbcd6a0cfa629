"""The language model's layers run through their own forward, so what hooks a module sees VISOR's layers as it sees
LLaVA-OneVision's: accelerate's CPU/disk offload, FSDP wrapping `Qwen2DecoderLayer`, gradient checkpointing.
Offload and FSDP fail with the earlier design, which called the layers' projections directly."""

import copy
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from visor_hf import VisorForConditionalGeneration
from visor_hf.testing import IMAGE_TOKEN_ID, tiny_inputs, tiny_llava_onevision

from .conftest import IMAGE_SIZES, PROMPT_LENGTHS, perturb_new_parameters


def test_offload_to_cpu_and_disk_gives_the_same_logits_and_tokens(visor, batch, tmp_path):
    """device_map="auto" with a max_memory that leaves most layers to disk (as dense LLaVA-OV supports)."""
    visor.save_pretrained(tmp_path / "model")
    size = sum(p.numel() * p.element_size() for p in visor.parameters())
    offloaded = VisorForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": int(0.4 * size)}, offload_folder=tmp_path / "offload"
    ).eval()
    assert "disk" in set(offloaded.hf_device_map.values())
    for budget in (0, 1, "full"):
        with torch.no_grad():
            expected, got = visor(**batch, budget=budget).logits, offloaded(**batch, budget=budget).logits
        assert torch.equal(got, expected), budget
    generate = dict(budget=[0, "full"], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(offloaded.generate(**batch, **generate), visor.generate(**batch, **generate))


def test_gradient_checkpointing_recomputes_the_layers_and_keeps_the_gradients(llava, batch):
    grads, mlp_calls = [], []
    for checkpointing in (False, True):
        model = VisorForConditionalGeneration.from_llava_onevision(llava, cross_attn_layers=[1], self_attn_layers=[1, 4])
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        calls = []
        # a pre-hook: recomputation stops early, once the last tensor backward needs is back (inside the MLP)
        model.model.language_model.layers[4].mlp.register_forward_pre_hook(lambda *args: calls.append(1))
        labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, -100)
        model(**batch, labels=labels, budget=1).loss.backward()
        grads.append(model.model.language_model.layers[4].mlp.down_proj.weight.grad.clone())
        mlp_calls.append(len(calls))
    assert mlp_calls == [1, 2]  # checkpointing runs the layer again in backward
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=0)


def _fsdp_worker(rank: int, world_size: int, init_file: str, results) -> None:
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        llava = tiny_llava_onevision()
        batch = tiny_inputs(llava, IMAGE_SIZES, PROMPT_LENGTHS)
        labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, -100)
        model = perturb_new_parameters(
            VisorForConditionalGeneration.from_llava_onevision(llava, cross_attn_layers=[1, 3, 5], self_attn_layers=[1, 4])
        ).train()
        reference = copy.deepcopy(model)
        for layer in model.model.language_model.layers:  # what an FSDP auto-wrap policy on Qwen2DecoderLayer does
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
        losses = []
        for budget in (1, "full", 0):
            for m, opt in ((model, optimizer), (reference, reference_optimizer)):
                opt.zero_grad()
                loss = m(**batch, labels=labels, budget=budget).loss
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        weight = model.model.language_model.layers[4].mlp.down_proj.weight.full_tensor()
        results[rank] = (losses, float((weight - reference.model.language_model.layers[4].mlp.down_proj.weight).abs().max()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_wrapping_each_decoder_layer_trains_like_the_unwrapped_model():
    """FSDP2 (`fully_shard`) on every Qwen2DecoderLayer and the root, two CPU processes over gloo: three training steps
    at different budgets give the losses and weights of the same model trained unwrapped."""
    with tempfile.NamedTemporaryFile() as init_file, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_fsdp_worker, args=(2, init_file.name + ".rdzv", results), nprocs=2)
        results = dict(results)
    for losses, weight_error in results.values():
        sharded, unwrapped = losses[0::2], losses[1::2]
        assert sharded == pytest.approx(unwrapped, abs=1e-5)
        assert weight_error <= 1e-5
