"""Lightning Fabric's loop helpers with 2 real processes (gloo on CPU): collectives, data splitting, gradient
accumulation, clipping (DDP and FSDP2), loggers on rank 0 and the launched Fabric being the caller's."""

import csv

import pytest
import torch
from fabric_workers import Noted, ddp_surface, deepspeed_clipping
from test_distributed import deadline_guard

import torchinit


@pytest.fixture(autouse=True)
def deadline():
    with deadline_guard():
        yield


def test_two_processes_run_lightnings_loop_helpers(tmp_path, monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    fabric = Noted(accelerator="cpu", devices=2, loggers=torchinit.CSVLogger(tmp_path, name="logs", version=0))
    fabric.note = "set by the caller"
    torch.manual_seed(5)
    out = fabric.launch(ddp_surface, str(tmp_path), scale=3)
    assert out["rand"] == torch.rand(1).item(), "the ranks start from the launcher's random state"
    assert out["class"] == ("Noted", "set by the caller", 3)
    assert out["mean"] == (True, 1.5) and out["int_mean"] == (torch.int64, 2)  # in place; integers truncated
    assert out["sum"] == (3, 1.0) and out["max"] == 1.0
    assert out["gather"] == ([[0, 0], [1, 10]], [0, 1])
    assert out["gather_grad"] == 2.0, "sync_grads: rank 0's x is used once (weight 1) by each of the 2 ranks"
    assert out["broadcast"] == "from 1" and out["first"] == "rank 0 was first"
    epochs = out["epochs"]
    assert out["sampler"] == "DistributedSampler" and len(epochs[0]) == 4 and epochs[0] != epochs[1]
    assert out["ordered"] == [[0, 2, 4, 6]] and out["kept"] == "SequentialSampler"
    unsynced, synced = out["unsynced"], out["synced"]
    assert unsynced[0] != unsynced[1], "no_backward_sync: each rank keeps its own gradients"
    assert synced[0] == synced[1], "the next backward averages the accumulated gradients"
    same, norms, after = out["norm"]
    assert same and norms[0] == norms[1] and after == pytest.approx(0.01, rel=1e-4)
    assert out["generate"] == (["through DDP"], True)
    fsdp = out["fsdp"]
    assert fsdp["unsynced"] == [True] * 4, "FSDP2: inside no_backward_sync no gradient is reduced"
    assert fsdp["norm"][0] == pytest.approx(fsdp["norm"][1], rel=1e-6) and fsdp["clipped"]
    assert fsdp["value"] <= 1e-4
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        assert list(csv.DictReader(f)) == [{"rank": "0", "step": "0"}], "only rank 0 logs"


def test_deepspeed_clips_by_norm_in_its_next_step():
    fabric = torchinit.Fabric(accelerator="cpu", strategy="deepspeed_stage_2", devices=1)
    out = fabric.launch(deepspeed_clipping)
    assert out["same"] and out["clipped"], "the step clipped as DeepSpeed's gradient_clipping does"
    ours, configured = out["after_step"]
    assert ours == configured != 1e-3, "one step only: then the engine's own clipping again"
    assert "clips gradients by norm only" in out["by_value"]
