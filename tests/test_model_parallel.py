"""ModelParallelStrategy (tensor parallel x FSDP2 on a 2-D mesh): eager's values on every mesh shape (G3, G7),
training, checkpoints across meshes, errors. Real gloo processes (1x2, 2x1 in one 2-process launch; 2x2, 1x4,
4x1 in one 4-process launch) and the fake process group for 2x4 and 4x2."""

import pytest
import torch
from conftest import on_fake_ranks
from mp_workers import (
    IDS,
    SEED,
    build,
    four_ranks,
    hf_llama,
    hf_mixtral,
    llama_cfg,
    parallelize_llama,
    two_ranks,
)
from test_distributed import deadline, deadline_guard  # noqa: F401  (the hang guard, also for fixtures)

import torchinit
from torchinit.core.placement import local_box
from torchinit.models.llama import Llama

MAKERS = {"llama": lambda: Llama(llama_cfg(True)), "llama_untied": lambda: Llama(llama_cfg(False)),
          "hf": lambda: hf_llama(True), "hf_untied": lambda: hf_llama(False), "mixtral": hf_mixtral}


def eager(kind: str, dtype: torch.dtype):
    torch.manual_seed(SEED)
    return MAKERS[kind]().to(dtype)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """4 processes: 2x2 through the Fabric, saved there, loaded into 1x4 / 4x1; safetensors into 2x2 shards."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("mp")
    save_file({k: v.contiguous() for k, v in eager("llama_untied", torch.float32).state_dict().items()},
              folder / "raw.safetensors")
    strategy = torchinit.ModelParallelStrategy(parallelize_llama, data_parallel_size=2, tensor_parallel_size=2)
    with deadline_guard(300):
        out = torchinit.Fabric(accelerator="cpu", devices=4, strategy=strategy).launch(
            four_ranks, folder / "ckpt", folder / "raw.safetensors")
    return out, folder


@pytest.fixture(scope="module")
def two(four):
    """2 processes (bf16): 1x2 and 2x1 for five models, record_init=False, training, errors; the 4-rank folder."""
    strategy = torchinit.ModelParallelStrategy(parallelize_llama)
    with deadline_guard(300):
        return torchinit.Fabric(accelerator="cpu", devices=2, strategy=strategy, precision="bf16-true").launch(
            two_ranks, four[1] / "ckpt")


def _cases(out: dict, dtype: torch.dtype):
    for key, got in out.items():
        kind, _, mesh = key.partition("/")
        if kind in MAKERS:
            yield key, got, eager(kind, dtype)


def test_gathered_values_ties_and_buffers_are_eager_on_every_mesh(two, four):
    cases = [*_cases(two, torch.bfloat16), *_cases(four[0], torch.float32)]
    assert {k for k, _, _ in cases} >= {f"{m}/{s}" for m in MAKERS for s in ("1x2", "2x1")} | {"llama/2x2", "hf/2x2"}
    for key, got, want in cases:
        wrong = [n for n, p in want.named_parameters() if not torch.equal(got["full"][n], p)]
        wrong += [n for n, b in want.named_buffers() if not torch.equal(got["buffers"][n], b)]
        assert not wrong, f"{key}: differ from eager: {wrong}"
        assert got["ties"] == sorted(sorted(g) for g in torchinit.tie_groups(want)), key


def test_each_rank_holds_only_its_part(two, four):
    """Per-rank bytes are the local shards; the parts tile every tensor evenly; TP shards rows and columns."""
    for key, got, want in [*_cases(two, torch.bfloat16), *_cases(four[0], torch.float32)]:
        size = next(want.parameters()).element_size()
        for rank, (shapes, boxes) in enumerate(zip(got["local"], got["boxes"], strict=True)):
            assert got["bytes"][rank] == sum(torch.Size(s).numel() for s in shapes.values()) * size, key
            for name in got["full"]:
                assert tuple(n for _, n in boxes[name]) == shapes[name], (key, name)
        for name, full in got["full"].items():
            cover = torch.zeros(full.shape, dtype=torch.int32)
            for boxes in got["boxes"]:
                cover[tuple(slice(o, o + n) for o, n in boxes[name])] += 1
            assert cover.min() == cover.max() >= 1, (key, name)
    placements = four[0]["llama/2x2"]["placements"]
    assert placements["layers.0.attn.q_proj.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
    assert placements["layers.0.attn.o_proj.weight"] == "(Shard(dim=0), Shard(dim=1))", "rowwise: column blocks"
    assert placements["layers.0.attn_norm.weight"] == "(Shard(dim=0),)", "not TP-sharded: FSDP alone"
    assert two["hf/1x2"]["placements"]["model.layers.0.mlp.down_proj.weight"].endswith("Shard(dim=1))")
    assert four[0]["mesh"] == (("data_parallel", "tensor_parallel"), (2, 2))


def test_record_init_false_gives_a_single_process_materialize(two):
    """Each module's own init on full tensors, the same stream on every rank: as materialize in one process."""
    with torchinit.InitContext("cpu", torch.bfloat16, meta=True):
        want = Llama(llama_cfg(True))
    torch.manual_seed(SEED)
    torchinit.materialize(want)
    for mesh in ("1x2", "2x1"):
        got = two[f"no_record/{mesh}"]
        for name, p in want.named_parameters():
            assert torch.equal(got["full"][name], p), (mesh, name)
        assert got["ties"] == [["embed.weight", "lm_head.weight"]]


def test_a_layer_the_record_does_not_cover_gets_its_init_and_the_rest_replays(two):
    got, want = two["swapped/1x2"], eager("llama_untied", torch.bfloat16)
    swapped = "layers.1.mlp.down_proj.weight"
    for name, p in want.named_parameters():
        if name != swapped:
            assert torch.equal(got["full"][name], p), name
    assert torch.isfinite(got["full"][swapped]).all() and not torch.equal(got["full"][swapped], dict(
        want.named_parameters())[swapped])


def test_training_matches_one_device_and_the_loss_falls(two, four):
    for key, kind in (("train/1x2", "llama"), ("train/2x1", "llama"), ("train_hf/1x2", "hf_untied"),
                      ("train_hf/2x1", "hf_untied"), ("train/2x2", "llama")):
        got = (four[0] if key.endswith("2x2") else two)[key]
        logits = eager(kind, torch.float32)(IDS)
        logits = getattr(logits, "logits", logits)
        torch.testing.assert_close(got["first"], logits.detach(), rtol=1e-4, atol=1e-5, msg=key)
        losses = got["losses"]
        assert losses[-1] < losses[0] - 0.3 and all(map(torch.isfinite, torch.tensor(losses))), (key, losses)
        if "late" in got:
            assert torch.isfinite(torch.tensor(got["late"])).all(), "an optimizer made after setup steps"


def test_bf16_mixed_runs_in_bf16_on_fp32_shards(two):
    got = two["mixed/1x2"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = eager("hf_untied", torch.float32)(IDS).logits
    logits = got["logits"]  # computed in bf16, returned in the default dtype (Lightning's output rule)
    assert logits.dtype == torch.float32 and torch.equal(logits, logits.bfloat16().float())
    assert got["dtypes"] == ["torch.float32"]
    torch.testing.assert_close(got["logits"].float(), want.float(), atol=1e-2, rtol=1e-2)


def test_errors_name_what_to_change(two):
    errors = two["errors"]
    assert errors["returns_none"].startswith("ArgumentTypeError: parallelize_fn must return") and "return model" in \
        errors["returns_none"]
    assert errors["heads"].startswith("ConfigurationError: tensor_parallel_size=2 does not divide") and \
        "'layers.0.attn' (Attention: num_heads=3, num_kv_heads=3)" in errors["heads"]
    assert "config.num_key_value_heads=3" in errors["hf_heads"] and "Nothing was changed" in errors["hf_heads"]
    assert "has none. Pass parallelize_fn=fn" in errors["no_plan"] and "Llama" in errors["no_plan"]
    assert "split tied parameters (embed.weight = lm_head.weight)" in errors["split_tie"]


def test_plan_errors_and_sizes():
    mp = torchinit.ModelParallelStrategy
    assert torchinit.Fabric(accelerator="cpu", devices=4, strategy=mp()).plan.options.tensor_parallel_size == 4
    sizes = torchinit.Fabric(accelerator="cpu", devices=4, strategy=mp(tensor_parallel_size=2)).plan.options
    assert (sizes.data_parallel_size, sizes.tensor_parallel_size) == (2, 2)
    with pytest.raises(ValueError, match=r"must multiply to 4\. Change one of them"):
        torchinit.Fabric(accelerator="cpu", devices=4, strategy=mp(data_parallel_size=3))
    with pytest.raises(ValueError, match="must multiply to 4"):
        torchinit.Fabric(accelerator="cpu", devices=4, strategy=mp(data_parallel_size=2, tensor_parallel_size=4))
    with pytest.raises(ValueError, match="positive number or 'auto'"):
        mp(tensor_parallel_size=0).resolved(4, 1)
    for precision in ("16-mixed", 16):
        with pytest.raises(ValueError, match="does not support precision.*bf16-mixed"):
            torchinit.Fabric(accelerator="cpu", devices=2, strategy=mp(), precision=precision)
    with pytest.raises(RuntimeError, match="belongs to ModelParallelStrategy"):
        _ = torchinit.Fabric(accelerator="cpu", devices=2, strategy="fsdp").device_mesh


def test_checkpoints_load_into_other_meshes_and_world_sizes(two, four):
    out = four[0]
    for key, got in (("1x4", out["loaded/1x4"]), ("4x1", out["loaded/4x1"]), ("1x2 of 2 ranks", two["reload"])):
        wrong = [n for n, v in out["saved"].items() if not torch.equal(got["full"][n], v.to(got["full"][n].dtype))]
        assert not wrong, f"{key}: {wrong}"
        assert got["step"] == 4, key
    assert out["loaded/1x4"]["after"] == out["loaded/4x1"]["after"], "the optimizer state came back the same"
    assert two["reload"]["moments"] and set(two["reload"]["moments"]) == {3}, "AdamW's step, exp_avg, exp_avg_sq"


def test_safetensors_into_tensor_parallel_shards_reads_each_ranks_part(four):
    raw = four[0]["raw"]
    want = eager("llama_untied", torch.float32)
    for name, p in want.named_parameters():
        assert torch.equal(raw["full"][name], p), name
    assert raw["read"] == raw["local"], "each rank read exactly the bytes of its own part"
    # measured: what each rank's read calls really returned from the file, each byte once
    assert raw["preadv"] == [(n, n) for n in raw["local"]], "each rank read its own part, once"
    total = sum(p.numel() * p.element_size() for p in want.parameters())
    assert max(raw["read"]) < 0.3 * total and not raw["missing"]


@pytest.mark.parametrize("dp, tp", [(2, 4), (4, 2)])
def test_meshes_no_machine_here_has_on_fake_ranks(dp, tp):
    """8 ranks in one process (collectives do nothing): each rank's part, put where its box says, is eager."""
    strategy = torchinit.ModelParallelStrategy(parallelize_llama, data_parallel_size=dp, tensor_parallel_size=tp)

    def one_rank(fabric):
        model = fabric.setup(build(fabric, lambda: Llama(llama_cfg(True))))
        return {n: (p.to_local().clone(), local_box(p)) for n, p in model.named_parameters()}

    parts = on_fake_ranks(dp * tp, one_rank, strategy=strategy, precision="bf16-true")
    want = dict(eager("llama", torch.bfloat16).named_parameters())
    for name, full in want.items():
        got = torch.full_like(full, float("nan"))
        for rank in parts:
            local, box = rank[name]
            got[tuple(slice(o, o + n) for o, n in box)] = local
        assert torch.equal(got, full), name
