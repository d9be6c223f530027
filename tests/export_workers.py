"""Workers for test_export.py: a transformers model, sharded, exported as a safetensors folder by every rank."""

import os
from pathlib import Path

import torch
from dist_workers import _errors, _joined, gathered

from torchinit.checkpoint.export import save_safetensors_folder


def hf_llama(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        tie_word_embeddings=tie))


def _full(fabric, module) -> dict:
    if fabric.plan.strategy == "deepspeed":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return {n: t.detach().clone() for n, t in module.state_dict().items()}
    return {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
            for n, t in module.state_dict().items()}


def _bytes_written(fn) -> int:
    """Run `fn`, counting the bytes this process writes with os.pwrite."""
    written, pwrite = [0], os.pwrite

    def counted(fd, data, offset):
        done = pwrite(fd, data, offset)
        written[0] += done
        return done
    os.pwrite = counted
    try:
        fn()
    finally:
        os.pwrite = pwrite
    return written[0]


def export(fabric, folder):
    """FSDP2 (this launch) and ZeRO-3 (a joined Fabric): the model exported with `fabric.save(format=...)` (one
    shard) and with small shards; a failing rank leaves nothing behind."""
    folder = Path(folder)
    out = {}
    for name, other in (("fsdp", fabric), ("zero3", _joined(fabric, strategy="deepspeed_stage_3"))):
        torch.manual_seed(3)
        with other.init_module():
            module = hf_llama(tie=name == "zero3")
        model = other.setup(module)
        other.save(folder / f"{name}-one", {"model": model}, format="safetensors")
        written = _bytes_written(lambda: save_safetensors_folder(folder / f"{name}-many", {"model": model},  # noqa: B023
                                                                 max_shard_size=40_000))
        out[name] = _full(other, module)
        out[f"{name} bytes"] = gathered(fabric, written)
    out["errors"] = _errors({
        "two things": lambda: fabric.save(folder / "bad", {"model": model, "step": 1}, format="safetensors"),
        "format": lambda: fabric.save(folder / "bad", {"model": model}, format="onnx"),
    })
    original = os.pwrite
    if fabric.global_rank == 1:
        def broken(*args):
            raise OSError(28, "No space left on device (test)")
        os.pwrite = broken
    out["errors"].update(_errors({"rank 1 fails": lambda: fabric.save(folder / "failed", {"model": model},
                                                                      format="safetensors")}))
    os.pwrite = original
    fabric.barrier()
    out["leftovers"] = sorted(p.name for p in folder.iterdir())
    return out
