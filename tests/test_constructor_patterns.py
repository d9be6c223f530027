"""What constructors in transformers' registry do that the full zoo sweep (benchmarks/zoo.py) found broken: each
pattern in one small module, built every way, against eager bit for bit — and without poison, so the
bookkeeping alone knows that every value was written.

DeepSeek-V4 / HY-V4 / Inkling convert a submodule inside the constructor (`.to(dtype=torch.float32)`); OneFormer
clones layers with `copy.deepcopy`; HY-V4 builds an init value with `zeros_like(param)`; Florence-2, Marian,
Pegasus and RoFormer fill `torch.empty` in strided slices; DINOv3 with no register tokens has a 0-element
parameter; Llama 4 keeps a complex RoPE buffer (which `Module.to(bfloat16)` makes real).
"""

import collections
import copy
import math
import warnings

import pytest
import torch
from conftest import assert_bitwise_equal
from test_exact import eager
from torch import nn

import torchinit


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.register_buffer("steps", torch.arange(8.0))


class Patterns(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(8, 8).to(dtype=torch.float32)  # a submodule converted in the constructor
        self.wide = nn.Linear(8, 4).double()
        layer = Layer()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(3))  # clones that never ran __init__
        self.layers[1].proj.weight = self.layers[0].proj.weight  # and a tie between clones
        self.base = nn.Parameter(torch.empty(6))
        base = torch.zeros_like(self.base)  # reads the shape only: not uninitialized
        base[:2] = -math.log(3)
        with torch.no_grad():
            self.base.copy_(base)
        self.pos = nn.Embedding(6, 8)
        table = torch.empty(6, 8, dtype=self.pos.weight.dtype)  # filled in two strided halves
        angles = torch.arange(6.0)[:, None] / 10000 ** (torch.arange(4.0) / 4)
        table[:, 0::2] = torch.sin(angles)
        table[:, 1::2] = torch.cos(angles)
        with torch.no_grad():
            self.pos.weight.copy_(table)
        halves = torch.empty(6, 4)
        halves[:, :2] = angles[:, :2]
        halves[:, 2:] = angles[:, 2:]
        self.register_buffer("halves", halves, persistent=False)
        self.registers = nn.Parameter(torch.empty(1, 0, 8))  # no elements, nothing to write


def _ties(model):
    groups = collections.defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        groups[id(p)].append(name)
    return sorted(g for g in groups.values() if len(g) > 1)


def _build(mode, precision, poison):
    torch.manual_seed(0)
    fabric = torchinit.Fabric(accelerator="cpu", precision=precision)
    dtype = fabric.plan.param_dtype
    with warnings.catch_warnings(), torchinit.nan_poison(poison):
        warnings.simplefilter("ignore")  # (setup's "initialized N parameters" notice)
        if mode == "record":
            with torchinit.RecordContext("cpu", dtype):
                model = Patterns()
            torchinit.materialize(model)
            return model
        if mode == "init_module":
            with fabric.init_module():
                return Patterns()
        with fabric.init_module(empty_init=True):
            model = Patterns()
        if mode == "empty_partial":
            state = eager(Patterns, dtype).state_dict()
            model.load_state_dict({k: v for i, (k, v) in enumerate(state.items()) if i % 2}, strict=False)
        return fabric.setup(model).module


@pytest.mark.parametrize("poison", [False, True])
@pytest.mark.parametrize("mode", ["record", "init_module", "empty", "empty_partial"])
@pytest.mark.parametrize("precision", ["bf16-true", "32-true"])
def test_every_pattern_is_eager_in_every_mode(mode, precision, poison):
    model = _build(mode, precision, poison)
    want = eager(Patterns, torchinit.Fabric(precision=precision).plan.param_dtype)
    assert_bitwise_equal(model, want)
    assert _ties(model) == _ties(want) == [["layers.0.proj.weight", "layers.1.proj.weight"]]
    assert not torchinit.unwritten_names(model)


class Rope(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("freqs", torch.polar(torch.ones(4), torch.arange(4.0)), persistent=False)


@pytest.mark.parametrize("mode", ["record", "init_module", "empty"])
def test_a_complex_buffer_takes_the_dtype_as_module_to_gives_it(mode):
    """`Module.to(torch.bfloat16)` casts complex tensors too (torch warns that the imaginary part is dropped):
    one meaning of "the model in bf16", the same in every mode."""
    fabric = torchinit.Fabric(accelerator="cpu", precision="bf16-true")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch says it once per process)
        want = eager(Rope, torch.bfloat16)
        torch.manual_seed(0)
        if mode == "record":
            with torchinit.RecordContext("cpu", torch.bfloat16):
                model = Rope()
            torchinit.materialize(model)
        elif mode == "init_module":
            with fabric.init_module():
                model = Rope()
        else:
            with fabric.init_module(empty_init=True):
                model = Rope()
            model = fabric.setup(model).module
    assert model.freqs.dtype == torch.bfloat16
    assert_bitwise_equal(model, want)


class KeepsBands(nn.Module):
    """timm's rotary embeddings: `_apply` is overridden so that `.to(torch.bfloat16)` leaves the bands in fp32,
    recomputed from the configuration rather than cast (a bf16 round trip would lose them)."""

    def __init__(self, dim=8, temperature=10000.0):
        super().__init__()
        self.dim, self.temperature = dim, temperature
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("bands", self._bands("cpu"), persistent=False)
        self.register_buffer("table", self._table(), persistent=False)

    def _bands(self, device):
        return 1.0 / self.temperature ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim)

    def _table(self):
        return (torch.arange(16.0, device=self.bands.device)[:, None] * self.bands).cos()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.bands = self._bands(self.bands.device)  # fp32 whatever `fn` did
        self.table = self._table()
        return self


@pytest.mark.parametrize("mode", ["init_module", "empty", "record"])
def test_a_module_that_overrides_apply_gets_what_its_to_gives(mode):
    """Eager is `KeepsBands().to(torch.bfloat16)`: the module's own `_apply` decides, so its bands and table stay
    fp32 (and bit for bit the fp32 values), while its Linear is cast."""
    fabric = torchinit.Fabric(accelerator="cpu", precision="bf16-true")
    want = eager(KeepsBands, torch.bfloat16, seed=3)
    assert want.bands.dtype == want.table.dtype == torch.float32 and want.proj.weight.dtype == torch.bfloat16
    torch.manual_seed(3)
    if mode == "init_module":
        with fabric.init_module():
            model = KeepsBands()
    elif mode == "record":
        with torchinit.RecordContext("cpu", torch.bfloat16):
            model = KeepsBands()
        torchinit.materialize(model)
    else:
        with fabric.init_module(empty_init=True):
            model = KeepsBands()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (setup's "initialized N parameters" notice)
            model = fabric.setup(model).module
    assert_bitwise_equal(model, want)
