"""G9: which tensors were written is bookkeeping that is right without NaN poison; poison only proves it."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_bitwise_equal
from test_exact import eager
from torch import nn

import torchinit


class Patterns(nn.Module):
    """What transformers models do that once fooled the tracker."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16)
        self.head.weight = self.embed.weight  # a tie by assignment
        self.head.bias.data = F.pad(self.head.bias.data, (0, 0))  # how transformers ties a biased LM head
        self.sinks = nn.Parameter(torch.empty(4, dtype=torch.float32))  # an explicit dtype (attention sinks)
        nn.init.normal_(self.sinks)
        self.scale = nn.Parameter(torch.ones(3))  # a factory's value, then an init that empty init skips
        nn.init.normal_(self.scale, std=0.02)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 8, 2.0) / 8)), persistent=False)

    def forward(self, x):
        return self.head(self.embed(x)) + self.sinks.sum() + self.scale.sum()


EVERY_PARAMETER = {"embed.weight", "head.bias", "sinks", "scale"}


@pytest.mark.parametrize("poison", [False, True])
def test_without_a_record_every_skipped_value_is_pending(poison):
    with torchinit.nan_poison(poison), torchinit.InitContext("cpu", torch.bfloat16, empty_init=True):
        model = Patterns()
    assert set(torchinit.unwritten_names(model)) == EVERY_PARAMETER
    assert model.sinks.dtype == torch.bfloat16


@pytest.mark.parametrize("poison", [False, True])
@pytest.mark.parametrize("precision", ["32-true", "bf16-true", "64-true"])
def test_with_the_record_every_value_is_eager(poison, precision):
    fabric = torchinit.Fabric(accelerator="cpu", precision=precision, seed=0)
    with torchinit.nan_poison(poison), fabric.init_module(empty_init=True):
        model = Patterns()
    assert set(torchinit.unwritten_names(model)) == EVERY_PARAMETER
    with pytest.warns(UserWarning, match="setup"):
        model = fabric.setup(model).module
    assert not torchinit.unwritten_names(model)
    assert_bitwise_equal(model, eager(Patterns, fabric.plan.param_dtype))


@pytest.mark.parametrize("poison", [False, True])
def test_a_partial_checkpoint_and_the_record_give_every_value(poison):
    want = eager(Patterns, torch.bfloat16)
    torch.manual_seed(0)
    with torchinit.nan_poison(poison), torchinit.Fabric(precision="bf16-true").init_module(empty_init=True):
        model = Patterns()
    with pytest.warns(UserWarning, match="eager's values.*sinks"):
        model.load_state_dict({"embed.weight": want.embed.weight, "scale": want.scale}, strict=False)
    assert_bitwise_equal(model, want)


class Uninitialized(nn.Module):
    def __init__(self):
        super().__init__()
        self.garbage = nn.Parameter(torch.empty(3))  # eager leaves uninitialized memory here too
        self.fine = nn.Parameter(torch.zeros(2))


def test_a_value_eager_leaves_uninitialized_is_not_replayed_but_named():
    with contextlib.ExitStack() as stack:
        stack.enter_context(torchinit.Fabric().init_module(empty_init=True))
        model = Uninitialized()
    with pytest.raises(torchinit.MaterializeError, match=r"'<root>' \(Uninitialized: garbage\)"):
        torchinit.materialize(model)
    model.load_state_dict({"garbage": torch.ones(3)}, strict=False)
    assert torch.equal(model.fine, torch.zeros(2)) and torch.equal(model.garbage, torch.ones(3))


class UninitializedBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("partly", torch.empty(4))  # only half of it written: eager leaves garbage too
        self.partly[:2] = 1.0
        self.register_buffer("never", torch.empty(3), persistent=False)

    def forward(self, x):
        return self.lin(x) + self.partly.sum() + self.never.sum()


def test_a_buffer_eager_leaves_uninitialized_is_named_not_kept():
    """Without poison, empty init knows these buffers hold uninitialized memory: forward, setup and a load that
    misses them name them (the model unchanged); a checkpoint that holds the persistent one fills it."""
    fabric = torchinit.Fabric(precision="bf16-true")
    with fabric.init_module(empty_init=True):
        model = UninitializedBuffers()
    assert set(torchinit.unwritten_names(model)) == {"lin.weight", "lin.bias", "partly", "never"}
    with pytest.raises(RuntimeError, match="would read uninitialized memory.*partly, never"):
        model(torch.ones(4, dtype=torch.bfloat16))
    with pytest.raises(torchinit.MaterializeError, match=r"'<root>' \(UninitializedBuffers: partly, never\)"):
        fabric.setup(model)
    assert set(torchinit.unwritten_names(model)) == {"lin.weight", "lin.bias", "partly", "never"}
    with pytest.raises(torchinit.MaterializeError, match=r"\(UninitializedBuffers: never\)"):
        model.load_state_dict({"partly": torch.ones(4)}, strict=False)  # what it misses has no source
    assert torch.equal(model.partly, torch.ones(4, dtype=torch.bfloat16))
    assert set(torchinit.unwritten_names(model)) == {"lin.weight", "lin.bias", "never"}
