"""G1 placement and G2 hygiene of init_module / init_tensor."""

import pytest
import torch
from conftest import global_state
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

import torchinit

PRECISIONS = ["64-true", "32-true", "16-true", "bf16-true", "bf16-mixed"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_placement(precision):
    """G1 for init_tensor(): every floating tensor without dtype= in the precision's dtype, on the device."""
    fabric = torchinit.Fabric(accelerator="cpu", precision=precision)
    want = fabric.plan.param_dtype
    with fabric.init_tensor():
        assert torch.get_default_dtype() == want
        floats = [torch.empty(2), torch.zeros(2), torch.ones(2, 2), torch.rand(3), torch.randn(3),
                  torch.full((2,), 1.5), torch.arange(0.0, 2.0, 0.5), torch.linspace(0, 1, 5),
                  torch.eye(2), torch.tensor([0.5])]
        explicit = [torch.zeros(2, dtype=torch.float32), torch.ones(2, dtype=torch.float64)]
        integers = [torch.arange(3), torch.zeros(2, dtype=torch.long), torch.tensor([1, 2]), torch.randint(0, 5, (3,))]
        derived = floats[2] * 2 + 1
    assert all(t.dtype == want for t in floats), [t.dtype for t in floats]
    assert derived.dtype == want
    assert [t.dtype for t in explicit] == [torch.float32, torch.float64]
    assert all(t.dtype == torch.int64 for t in integers)
    assert all(t.device == fabric.device for t in floats + integers + explicit)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("empty_init", [False, True])
def test_placement_of_module_tensors(precision, empty_init):
    """G1 for init_module(): the modules' floating tensors in the precision's dtype, on the device; integer
    buffers and explicit dtypes as eager's `.to(dtype)` leaves them."""
    fabric = torchinit.Fabric(accelerator="cpu", precision=precision)
    want = fabric.plan.param_dtype
    with fabric.init_module(empty_init=empty_init):
        layer = nn.Linear(3, 4)
        layer.register_buffer("ids", torch.arange(3))
        layer.register_buffer("scale", torch.ones(2, dtype=torch.float64))
    assert layer.weight.dtype == want and layer.bias.dtype == want and layer.scale.dtype == want
    assert layer.ids.dtype == torch.int64
    assert all(t.device == fabric.device for t in [layer.weight, layer.bias, layer.ids, layer.scale])


class SeesItsDtypes(nn.Module):
    """A constructor that computes for itself (G8): widths from float tensors, a dtype copied from a parameter."""

    def __init__(self):
        super().__init__()
        self.seen = (torch.get_default_dtype(), torch.tensor(0.8).dtype)
        width = int(torch.tensor(1.0 / 3.0) * 3000)  # 1000 in fp32, 999 in bf16
        self.layer = nn.Linear(3, width)
        self.register_buffer("scale", torch.ones(2, dtype=self.layer.weight.dtype) / 3)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("empty_init", [False, True])
def test_construction_sees_eager_dtypes(precision, empty_init):
    fabric = torchinit.Fabric(accelerator="cpu", precision=precision)
    with fabric.init_module(empty_init=empty_init):
        model = SeesItsDtypes()
    assert model.seen == (torch.float32, torch.float32)
    assert model.layer.out_features == 1000
    want = fabric.plan.param_dtype
    assert model.layer.weight.dtype == want and model.layer.weight.device == fabric.device
    assert torch.equal(model.scale, (torch.ones(2) / 3).to(want))


def test_values_of_promoted_tensors_are_cast_eager_values():
    with torchinit.Fabric(accelerator="cpu", precision="bf16-true").init_tensor():
        torch.manual_seed(0)
        x = torch.randn(1000) * 0.02 + torch.arange(0.0, 1000.0) / 7
    torch.manual_seed(0)
    want = (torch.randn(1000) * 0.02 + torch.arange(0.0, 1000.0) / 7).to(torch.bfloat16)
    assert torch.equal(x, want)


def test_nothing_is_entered_before_enter():
    before = torch.get_default_dtype()
    context = torchinit.Fabric(accelerator="cpu", precision="bf16-true").init_module(empty_init=True)
    assert torch.get_default_dtype() == before
    assert not _get_current_dispatch_mode_stack()
    assert isinstance(context, torchinit.RecordContext)  # empty init on one device records (unwritten.py)


@pytest.mark.parametrize("empty_init", [False, True])
def test_state_restored_on_exception(empty_init):
    fabric = torchinit.Fabric(accelerator="cpu", precision="16-true")
    before = global_state()

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with fabric.init_module(empty_init=empty_init):
            nn.Linear(2, 2)
            assert global_state() != before
            raise Boom
    assert global_state() == before


def test_exception_in_constructor_propagates_unchanged():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.empty(3))
            raise KeyError("user bug")

    with pytest.raises(KeyError, match="user bug"):
        with torchinit.Fabric(accelerator="cpu", precision="bf16-true").init_module():
            Broken()


def test_reentered_and_nested_same_plan():
    fabric = torchinit.Fabric(accelerator="cpu", precision="bf16-true")
    context = fabric.init_module()
    for _ in range(2):
        with context:
            with context:
                with fabric.init_module():
                    inner = nn.Linear(2, 2)
                assert torch.get_default_dtype() == torch.float32  # eager's world inside (G8)
            outer = nn.Linear(2, 2)
        assert inner.weight.dtype == outer.weight.dtype == torch.bfloat16 and inner.weight.device.type == "cpu"
        assert torch.get_default_dtype() == torch.float32


BF16, FP32, FP16 = (torchinit.Fabric(accelerator="cpu", precision=p) for p in ("bf16-true", "32-true", "16-true"))
META = torch.device("meta")
CONFLICTS = {  # outer, inner: every pair has different plans (issue 19 item 6)
    "record outer, 32-true init_module inner": (BF16.init_module, FP32.init_module),
    "record outer, init inner of its dtype": (lambda: torchinit.RecordContext("cpu", torch.bfloat16),
                                              lambda: torchinit.InitContext("cpu", torch.bfloat16)),
    "empty record outer, init_module inner": (lambda: FP32.init_module(True), FP32.init_module),
    "init outer, record inner": (lambda: torchinit.InitContext("cpu", torch.bfloat16),
                                 lambda: torchinit.RecordContext("cpu", torch.bfloat16)),
    "init outer, empty init_module inner": (FP32.init_module, lambda: FP32.init_module(True)),
    "init_tensor outer, record inner": (BF16.init_tensor, BF16.init_module),
    "record, another dtype": (BF16.init_module, FP16.init_module),
    "record, init_tensor of another dtype": (BF16.init_module, FP16.init_tensor),
    "init, another dtype": (lambda: torchinit.InitContext("cpu", torch.bfloat16),
                            lambda: torchinit.InitContext("cpu", torch.float16)),
    "init, init_tensor of another dtype": (FP32.init_module, BF16.init_tensor),
    "record, another device": (BF16.init_module, lambda: torchinit.RecordContext(META, torch.bfloat16, replay=True)),
    "record, init_tensor on another device": (BF16.init_module, lambda: torchinit.init.context.TensorContext(
        META, torch.bfloat16)),
    "init, another device": (FP32.init_module, lambda: torchinit.InitContext(META, torch.float32)),
    "record, empty init inside": (BF16.init_module, lambda: BF16.init_module(True)),
    "empty record, init inside": (lambda: BF16.init_module(True), BF16.init_module),
    "init, empty init inside": (lambda: torchinit.InitContext("cpu", torch.bfloat16),
                                lambda: torchinit.InitContext("cpu", torch.bfloat16, empty_init=True)),
}


@pytest.mark.parametrize("case", CONFLICTS)
def test_nested_conflicting_plans_raise_and_keep_outer(case):
    outer, inner = CONFLICTS[case]
    context = outer()
    with context:
        with pytest.raises(ValueError, match="different plan") as error:
            with inner():
                pass
        layer = nn.Linear(2, 2)
    assert isinstance(error.value, torchinit.TorchinitError)
    torchinit.materialize(layer)  # (a record's placeholders, empty init's pending tensors)
    want = getattr(context, "dtype", None) or torch.float32
    assert layer.weight.dtype == want and layer.weight.device.type == "cpu", "built as the outer context builds"
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize("precision", ["bf16-true", "32-true"])
@pytest.mark.parametrize("empty", [False, True])
def test_the_same_plan_nests_in_every_mode(precision, empty):
    fabric = torchinit.Fabric(accelerator="cpu", precision=precision)
    with fabric.init_module(empty_init=empty), fabric.init_module(empty_init=empty), fabric.init_tensor():
        with fabric.init_tensor(), fabric.init_module(empty_init=empty):
            layer = nn.Linear(2, 2)
        loose = torch.ones(2)
    assert layer.weight.dtype == loose.dtype == fabric.plan.param_dtype and type(loose) is torch.Tensor


def test_user_default_dtype_is_restored_not_reset():
    torch.set_default_dtype(torch.float64)
    try:
        with torchinit.Fabric(accelerator="cpu", precision="bf16-true").init_module():
            pass
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(torch.float32)


def test_user_modes_inside_are_unaffected():
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with torchinit.Fabric(accelerator="cpu", precision="bf16-true").init_module():
        with Spy():
            torch.ones(2)
    assert seen


@pytest.mark.parametrize("kind, other_kind", [("init", "init"), ("record", "record"), ("record", "init"),
                                              ("init", "record")])
def test_a_second_thread_cannot_open_a_context_while_one_is_open(kind, other_kind):
    """The default dtype, device and nn.init are process-global: a context open in one thread refuses another
    thread's of either kind (a clear error, nothing changed), and the other thread may open one once it is
    closed."""
    import threading

    def context(dtype=torch.bfloat16, kind=kind):
        if kind == "init":
            return torchinit.InitContext("cpu", dtype)
        return torchinit.RecordContext("cpu", dtype)

    outcome = {}

    def other(dtype=torch.bfloat16):
        try:
            with context(dtype, other_kind):
                outcome["opened"] = True
        except torchinit.UsageError as exc:
            outcome["error"] = exc

    with context():
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert "another thread" in str(outcome.get("error")) and "opened" not in outcome
    assert isinstance(outcome["error"], RuntimeError)
    outcome.clear()
    with context():  # another plan in the other thread: the same refusal, not a plan mismatch
        thread = threading.Thread(target=other, args=(torch.float16,))
        thread.start()
        thread.join()
    assert "another thread" in str(outcome["error"]) and "opened" not in outcome
    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert outcome.get("opened") is True
