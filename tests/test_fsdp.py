"""FSDP2 with meta init: only shards are allocated, and values do not depend on the world size (G7)."""

import pytest
import torch
from conftest import on_fake_ranks
from dist_workers import fsdp_build_and_setup, fsdp_load_raw, fsdp_training, seed_snippet, tiny_llama
from test_distributed import deadline, deadline_guard  # noqa: F401  (the hang guard, also for fixtures)
from test_exact import eager

import torchinit
from torchinit.models.llama import Block
from torchinit.strategies import fsdp


@pytest.fixture(scope="module")
def world():
    """Full parameters after FSDP setup for world sizes 1 and 2 (real gloo processes)."""
    with deadline_guard():
        return {n: torchinit.Fabric(accelerator="cpu", strategy="fsdp", devices=n, precision="bf16-true", seed=0)
                .launch(fsdp_training, True) for n in (1, 2)}


def test_values_do_not_depend_on_the_world_size_and_are_eager(world):
    one, two = world[1], world[2]
    reference = eager(tiny_llama, torch.bfloat16).state_dict()
    assert one["full"].keys() == two["full"].keys()
    for name, value in one["full"].items():
        assert torch.equal(value, two["full"][name]), name
        assert torch.equal(value, reference[name]), f"{name}: the recorded init replayed, as eager computes it"
    assert one["dtype"] == {torch.bfloat16}
    assert all(torch.isfinite(v).all() for v in one["full"].values())


def test_each_rank_holds_a_distinct_slice_and_ties_survive(world):
    two = world[2]
    shapes = two["local_shapes"]
    for name, full in two["full"].items():
        rows = [shapes[r][name][0] for r in range(2)]
        assert sum(rows) == full.shape[0] and rows[0] == (full.shape[0] + 1) // 2, name
    assert two["tied"] and "lm_head.weight" not in two["full"], "the tied head is the embedding, one group"
    assert torch.equal(two["inv_freq"], eager(tiny_llama, torch.bfloat16).rope.inv_freq)
    assert two["moved"], "a training step through an optimizer made before setup"


def test_four_ranks_with_the_fake_process_group(world):
    """World size 4 in one process: each fake rank's shard, stacked, is world size 1's parameter."""
    shards = on_fake_ranks(4, lambda fabric: fsdp_build_and_setup(fabric, False)[2], precision="bf16-true",
                           seed=0)  # empty_init=False: recorded as well
    for name, full in world[1]["full"].items():
        stacked = torch.cat([s[name] for s in shards])
        assert torch.equal(stacked, full), name
        assert sum(s[name].numel() > 0 for s in shards) == min(4, full.shape[0]), "distinct, non-empty slices"


def test_the_seeds_snippet_under_fsdp():
    """The seed's code under FSDP (empty init, setup, one step) is eager's model and eager's first loss."""
    fabric = torchinit.Fabric(accelerator="cpu", precision="bf16-true", strategy="fsdp", devices=2, seed=0)
    result = fabric.launch(seed_snippet)
    want = eager(tiny_llama, torch.bfloat16)
    params = dict(want.named_parameters())  # the tied head is the embedding: one entry, as under FSDP
    assert result["full"].keys() == params.keys()
    for name, value in result["full"].items():
        assert torch.equal(value, params[name]), f"{name}: setup replayed the record, as eager computes it"
    with torch.no_grad():
        loss = want(torch.tensor([[1, 2, 3]])).float().pow(2).mean().item()
    # FSDP2 all-gathers the full parameters before each forward: every rank runs eager's computation on eager's
    # values, so the loss is eager's bit for bit (and the mean of two equal floats is that float)
    assert result["losses"] == [loss, loss] and result["mean"] == loss


def test_fsdp_options():
    assert torchinit.Fabric(accelerator="cpu", strategy="fsdp").plan.options == torchinit.FSDPStrategy()
    custom = torchinit.FSDPStrategy(wrap={torch.nn.Linear}, reshard_after_forward=False)
    assert torchinit.Fabric(accelerator="cpu", strategy=custom, devices=2).plan.options is custom


def test_wrap_policies_and_ties():
    model = tiny_llama()
    blocks = list(model.layers)
    assert fsdp.units(model, None) == blocks, "default: the blocks of every ModuleList"
    assert fsdp.units(model, {Block}) == blocks
    assert fsdp.units(model, lambda m: m is model.norm) == [model.norm]
    with pytest.warns(UserWarning, match=r"Not sharding 'embed' \(weight\).*tied"):
        units = fsdp.units(model, {torch.nn.Embedding, torch.nn.Linear})
    assert model.embed not in units and model.lm_head not in units and model.layers[0].attn.q_proj in units
    with pytest.raises(TypeError, match="module classes"):
        fsdp.units(model, {"Block"})


def test_cpu_offload_needs_a_gpu():
    plan = torchinit.Fabric(accelerator="cpu", strategy="fsdp").plan
    with pytest.raises(ValueError, match="cpu_offload=True"):
        fsdp._shard_kwargs(plan, torchinit.FSDPStrategy(cpu_offload=True))


def test_load_into_shards_reads_only_each_ranks_rows(tmp_path):
    from safetensors.torch import save_file

    want = eager(tiny_llama, torch.bfloat16)
    state = {k: v.contiguous() for k, v in want.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    save_file(state, tmp_path / "model.safetensors")
    fabric = torchinit.Fabric(accelerator="cpu", strategy="fsdp", devices=2, precision="bf16-true", seed=1)
    result = fabric.launch(fsdp_load_raw, tmp_path / "model.safetensors")
    for name, value in result["full"].items():
        assert torch.equal(value, dict(want.named_parameters())[name]), name
    total = sum(v.numel() * v.element_size() for v in state.values())
    assert sum(result["bytes"]) == total and max(result["bytes"]) < 0.6 * total, "each rank read about half"
    # measured: what each rank's read calls really returned from the file, each byte once
    assert result["read"] == [(n, n) for n in result["bytes"]], "each rank read its rows, once"
    assert not result["missing"]
