"""Sharded checkpoints with real processes (2 gloo ranks): FSDP as torch.distributed.checkpoint folders, DeepSpeed
through its engine. One launch per strategy does all the work; the tests read its results."""

import importlib.util

import pytest
import torch
from dist_workers import fsdp_checkpoint, fsdp_reload, tiny_llama
from ds_workers import deepspeed_checkpoint
from test_distributed import deadline, deadline_guard  # noqa: F401  (the hang guard, also for fixtures)

import torchinit


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    wrong = [k for k in want if not torch.equal(got[k], want[k])]
    assert not wrong, f"differ: {wrong}"


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    with deadline_guard():
        fabric = torchinit.Fabric(accelerator="cpu", strategy="fsdp", devices=2, precision="bf16-true", seed=0)
        return fabric.launch(fsdp_checkpoint, str(folder)) | {"folder": folder}


def test_fsdp_round_trip_restores_model_optimizer_and_values(fsdp):
    assert_same(fsdp["loaded"], fsdp["saved"])
    assert_same(fsdp["loaded_moments"], fsdp["moments"])
    assert any(v.abs().sum() > 0 for v in fsdp["moments"].values()), "a real optimizer state was compared"
    assert fsdp["values"] == (1, {"lr": 1e-2}) and fsdp["extra"] == {}


def test_fsdp_training_after_load_continues_exactly(fsdp):
    assert_same(fsdp["again"], fsdp["continued"])
    assert any(not torch.equal(fsdp["continued"][k], v) for k, v in fsdp["saved"].items()), "the step moved"


def test_fsdp_folder_is_a_checkpoint_for_any_model(fsdp):
    """The DCP folder loads into a plain single-process model (and into FSDP shards with load_raw, each rank
    reading its half)."""
    path = fsdp["folder"] / "ckpt"
    with torchinit.InitContext("cpu", torch.bfloat16, meta=True):
        model = tiny_llama()
    report = torchinit.load_checkpoint(model, path)
    assert not report.missing and not report.unexpected
    assert_same(dict(model.named_parameters()), fsdp["saved"])
    assert_same(fsdp["raw"], fsdp["saved"])
    total = sum(v.numel() * v.element_size() for v in fsdp["saved"].values())
    assert sum(fsdp["raw_bytes"]) == total and max(fsdp["raw_bytes"]) < total, "the report: each rank its shards"
    # measured: what each rank's reads through DCP's file objects returned from the data files (.metadata, which
    # every rank reads whole, aside). Each rank's half of the model is 0.5 * total; each saved chunk adds its
    # torch.save framing (about 1.3 KB a chunk, 0.53 * total in all, measured); a rank reading every chunk reads
    # about 1.06 * total. The optimizer's moments, in the same files, are not read at all.
    data = [sum(n for name, n in read.items() if name != ".metadata") for read in fsdp["raw_read"]]
    assert all(0.5 * total <= n < 0.6 * total for n in data), f"each rank read its shards only: {data} of {total}"


def test_fsdp_folder_loads_into_another_world_size(fsdp):
    fabric = torchinit.Fabric(accelerator="cpu", strategy="fsdp", devices=1, precision="bf16-true", seed=0)
    result = fabric.launch(fsdp_reload, str(fsdp["folder"] / "ckpt"))
    assert_same(result["loaded"], fsdp["saved"])
    assert_same(result["moments"], fsdp["moments"])
    assert result["step"] == 1 and result["extra"] == {"info": {"lr": 1e-2}}, "what the state lacks comes back"


def test_fsdp_save_is_atomic(fsdp):
    for failures in fsdp["failures"]:  # every rank raises, none hangs
        assert "rank 1: OSError: disk full (test)" in failures["over"]
        assert "rank 1: OSError: disk full (test)" in failures["new"]
    rank0, rank1 = fsdp["failures"]
    assert rank0["value"] == "RuntimeError: cannot pickle this"
    assert "failed on rank 0 (RuntimeError: cannot pickle this); nothing was written there" in rank1["value"]
    assert fsdp["intact"], "the earlier checkpoint is byte for byte as it was"
    assert fsdp["leftovers"] == ["ckpt"], "no new folder, no temporary left behind"
    assert_same(fsdp["replaced"], fsdp["continued"])  # a later save replaced the folder
    assert fsdp["after_replace"] == ["ckpt", "plain", "twice"], "the old folder was deleted"


def test_fsdp_load_errors_name_the_problem_and_change_nothing(fsdp):
    errors = fsdp["errors"]
    assert "KeyError" in errors["absent"] and "has no ['epoch']" in errors["absent"]
    assert "Missing: bias, weight. Unexpected: embed.weight" in errors["keys"]
    assert "saved optimizer state 'optimizer' does not fit this optimizer" in errors["optimizer"]
    assert "plain: cannot tell which checkpoint to load (found nothing loadable)" in errors["folder"]
    assert errors["no state"].startswith("ConfigurationError: fabric.load under strategy='fsdp'")
    assert errors["untouched"], "a failed load leaves the model as it was"
    assert_same(fsdp["strict_false"], fsdp["saved"])


deepspeed_only = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")


@pytest.fixture(scope="module")
def zero(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zero")
    with deadline_guard():
        fabric = torchinit.Fabric(accelerator="cpu", strategy="deepspeed_stage_3", devices=2, precision="bf16-true",
                                  seed=0)
        return fabric.launch(deepspeed_checkpoint, str(folder))


@deepspeed_only
@pytest.mark.parametrize("stage", ["zero3", "zero2"])
def test_deepspeed_round_trip_through_the_engine(zero, stage):
    result = zero[stage]
    assert_same(result["loaded"], result["saved"])
    assert_same(result["again"], result["continued"])
    assert result["step"] == 1 and result["extra"] == {}
    assert "latest" in result["files"] and "values.pt" in result["files"]
    assert sum("optim_states" in name for name in result["files"]) == 2, "one partition file per rank"


@deepspeed_only
def test_zero3_load_raw_reads_each_ranks_partition_into_place(zero):
    raw = zero["raw"]
    assert_same(raw["raw"], {k: v.detach() for k, v in raw["want"].items()})
    assert_same(raw["after_step"], raw["raw"])  # a step with lr=0 keeps them: the fp32 master weights followed
    assert sum(raw["bytes"]) == raw["file_bytes"] and max(raw["bytes"]) < raw["file_bytes"], "no rank read it all"
    # measured: the bytes each rank's read calls really returned from the file. Only its own partition's
    # (distinct bytes); read twice: the bf16 partition, then the fp32 master copies straight from the file
    # (checkpoint/restore.py `_load_masters`), which `report.bytes` does not count
    assert [distinct for _, distinct in raw["read"]] == raw["bytes"], "each rank read its own partition only"
    assert all(total <= 2 * distinct for total, distinct in raw["read"]), "at most twice: partition, then masters"


@deepspeed_only
def test_deepspeed_errors(zero):
    errors = zero["errors"]
    assert "partial.safetensors: does not match the model (strict=True). Missing: norm.weight" in errors["partial"]
    assert "plain: cannot tell which checkpoint to load (found nothing loadable)" in errors["folder"]
    assert "the state can hold the model set up and its optimizer only" in errors["dcp"]
    assert "has no ['epoch']" in errors["absent"]
    assert "engine, which does not exist yet" in errors["no engine"]
    assert "zero3: does not match the model (strict=True). Missing: body.0.bias" in errors["keys"]
    assert "Unexpected: embed.weight" in errors["keys"]
    assert errors["untouched"]
