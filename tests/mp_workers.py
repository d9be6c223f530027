"""Model-parallel workers that `Fabric.launch(fn)` runs in spawned processes (module level, so that they pickle).

One launch covers several mesh shapes: the mesh is the strategy's (`model_parallel.device_mesh`) for a plan with
other sizes, so a 2-process launch runs 1x2 and 2x1 and a 4-process one 2x2, 1x4 and 4x1.
"""

import dataclasses

import torch
import torch.distributed as dist
from dist_workers import bytes_read_from
from torch import nn
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

import torchinit
from torchinit.core.placement import local_box
from torchinit.models.llama import Llama, LlamaConfig, parallelize
from torchinit.strategies import model_parallel
from torchinit.strategies.base import remap_optimizer

SEED = 3


def llama_cfg(tie: bool = True) -> LlamaConfig:
    """Heads divide by 1, 2 and 4; an odd MLP width (uneven shards on 2-D meshes); tied or not."""
    return LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=44, num_layers=2, num_heads=8,
                       num_kv_heads=4, max_seq_len=16, tie_embeddings=tie)


def hf_llama(tie: bool = True):
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(HFConfig(vocab_size=64, hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie))


def hf_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4))


parallelize_llama = parallelize  # the bundled Llama's parallelize_fn, hand-written as a Lightning user writes one


def returns_none(model, mesh):
    parallelize_llama(model, mesh)


def split_tie(model, mesh):
    parallelize_module(model, mesh["tensor_parallel"], {"lm_head": ColwiseParallel(output_layouts=Replicate())})
    return model


def gathered(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def setup_on(fabric, module: nn.Module, dp: int, tp: int, fn=parallelize_llama, dtype=None):
    """`fabric.setup(module)` on a (dp, tp) mesh of this launch's processes (in `dtype`, else the fabric's)."""
    options = dataclasses.replace(fabric.plan.options, parallelize_fn=fn, data_parallel_size=dp,
                                  tensor_parallel_size=tp)
    plan = dataclasses.replace(fabric.plan, options=options, param_dtype=dtype or fabric.plan.param_dtype)
    strategy = model_parallel.ModelParallel(plan, model_parallel.device_mesh(plan))
    wrapped = strategy.setup_module(module)
    return wrapped, strategy.sharded


def describe(model: nn.Module) -> dict:
    """Full values (gathered), ties, buffers, and this rank's local shards: shapes, boxes and bytes."""
    full, local, boxes = {}, {}, {}
    nbytes = 0
    for name, p in model.named_parameters():
        full[name] = p.full_tensor().detach().clone() if hasattr(p, "full_tensor") else p.detach().clone()
        mine = p.to_local() if hasattr(p, "to_local") else p
        local[name] = tuple(mine.shape)
        boxes[name] = local_box(p) if hasattr(p, "placements") else None
        nbytes += mine.numel() * mine.element_size()
    ties = sorted(sorted(g) for g in torchinit.tie_groups(model))
    return {"full": full, "buffers": {n: b.detach().clone() for n, b in model.named_buffers()}, "ties": ties,
            "local": gathered(local), "boxes": gathered(boxes), "bytes": gathered(nbytes),
            "placements": {n: str(p.placements) for n, p in model.named_parameters() if hasattr(p, "placements")}}


def build(fabric, make, empty_init=False, dtype=None):
    """`make()` under `fabric.init_module()` (a record), seeded; `dtype`: a record in that dtype instead."""
    torch.manual_seed(SEED)
    context = torchinit.RecordContext("cpu", dtype) if dtype else fabric.init_module(empty_init=empty_init)
    with torchinit.nan_poison(), context:
        return make()


IDS = (torch.arange(32).reshape(2, 16) * 7) % 64


def train_steps(model: nn.Module, optimizer, steps: int = 4) -> dict:
    """The first forward's logits and the loss of each step (next-token cross-entropy on fixed ids)."""
    losses, first = [], None
    for _ in range(steps):
        logits = model(IDS)
        logits = getattr(logits, "logits", logits)
        first = logits.detach().clone() if first is None else first
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), IDS[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {"first": first, "losses": losses}


def training(fabric, dp: int, tp: int, make, fn) -> dict:
    """fp32; one optimizer made before setup (from the meta placeholders, remapped), one after."""
    model = build(fabric, make, dtype=torch.float32)
    early = torch.optim.AdamW(model.parameters(), lr=1e-2)
    wrapped, mapping = setup_on(fabric, model, dp, tp, fn, dtype=torch.float32)
    remap_optimizer(early, mapping)
    out = train_steps(wrapped, early)
    late = torch.optim.SGD(wrapped.parameters(), lr=1e-2)
    out["late"] = train_steps(wrapped, late, steps=1)["losses"]
    return out


def full_values(model: nn.Module) -> dict:
    return {n: p.full_tensor().detach().clone() if hasattr(p, "full_tensor") else p.detach().clone()
            for n, p in model.named_parameters()}


def local_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (getattr(p, "to_local", lambda p=p: p)()
                                                      for p in model.parameters()))


def two_ranks(fabric, folder) -> dict:
    """1x2 and 2x1: torchinit Llama (hand-written fn, tied and untied), HF Llama (its plan, tied and untied),
    Mixtral; then the errors."""
    out = {}
    for dp, tp in ((1, 2), (2, 1)):
        for key, make, fn in (("llama", lambda: Llama(llama_cfg(True)), parallelize_llama),
                              ("llama_untied", lambda: Llama(llama_cfg(False)), parallelize_llama),
                              ("hf", lambda: hf_llama(True), None), ("hf_untied", lambda: hf_llama(False), None),
                              ("mixtral", hf_mixtral, None)):
            model, _ = setup_on(fabric, build(fabric, make, empty_init=key == "hf_untied"), dp, tp, fn)
            out[f"{key}/{dp}x{tp}"] = describe(model.module)
    out["mixed/1x2"] = mixed(fabric)
    out["swapped/1x2"] = swapped_layer(fabric)
    for dp, tp in ((1, 2), (2, 1)):
        out[f"no_record/{dp}x{tp}"] = without_record(fabric, dp, tp)
        out[f"train/{dp}x{tp}"] = training(fabric, dp, tp, lambda: Llama(llama_cfg(True)), parallelize_llama)
        out[f"train_hf/{dp}x{tp}"] = training(fabric, dp, tp, lambda: hf_llama(False), None)
    out["errors"] = errors(fabric)
    out["reload"] = reload(fabric, folder)
    return out


def swapped_layer(fabric) -> dict:
    """A recorded model with one layer swapped in on meta (no record for it): the rest replays, that one gets its
    own init."""
    module = build(fabric, lambda: Llama(llama_cfg(False)))
    with torchinit.InitContext("cpu", fabric.plan.param_dtype, meta=True):
        module.layers[1].mlp.down_proj = nn.Linear(44, 64, bias=False)
    wrapped, _ = setup_on(fabric, module, 1, 2)
    return describe(wrapped.module)


def mixed(fabric) -> dict:
    """bf16-mixed: fp32 shards, bf16 autocast forward (and FSDP's bf16 compute policy from the HF plan)."""
    module = build(fabric, lambda: hf_llama(False), dtype=torch.float32)
    options = dataclasses.replace(fabric.plan.options, parallelize_fn=None, data_parallel_size=1,
                                  tensor_parallel_size=2)
    plan = dataclasses.replace(fabric.plan, options=options, precision="bf16-mixed", param_dtype=torch.float32,
                               autocast_dtype=torch.bfloat16)
    wrapped = model_parallel.ModelParallel(plan, model_parallel.device_mesh(plan)).setup_module(module)
    logits = wrapped(IDS).logits
    logits.float().mean().backward()
    return {"logits": logits.detach(), "dtypes": sorted({str(p.dtype) for p in wrapped.parameters()})}


def without_record(fabric, dp: int, tp: int) -> dict:
    """record_init=False: built on meta, each module's own init in setup (seeded just before)."""
    with torchinit.InitContext("cpu", fabric.plan.param_dtype, meta=True):
        module = Llama(llama_cfg(True))
    options = dataclasses.replace(fabric.plan.options, parallelize_fn=parallelize_llama, data_parallel_size=dp,
                                  tensor_parallel_size=tp, record_init=False)
    plan = dataclasses.replace(fabric.plan, options=options)
    torch.manual_seed(SEED)
    wrapped = model_parallel.ModelParallel(plan, model_parallel.device_mesh(plan)).setup_module(module)
    return describe(wrapped.module)


def reload(fabric, folder) -> dict:
    """A DCP folder saved by 4 ranks (fp32) on a 2x2 mesh, into a 1x2 mesh of 2 ranks (this fabric's bf16)."""
    model, _ = setup_on(fabric, build(fabric, lambda: Llama(llama_cfg(True)), empty_init=True), 1, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = {"model": model, "optimizer": optimizer, "step": 0}
    fabric.load(folder, state)
    return {"full": full_values(model.module), "step": state["step"],
            "moments": sorted(len(s) for s in optimizer.state.values())}


def four_ranks(fabric, folder, raw) -> dict:
    """2x2 through the Fabric itself (fp32): values, per-rank bytes, training with the optimizer passed to setup;
    save there, load into 1x4 and 4x1; a safetensors file read straight into 2x2 shards."""
    out = {}
    model = build(fabric, lambda: Llama(llama_cfg(True)))
    early = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = fabric.setup(model, early)
    out["mesh"] = (fabric.device_mesh.mesh_dim_names, tuple(fabric.device_mesh.shape))
    out["llama/2x2"] = describe(model.module)
    hf, _ = setup_on(fabric, build(fabric, lambda: hf_llama(True)), 2, 2, None)
    out["hf/2x2"] = describe(hf.module)
    out["train/2x2"] = train_steps(model, optimizer)
    fabric.save(folder, {"model": model, "optimizer": optimizer, "step": 4})
    out["saved"] = full_values(model.module)
    for dp, tp in ((1, 4), (4, 1)):
        other, _ = setup_on(fabric, build(fabric, lambda: Llama(llama_cfg(True)), empty_init=True), dp, tp)
        opt = torch.optim.AdamW(other.parameters(), lr=1e-2)
        state = {"model": other, "optimizer": opt, "step": 0}
        fabric.load(folder, state)
        out[f"loaded/{dp}x{tp}"] = {"full": full_values(other.module), "step": state["step"],
                                    "after": train_steps(other, opt, steps=1)["losses"]}
    target, _ = setup_on(fabric, build(fabric, lambda: Llama(llama_cfg(False)), empty_init=True), 2, 2)
    with bytes_read_from(raw) as read:
        report = fabric.load_raw(raw, target)
    out["raw"] = {"full": full_values(target.module), "read": gathered(report.bytes),
                  "preadv": gathered((read.total, read.distinct)),
                  "local": gathered(local_bytes(target.module)), "missing": report.missing}
    return out


def _error(call) -> str:
    try:
        call()
    except Exception as exc:  # the test checks type and message
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def errors(fabric) -> dict:
    heads = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=44, num_layers=1, num_heads=3,
                        num_kv_heads=3, max_seq_len=16)
    hf_heads = lambda: hf_llama_heads(3)  # noqa: E731
    return {
        "returns_none": _error(lambda: setup_on(fabric, build(fabric, lambda: Llama(llama_cfg())), 1, 2,
                                                returns_none)),
        "heads": _error(lambda: setup_on(fabric, build(fabric, lambda: Llama(heads)), 1, 2)),
        "hf_heads": _error(lambda: setup_on(fabric, build(fabric, hf_heads), 1, 2, None)),
        "no_plan": _error(lambda: setup_on(fabric, build(fabric, lambda: Llama(llama_cfg())), 1, 2, None)),
        "split_tie": _error(lambda: setup_on(fabric, build(fabric, lambda: Llama(llama_cfg())), 1, 2, split_tie)),
    }


def hf_llama_heads(kv: int):
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(HFConfig(vocab_size=64, hidden_size=48, intermediate_size=44, num_hidden_layers=1,
                                     num_attention_heads=6, num_key_value_heads=kv))
