"""Nothing fake leaves `init_module()` (issue 19 item 4): tensors made inside a record context that are not the
modules' own — loose ones the caller keeps, tensors in a module's lists, tuples and dicts — come out real, the same
objects, on the device, with eager's values; the random stream is left where the context leaves it anyway."""

import pytest
import torch
from conftest import assert_bitwise_equal
from torch import nn

import torchinit
from torchinit.core.compat import FakeTensor


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.tables = [torch.randn(2, 3), torch.arange(3.0)]
        self.named = {"cos": torch.linspace(0, 1, 5).cos(),
                      "pair": (torch.ones(2) * 3, torch.zeros(2, dtype=torch.int8))}

    def forward(self, x):
        return self.lin(x) * self.named["cos"].sum() + self.tables[0].sum()


def program():
    """What a user writes inside the context: loose tensors before and after the model, and a view."""
    x = torch.linspace(0, 1, 4)
    model = Holder()
    noise = torch.randn(2, 4)
    return x, x[1:], noise, model


def loose(x, view, noise, model) -> list[torch.Tensor]:
    return [x, view, noise, *model.tables, model.named["cos"], *model.named["pair"]]


CONTEXTS = {
    "fabric bf16-true": lambda: torchinit.Fabric(accelerator="cpu", precision="bf16-true").init_module(),
    "fabric bf16-true empty": lambda: torchinit.Fabric(accelerator="cpu", precision="bf16-true").init_module(True),
    "fabric 32-true empty": lambda: torchinit.Fabric(accelerator="cpu", precision="32-true").init_module(True),
    "RecordContext": lambda: torchinit.RecordContext("cpu", torch.bfloat16),
}


@pytest.mark.parametrize("context", CONTEXTS)
def test_loose_and_contained_tensors_come_out_real_with_eager_values(context):
    torch.manual_seed(0)
    untouched = torch.rand(3)
    torch.manual_seed(0)
    want = loose(*program())
    after = torch.rand(3) if context == "fabric bf16-true" else untouched  # record and empty init draw nothing
    torch.manual_seed(0)
    with CONTEXTS[context]():
        made = program()
        tables, named = made[3].tables, made[3].named
    got = loose(*made)
    assert made[3].tables is tables and made[3].named is named, "the containers are the user's, changed in place"
    assert not any(isinstance(t, FakeTensor) for t in got)
    for g, w in zip(got, want, strict=True):
        assert type(g) is torch.Tensor and g.dtype == w.dtype and g.device == w.device and torch.equal(g, w)
    assert torch.equal(torch.rand(3), after), "the random stream is where it would be without the loose tensors"
    model = made[3]
    if context != "RecordContext":
        torch.manual_seed(0)
        reference = program()[3].to(model.lin.weight.dtype)
        if "empty" in context:
            torchinit.materialize(model)
        assert_bitwise_equal(model, reference)
        x = torch.ones(4, dtype=model.lin.weight.dtype)
        out = model(x)
        assert type(out) is torch.Tensor and torch.equal(out, reference(x))


def test_a_parameter_held_outside_its_module_is_named():
    fabric = torchinit.Fabric(accelerator="cpu", precision="bf16-true")
    with pytest.raises(torchinit.UsageError, match=r"Linear\.weight.*after the context"):
        with fabric.init_module():
            model = nn.Linear(2, 2)
            torch.optim.SGD(model.parameters(), lr=0.1)  # the optimizer keeps what will be replaced
            kept = model.weight  # noqa: F841


def test_a_tensor_that_cannot_be_swapped_in_place_is_named():
    import weakref

    with pytest.raises(torchinit.RecordError, match=r"Holder\.tables.*cannot be given its value in place"):
        with CONTEXTS["fabric bf16-true"]():
            model = Holder()
            watcher = weakref.ref(model.tables[1])  # noqa: F841  (torch cannot swap a tensor someone watches)


@pytest.mark.parametrize("precision, empty", [("bf16-true", False), ("bf16-true", True), ("32-true", True),
                                              ("32-true", False)])
def test_init_tensor_inside_init_module_makes_real_tensors_with_eager_values(precision, empty):
    """Issue 19 item 5: it crashed at exit (a storage on meta set into a cpu tensor)."""
    fabric = torchinit.Fabric(accelerator="cpu", precision=precision)
    dtype = fabric.plan.param_dtype

    def build():
        model = Holder()
        with fabric.init_tensor():  # litgpt's KV cache
            cache = torch.randn(2, 3), torch.arange(3), torch.ones(2, dtype=torch.float64)
        return model, cache

    torch.manual_seed(0)
    reference, want = build()
    reference.to(dtype)
    torch.manual_seed(0)
    with fabric.init_module(empty_init=empty):
        model, cache = build()
    torchinit.materialize(model)
    assert_bitwise_equal(model, reference)
    assert [(t.dtype, type(t)) for t in cache] == [(dtype, torch.Tensor), (torch.int64, torch.Tensor),
                                                    (torch.float64, torch.Tensor)]
    assert torch.equal(cache[0], want[0].to(dtype)) and torch.equal(cache[1], want[1])
    assert torch.equal(cache[2], want[2])
