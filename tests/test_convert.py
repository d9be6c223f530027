"""Any saved state into any strategy, with real processes (gloo; DeepSpeed on CPU): a one-file save, a safetensors
file, an FSDP DCP folder and DeepSpeed ZeRO 1/2/3 folders, each loaded into one device / DDP, FSDP2 and ZeRO 1/2/3
(saved at world size 1 into 1 and 2, saved at 2 into 2) — weights, optimizer state, DeepSpeed's fp32 master copies
and plain values compared bitwise with what was saved. Two launches do all of it (see convert_workers.py).
"""

import importlib.util
import shutil

import pytest
import torch
from convert_workers import STRATEGIES, first_launch, second_launch
from dist_workers import tiny_llama
from test_distributed import deadline, deadline_guard  # noqa: F401  (the hang guard, also for fixtures)

import torchinit

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
SOURCES = ["plain.pt", "weights.safetensors", "fsdp", "zero1", "zero2", "zero3"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("convert")
    results = {}

    def launch(world, fn):
        fabric = torchinit.Fabric(accelerator="cpu", strategy="deepspeed_stage_3", devices=world, seed=0)
        return fabric.launch(fn, str(folder))

    with deadline_guard(600):
        for world, fn in ((1, first_launch), (2, second_launch)):
            results.update(launch(world, fn))
    errors = results.pop(("errors", None))
    return {"pairs": results, "errors": errors, "folder": folder}


@pytest.mark.parametrize("target", list(STRATEGIES))
def test_every_source_loads_exactly_into(converted, target):
    pairs = converted["pairs"]
    for saved_world, world in ((1, 1), (1, 2), (2, 2)):
        for source in SOURCES:
            key = (f"w{saved_world}-{source}", f"w{world}-{target}")
            assert key in pairs, f"{key} was not run"
            assert pairs[key] == [], f"{key[0]} into {key[1]}: differs in {pairs[key][:5]}"


@pytest.mark.parametrize("target", ["zero2", "fsdp"])
def test_bf16_parameters_get_the_saved_fp32_masters(converted, target):
    key = ("bf16-zero3", f"w2-{target}-bf16")
    assert converted["pairs"][key] == [], f"differs in {converted['pairs'][key][:5]}"


def test_load_raw_of_an_fp32_file_gives_deepspeed_its_fp32_masters(converted):
    key = ("masters.safetensors", "w2-zero2-bf16-load_raw")
    assert converted["pairs"][key] == [], f"differs in {converted['pairs'][key][:5]}"


def test_what_cannot_be_carried_is_an_error_that_changes_nothing(converted):
    zero2, plain = converted["errors"]["zero2"], converted["errors"]["plain"]
    for errors in (zero2, plain):
        assert "w1-weights.safetensors: holds no optimizer state for 'optimizer' (a safetensors checkpoint holds " \
               "a model's tensors only)" in errors["safetensors optimizer"]
        assert errors["untouched"]
    assert "uneven-step.pt: the saved 'step' differs between parameters ([1.0, 7.0])" in zero2["uneven step"]
    assert "cannot be carried into DeepSpeed. Nothing was loaded." in zero2["uneven step"]
    assert "w1-zero3: the saved optimizer state does not fit this optimizer: saved 1 param group(s) of [47] " \
           "parameters" in plain["groups"]


def test_a_deepspeed_folder_is_a_checkpoint_for_any_model(converted, tmp_path):
    """load_checkpoint reads a ZeRO folder of any stage and world size into a plain (here meta) model; a folder
    with a rank's partition file missing is an error naming it."""
    refs = torch.load(converted["folder"] / "refs-w2.pt", weights_only=True)
    for stage in (1, 2, 3):
        with torchinit.InitContext("cpu", torch.float32, meta=True):
            model = tiny_llama()
        report = torchinit.load_checkpoint(model, converted["folder"] / f"w2-zero{stage}")
        assert not report.missing and not report.unexpected
        assert all(torch.equal(p, refs[f"w2-zero{stage}"]["weights"][n]) for n, p in model.named_parameters())
    broken = tmp_path / "broken"
    shutil.copytree(converted["folder"] / "w2-zero2", broken)
    (broken / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(torchinit.CheckpointError, match="the optimizer partition files are missing or incomplete"):
        torchinit.load_checkpoint(tiny_llama(), broken)


def test_damaged_deepspeed_folders_are_errors_naming_what_is_wrong(converted, tmp_path):
    def damaged(name, change):
        folder = tmp_path / name
        shutil.copytree(converted["folder"] / "w1-zero2", folder)
        change(folder)
        return folder

    cases = {
        "'latest' names 'gone', which is not a folder in it": lambda f: (f / "latest").write_text("gone"),
        r"model states file\(s\) missing: mp_rank_00_model_states.pt":
            lambda f: (f / "state" / "mp_rank_00_model_states.pt").unlink(),
        "hold neither ZeRO 1/2 nor ZeRO-3 fp32 partitions": lambda f: torch.save(
            {"optimizer_state_dict": {"zero_stage": 1}}, f / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    }
    for index, (message, change) in enumerate(cases.items()):
        folder = damaged(f"case{index}", change)
        model = tiny_llama()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(torchinit.CheckpointError, match=message):
            torchinit.Fabric(accelerator="cpu").load(folder, {"model": model})
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_an_optimizer_entry_that_is_not_an_optimizer_state_is_an_error(tmp_path):
    fabric = torchinit.Fabric(accelerator="cpu")
    model = torch.nn.Linear(2, 2)
    fabric.save(tmp_path / "state.pt", {"model": model, "optimizer": {"lr": 0.1}})
    with pytest.raises(torchinit.CheckpointError, match="state.pt: the optimizer entry is not a torch optimizer"):
        fabric.load(tmp_path / "state.pt", {"model": model, "optimizer": torch.optim.SGD(model.parameters(), 0.1)})
