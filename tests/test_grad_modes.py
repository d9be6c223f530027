"""Every init mode under `torch.inference_mode()` and `torch.no_grad()` (issue 19 item 3): litgpt builds, loads and
generates under inference mode. Writes made there must still be seen (inference tensors have no version counter),
and the model must come out equal to eager's, with what was loaded kept."""

import pytest
import torch
from conftest import assert_bitwise_equal
from torch import nn

import torchinit

GUARDS = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}
DTYPES = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "64-true": torch.float64,
          "16-true": torch.float16, "bf16-mixed": torch.float32}


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.register_buffer("freq", 1.0 / (10000 ** (torch.arange(0, 4, 2.0) / 4)), persistent=False)

    def forward(self, x):
        return self.norm(self.a(x)) + self.freq.sum()


def eager(dtype):
    torch.manual_seed(0)
    return Small().to(dtype)


MODES = [*(f"fabric {p}{' empty' if e else ''}" for p in DTYPES for e in (False, True)),
         "RecordContext", "RecordContext replay", "RecordContext empty", "InitContext empty", "InitContext meta"]


def build(mode: str):
    """The model built in `mode`, and its Fabric (None without one)."""
    if mode.startswith("fabric"):
        fabric = torchinit.Fabric(accelerator="cpu", precision=mode.split()[1])
        with fabric.init_module(empty_init=mode.endswith("empty")):
            return Small(), fabric
    context = {"RecordContext": lambda: torchinit.RecordContext("cpu", torch.bfloat16),
               "RecordContext replay": lambda: torchinit.RecordContext("cpu", torch.bfloat16, replay=True),
               "RecordContext empty": lambda: torchinit.RecordContext("cpu", torch.bfloat16, empty_init=True),
               "InitContext empty": lambda: torchinit.InitContext("cpu", torch.bfloat16, empty_init=True),
               "InitContext meta": lambda: torchinit.InitContext("cpu", torch.bfloat16, meta=True)}[mode]()
    with context:
        return Small(), None


@pytest.mark.parametrize("guard", GUARDS)
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_works_under_inference_mode_and_no_grad(mode, guard):
    want = eager(DTYPES[mode.split()[1]] if mode.startswith("fabric") else torch.bfloat16)
    loaded = {"a.weight": want.a.weight.detach() + 1}  # not eager's: a write that goes unseen would be replayed over
    if mode in ("InitContext empty", "InitContext meta"):  # their other tensors get the modules' init, not eager's
        loaded.update({k: v + 1 for k, v in want.state_dict().items() if k != "a.weight"})
    with torch.no_grad():
        for key, value in loaded.items():
            want.get_parameter(key).copy_(value)
    torch.manual_seed(0)
    with GUARDS[guard]():
        model, fabric = build(mode)
        if mode in ("RecordContext", "InitContext meta"):  # meta parameters: the checkpoint goes in as a source
            torchinit.materialize(model, checkpoint=loaded)
        else:
            model.load_state_dict(loaded, strict=False)
            model = fabric.setup(model) if fabric is not None else model
            torchinit.materialize(model)
        out = model(torch.ones(2, 4, dtype=want.a.weight.dtype))
    assert torchinit.unwritten_names(model) == []
    assert_bitwise_equal(getattr(model, "module", model), want)
    if "mixed" not in mode:  # (mixed: the forward runs under autocast)
        expected = want(torch.ones(2, 4, dtype=want.a.weight.dtype))  # a set-up module returns the default dtype
        assert torch.equal(out, expected.to(out.dtype) if hasattr(model, "module") else expected)
