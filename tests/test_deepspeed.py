"""DeepSpeed ZeRO with real processes on CPU (DS_ACCELERATOR=cpu, gloo)."""

import importlib.util

import pytest
import torch
from dist_workers import tiny_llama
from ds_workers import (
    PostInit,
    deepspeed_budget,
    deepspeed_errors,
    deepspeed_replaced_layer,
    deepspeed_tied_llama,
    deepspeed_training,
)
from test_distributed import deadline  # noqa: F401  (the hang guard)
from test_exact import eager

import torchinit

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")


@pytest.mark.parametrize("record", [True, False], ids=["recorded", "zero.Init"])
@pytest.mark.parametrize("joint", [True, False], ids=["setup(model, opt)", "setup(model); setup_optimizers(opt)"])
def test_zero3_keeps_init_written_after_module_init(joint, record):
    fabric = torchinit.Fabric(accelerator="cpu", strategy=torchinit.DeepSpeedStrategy(stage=3, record_init=record),
                              devices=2, precision="bf16-true", seed=0)
    result = fabric.launch(deepspeed_training, False, joint)
    assert result["partitioned"], "every parameter is partitioned as soon as its module is built"
    start = result["start"]
    assert torch.equal(start["body.0.weight"], torch.full((16, 8), 0.5)), "nn.init after __init__ was lost"
    assert torch.equal(start["body.2.bias"], torch.full((4,), 3.0)), ".data write after __init__ was lost"
    assert not torch.equal(result["after"]["body.0.weight"], start["body.0.weight"]), "the step changed nothing"
    assert result["same"][0] == result["same"][1]


def test_zero3_empty_init_replays_the_record_independent_of_world_size():
    """By default ZeRO-3 records, also with empty init: setup replays the eager values into the partitions."""
    results = [torchinit.Fabric(accelerator="cpu", strategy="deepspeed_stage_3", devices=n, precision="bf16-true",
                                seed=0).launch(deepspeed_training, True, True) for n in (1, 2)]
    torch.manual_seed(0)
    reference = {n: p.detach().to(torch.bfloat16).float() for n, p in PostInit().named_parameters()}
    for name, value in reference.items():
        assert torch.equal(results[0]["start"][name], value), name
        assert torch.equal(results[1]["start"][name], value), name


def test_zero3_without_record_empty_init_skips_work_and_setup_initializes_independent_of_world_size():
    strategy = torchinit.DeepSpeedStrategy(stage=3, record_init=False)
    results = [torchinit.Fabric(accelerator="cpu", strategy=strategy, devices=n, precision="bf16-true",
                                seed=0).launch(deepspeed_training, True, True) for n in (1, 2)]
    start = results[1]["start"]
    for name, value in results[0]["start"].items():  # each rank keeps its slice of the same full init (G7)
        assert torch.equal(start[name], value), name
    assert not torch.equal(start["body.0.weight"], torch.full((16, 8), 0.5)), "empty init must skip the write"
    assert all(torch.isfinite(v).all() for v in start.values())
    assert start["body.0.weight"].std() > 0, "initialized by Linear.reset_parameters in setup"


def test_zero3_layer_replaced_after_recording_gets_its_own_init():
    fabric = torchinit.Fabric(accelerator="cpu", strategy="deepspeed_stage_3", devices=2, seed=0)
    values = fabric.launch(deepspeed_replaced_layer)
    torch.manual_seed(0)
    reference = torch.nn.Linear(4, 4)
    assert torch.equal(values["0.weight"], reference.weight) and torch.equal(values["0.bias"], reference.bias)
    for name in ("1.weight", "1.bias"):  # Linear.reset_parameters: finite (NaN-poisoned memory), within 1/sqrt(4)
        assert torch.isfinite(values[name]).all() and values[name].abs().max() <= 0.5 and values[name].std() > 0


def test_zero3_tied_llama_trains():
    fabric = torchinit.Fabric(accelerator="cpu", strategy="deepspeed_stage_3", devices=2, precision="bf16-true", seed=0)
    result = fabric.launch(deepspeed_tied_llama)
    assert result["tied"]
    want = eager(tiny_llama, torch.bfloat16)
    params = dict(want.named_parameters())  # the tied head is the embedding: one entry
    assert result["full"].keys() == params.keys()
    for name, value in result["full"].items():
        assert torch.equal(value, params[name]), f"{name}: setup replayed the record into the partitions, as eager"
    with torch.no_grad():
        loss = want(torch.tensor([[1, 2, 3]])).float().pow(2).mean().item()
    # ZeRO-3 gathers each module's full parameters before its forward: every rank runs eager's computation on
    # eager's values, so the first loss is eager's bit for bit
    assert result["losses"] == [loss, loss]


@pytest.mark.parametrize("strategy", ["deepspeed", "deepspeed_stage_1"])
def test_zero_1_and_2(strategy):
    fabric = torchinit.Fabric(accelerator="cpu", strategy=strategy, devices=2, precision="bf16-mixed", seed=0)
    result = fabric.launch(deepspeed_training, False, False)
    assert result["partitioned"] is None and torch.isfinite(torch.tensor(result["loss"]))
    assert torch.equal(result["start"]["body.0.weight"], torch.full((16, 8), 0.5))
    assert result["same"][0] == result["same"][1]


def test_deepspeed_error_paths():
    fabric = torchinit.Fabric(accelerator="cpu", strategy="deepspeed_stage_3", devices=2, seed=0)
    errors = fabric.launch(deepspeed_errors)
    assert "call fabric.setup(model) before setup_optimizers" in errors["optimizer first"]
    assert "partitioned parameter through a view" in errors["view write"]
    assert "'<root>' (NoInitParam)" in errors["no init"] and "no reset_parameters" in errors["no init"]
    assert "engine was already created" in errors["engine twice"]
    assert "step(closure) is not supported" in errors["closure"]


def test_deepspeed_config_follows_the_precision():
    from torchinit.strategies import deepspeed as ds

    with pytest.warns(UserWarning, match="bf16-mixed"):
        fabric = torchinit.Fabric(accelerator="cpu", strategy=torchinit.DeepSpeedStrategy(
            stage=3, config={"zero_optimization": {"overlap_comm": False}, "gradient_clipping": 1.0}),
            precision="16-mixed")
    cfg = ds.config(fabric.plan, fabric.plan.options)
    assert cfg["zero_optimization"] == {"stage": 3, "overlap_comm": False} and cfg["gradient_clipping"] == 1.0
    assert cfg["bf16"] == {"enabled": True}, "16-mixed on CPU became bf16-mixed"
    with pytest.raises(ValueError, match="float64"):
        ds.param_dtype(torchinit.Fabric(accelerator="cpu", strategy="deepspeed", precision="64-true").plan)
    with pytest.raises(ValueError, match="stages are 1, 2 and 3"):
        torchinit.DeepSpeedStrategy(stage=4)


def test_zero3_budgets_what_a_rank_receives():
    """The ZeRO-3 pre-flight counts each rank's partitions (not the model's size) and refuses up front."""
    fabric = torchinit.Fabric(accelerator="cpu", strategy="deepspeed_stage_3", devices=2, precision="bf16-true")
    result = fabric.launch(deepspeed_budget)
    assert result["planned"] == result["received"] > 0
    assert "needs" in result["refused"] and "nothing was allocated" in result["refused"], result
    assert result["grew"] < 256 * 2**20
    import psutil

    assert result["huge"] > psutil.virtual_memory().total
