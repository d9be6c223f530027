"""Empty init: no init work, real memory, buffers still exact, and nothing unwritten ever read (G5, G6)."""

import warnings

import pytest
import torch
from conftest import assert_bitwise_equal
from test_exact import eager, llama
from torch import nn

import torchinit


class EveryInit(nn.Module):
    """Every torch.nn.init function plus direct in-place fills, as transformers-style _init_weights do."""

    def __init__(self):
        super().__init__()
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(8, 8)) for _ in range(14)])
        w = self.weights
        nn.init.trunc_normal_(w[0], std=0.02)
        nn.init.orthogonal_(w[1])
        nn.init.xavier_uniform_(w[2])
        nn.init.xavier_normal_(w[3])
        nn.init.kaiming_normal_(w[4])
        nn.init.kaiming_uniform_(w[5])
        nn.init.normal_(w[6])
        nn.init.uniform_(w[7])
        nn.init.constant_(w[8], 3.0)
        nn.init.eye_(w[9])
        nn.init.sparse_(w[10], 0.5)
        w[11].data.normal_(0, 0.02)
        w[12].data.zero_()
        with torch.no_grad():
            w[13].fill_(1.0)
            w[13][0].zero_()
        self.register_buffer("mask", torch.tril(torch.ones(4, 4, dtype=torch.bool)), persistent=False)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 8, 2.0) / 8)), persistent=False)
        self.norm = nn.BatchNorm1d(8)

    def forward(self, x):
        return x @ self.weights[0]


def poisoned_empty(build, precision="bf16-true"):
    with torchinit.nan_poison(), torchinit.Fabric(accelerator="cpu", precision=precision).init_module(empty_init=True):
        return build()


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_no_init_work_and_no_random_numbers(precision):
    torch.manual_seed(0)
    expected = torch.rand(5)
    torch.manual_seed(0)
    model = poisoned_empty(EveryInit, precision)
    assert torch.equal(torch.rand(5), expected), "skipped init must not advance the RNG"
    for i, w in enumerate(model.weights):
        assert w.isnan().all(), f"weights[{i}] was initialized although empty_init=True"
        assert w.device.type == "cpu" and w.dtype == torchinit.Fabric(precision=precision).plan.param_dtype
    assert len(torchinit.unwritten_names(model)) == 16  # 14 weights + BatchNorm's weight and bias


def test_buffers_are_computed_exactly():
    model = poisoned_empty(EveryInit)
    want = eager(EveryInit, torch.bfloat16)
    for name, buffer in want.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], buffer), name
    assert torch.equal(model.norm.running_var, torch.ones(8, dtype=torch.bfloat16))
    assert model.norm.weight.isnan().all(), "BatchNorm's ones_ on its weight is init work: skipped"


def test_full_load_gives_the_checkpointed_model():
    want = eager(llama, torch.bfloat16)
    model = poisoned_empty(llama)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.load_state_dict(want.state_dict())
    assert_bitwise_equal(model, want)
    assert not torchinit.unwritten_names(model)
    model(torch.tensor([[1, 2, 3]]))


def test_partial_load_initializes_and_names_the_missing():
    want = eager(llama, torch.bfloat16)
    state = {k: v for k, v in want.state_dict().items() if "layers.1.mlp" not in k and "lm_head" not in k}
    torch.manual_seed(0)  # eager's seed: what the load leaves out is initialized as eager initializes it
    model = poisoned_empty(llama)
    with pytest.warns(UserWarning, match="did not provide 4 parameter") as record:
        result = model.load_state_dict(state, strict=False)
    message = next(str(w.message) for w in record if "did not provide" in str(w.message))
    for key in result.missing_keys:
        assert key in message
    params = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in params.values()), "garbage left behind"
    for key, value in state.items():  # what was loaded stays loaded
        assert torch.equal(model.state_dict()[key], value), key
    assert params["lm_head.weight"].std() > 0
    eagers = dict(want.named_parameters())
    assert sorted(result.missing_keys) == sorted(k for k in eagers if k not in state)
    for key in result.missing_keys:  # eager's values, bit for bit (the earlier random draws replayed too)
        same = params[key].dtype == eagers[key].dtype and torch.equal(params[key], eagers[key])
        assert same, f"{key} differs from eager"
    assert_bitwise_equal(model, want)
    model(torch.tensor([[1, 2, 3]]))


def test_partial_load_keeps_loaded_siblings_of_the_same_module():
    with torchinit.nan_poison(), torchinit.Fabric(accelerator="cpu").init_module(empty_init=True):
        layer = nn.Linear(4, 3)
    weight = torch.arange(12.0).reshape(3, 4)
    with pytest.warns(UserWarning, match="bias"):
        layer.load_state_dict({"weight": weight}, strict=False)
    assert torch.equal(layer.weight, weight)
    assert torch.isfinite(layer.bias).all()


class NoInit(nn.Module):
    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.empty(3))
        self.beta = nn.Parameter(torch.empty(2))


def test_missing_with_no_init_method_is_one_error_naming_all():
    with torchinit.nan_poison(), torchinit.Fabric(accelerator="cpu").init_module(empty_init=True):
        model = nn.Sequential(nn.Linear(2, 2), NoInit())
    with pytest.raises(RuntimeError, match=r"'1' \(NoInit: alpha, beta\)"):
        model.load_state_dict({"0.weight": torch.ones(2, 2)}, strict=False)
    assert model[0].bias.isnan().all(), "the error must come before anything is initialized"


class HalfInit(nn.Module):
    """reset_parameters() that forgets one of its parameters."""

    def __init__(self):
        super().__init__()
        self.done = nn.Parameter(torch.empty(2))
        self.forgotten = nn.Parameter(torch.empty(2))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.zeros_(self.done)


def test_init_method_that_leaves_a_parameter_unwritten_is_an_error():
    with torchinit.nan_poison(), torchinit.Fabric(accelerator="cpu").init_module(empty_init=True):
        model = HalfInit()
    with pytest.raises(torchinit.MaterializeError, match="init did not write them: forgotten"):
        torchinit.materialize(model)
    assert torchinit.unwritten_names(model) == ["done", "forgotten"], "a failed materialize changes nothing"


def test_forward_over_unwritten_replays_the_recorded_init():
    torch.manual_seed(0)
    model = poisoned_empty(llama)
    with pytest.warns(UserWarning, match="forward.*found 21 parameter.*eager's values.*lm_head.weight"):
        model(torch.tensor([[1, 2]]))
    assert_bitwise_equal(model, eager(llama, torch.bfloat16))


def test_forward_over_unwritten_without_a_record_raises_naming_them():
    with torchinit.nan_poison(), torchinit.InitContext("cpu", torch.bfloat16, empty_init=True):
        model = llama()
    with pytest.raises(RuntimeError, match="uninitialized memory.*model.embed_tokens.weight.*lm_head.weight"):
        model(torch.tensor([[1, 2]]))


def test_assign_and_copy_count_as_written():
    with torchinit.Fabric(accelerator="cpu").init_module(empty_init=True):
        a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    a.load_state_dict({"weight": torch.ones(2, 2), "bias": torch.zeros(2)}, assign=True)
    with torch.no_grad():
        b.weight.copy_(torch.ones(2, 2))
        b.bias.zero_()
    assert not torchinit.unwritten_names(a) and not torchinit.unwritten_names(b)
    a(torch.ones(1, 2))
    b(torch.ones(1, 2))


def test_setup_initializes_what_was_never_loaded():
    fabric = torchinit.Fabric(accelerator="cpu", precision="bf16-true", seed=0)
    with torchinit.nan_poison(), fabric.init_module(empty_init=True):
        model = llama()
    with pytest.warns(UserWarning, match="setup\\(\\) initialized 21 parameter"):
        model = fabric.setup(model)
    assert_bitwise_equal(model.module, eager(llama, torch.bfloat16))
    model(torch.tensor([[1, 2]]))


def test_tensors_written_by_factories_are_not_unwritten():
    with torchinit.InitContext("cpu", torch.float32, empty_init=True):
        norm = nn.LayerNorm(4)  # empty + ones_/zeros_ skipped -> unwritten
        p = nn.Parameter(torch.ones(3))  # a factory wrote it
        q = nn.Parameter(torch.empty(3).fill_(2.0))  # written before it became a parameter
        holder = nn.Module()
        holder.p, holder.q = p, q
    assert set(torchinit.unwritten_names(norm)) == {"weight", "bias"}
    assert not torchinit.unwritten_names(holder)
    assert torch.equal(q, torch.full((3,), 2.0))
