import pytest
import torch

import torchinit
from torchinit.plan import PRECISIONS


@pytest.mark.parametrize(
    "given, canonical",
    [("64-true", "64-true"), (64, "64-true"), ("64", "64-true"), ("32-true", "32-true"), (32, "32-true"),
     ("32", "32-true"), ("16-true", "16-true"), ("bf16-true", "bf16-true"), ("bf16-mixed", "bf16-mixed"),
     ("bf16", "bf16-mixed")],
)
def test_precision_strings_and_aliases(given, canonical):
    fabric = torchinit.Fabric(accelerator="cpu", precision=given)
    assert fabric.plan.precision == canonical
    assert fabric.plan.param_dtype == PRECISIONS[canonical][0]


@pytest.mark.parametrize("given", ["16-mixed", "16", 16])
def test_fp16_mixed_on_cpu_warns_and_uses_bf16_mixed(given):
    with pytest.warns(UserWarning, match="bf16-mixed"):
        fabric = torchinit.Fabric(accelerator="cpu", precision=given)
    assert fabric.plan.precision == "bf16-mixed"
    assert fabric.plan.autocast_dtype == torch.bfloat16 and fabric.plan.param_dtype == torch.float32


@pytest.mark.parametrize("bad", ["fp8", "bf16-true ", 8, "mixed"])  # None: the default (Lightning)
def test_invalid_precision_lists_allowed_values(bad):
    with pytest.raises(ValueError, match="bf16-true.*") as info:
        torchinit.Fabric(accelerator="cpu", precision=bad)
    for allowed in PRECISIONS:
        assert allowed in str(info.value)


def test_invalid_accelerator():
    with pytest.raises(ValueError, match="accelerator='tpu'.*cpu, cuda"):
        torchinit.Fabric(accelerator="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        torchinit.Fabric(accelerator="cuda")


def test_auto_accelerator_picks_what_exists():
    fabric = torchinit.Fabric()
    expected = "cuda" if torch.cuda.is_available() else fabric.plan.accelerator
    assert fabric.plan.accelerator == expected
    assert fabric.device.type == fabric.plan.accelerator


@pytest.mark.parametrize("devices", [1, "1", "auto", [0]])
def test_single_device_forms(devices):
    assert torchinit.Fabric(accelerator="cpu", devices=devices).device == torch.device("cpu")


@pytest.mark.parametrize("devices", [[5], [0, 0], 0, -2, "two", True, [], 1.5])
def test_bad_devices(devices):
    with pytest.raises(ValueError, match="devices"):
        torchinit.Fabric(accelerator="cpu", devices=devices)


@pytest.mark.parametrize("devices, world", [(2, 2), ("3", 3), ([0, 1], 2), (-1, 1)])
def test_several_processes_mean_ddp(devices, world):
    plan = torchinit.Fabric(accelerator="cpu", devices=devices).plan
    assert plan.world_size == world and plan.strategy == ("ddp" if world > 1 else "single_device")
    assert torchinit.Fabric(accelerator="cpu", strategy="ddp_spawn", devices=devices).plan.strategy == "ddp"


def test_single_device_strategy_with_several_devices_is_an_error():
    with pytest.raises(ValueError, match="strategy='ddp'"):
        torchinit.Fabric(accelerator="cpu", strategy="single_device", devices=2)


@pytest.mark.parametrize("strategy", ["deepspeed", "deepspeed_stage_3"])
def test_deepspeed_missing_says_how_to_install(strategy, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(RuntimeError, match="pip install deepspeed"):
        torchinit.Fabric(accelerator="cpu", strategy=strategy)


def test_unknown_strategy_and_nodes():
    with pytest.raises(ValueError, match="strategy='horovod'"):
        torchinit.Fabric(accelerator="cpu", strategy="horovod")
    with pytest.raises(ValueError, match="num_nodes=0"):
        torchinit.Fabric(accelerator="cpu", num_nodes=0)
    fabric = torchinit.Fabric(accelerator="cpu", num_nodes=2)
    assert fabric.plan.world_size == 2 and fabric.plan.strategy == "ddp"
    with pytest.raises(RuntimeError, match="torchrun"):
        fabric.launch()


def test_bad_input_leaves_global_state_alone():
    before = torch.get_default_dtype()
    with pytest.raises(ValueError):
        torchinit.Fabric(accelerator="cpu", precision="nope")
    assert torch.get_default_dtype() == before


def test_seed_makes_init_reproducible():
    torchinit.Fabric(accelerator="cpu", seed=7)
    a = torch.rand(4)
    torchinit.Fabric(accelerator="cpu", seed=7)
    assert torch.equal(torch.rand(4), a)
