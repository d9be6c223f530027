"""materialize: meta -> real in place, one source per tensor, ties and identity kept, buffers exact (G4, G5, G6)."""

import warnings

import psutil
import pytest
import torch
from conftest import assert_bitwise_equal, tensors
from test_empty_init import EveryInit
from test_exact import bert, eager, gpt2, llama, plain_layers
from torch import nn

import torchinit


def llama_tied():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        tie_word_embeddings=True))


def t5():
    from transformers import T5Config, T5ForConditionalGeneration
    return T5ForConditionalGeneration(T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                               relative_attention_num_buckets=8, decoder_start_token_id=0))


MODELS = [llama, llama_tied, gpt2, bert, t5, plain_layers, EveryInit]
TIES = {llama: 0, llama_tied: 1, gpt2: 1, bert: 0, t5: 1, plain_layers: 0, EveryInit: 0}


def on_meta(build, dtype=torch.float32):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own notices
        with torchinit.InitContext("cpu", dtype, meta=True):
            return build()


def objects(module):
    return {name: id(t) for name, t in tensors(module).items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("build", MODELS, ids=lambda b: b.__name__)
def test_meta_construction_then_checkpoint_is_the_eager_model(build, dtype):
    want = eager(build, dtype)
    model = on_meta(build, dtype)
    params = dict(model.named_parameters(remove_duplicate=False))
    assert all(p.device.type == "meta" for p in params.values())
    for name, buffer in want.named_buffers():  # computed for real during construction, as eager computes them
        got = dict(model.named_buffers())[name]
        assert got.dtype == buffer.dtype and torch.equal(got, buffer), name
    ties, ids = torchinit.tie_groups(model), objects(model)
    assert len(ties) == TIES[build]

    with torchinit.nan_poison():
        report = torchinit.materialize(model, "cpu", dtype, checkpoint=want.state_dict())

    assert_bitwise_equal(model, want)
    assert objects(model) == ids, "every Parameter and buffer must be the same object"
    assert torchinit.tie_groups(model) == ties
    assert len(list(model.parameters())) == len(list(want.parameters())), "a tied weight counts once"
    assert not report.from_init and report.from_checkpoint


@pytest.mark.parametrize("precision", ["bf16-true", "32-true"])
def test_meta_construction_then_own_init_through_setup(precision):
    """The bundled Llama: RoPE buffer exact, every parameter from its module's init, no NaN left."""
    from torchinit.models import Llama, config_for

    fabric = torchinit.Fabric(accelerator="cpu", precision=precision)
    cfg = config_for("tiny")
    want = eager(lambda: Llama(cfg), fabric.plan.param_dtype)
    with torchinit.nan_poison(), torchinit.InitContext("cpu", fabric.plan.param_dtype, meta=True):
        module = Llama(cfg)
    with torchinit.nan_poison():
        model = fabric.setup(module)
    assert torch.equal(model.rope.inv_freq, want.rope.inv_freq)
    assert torch.equal(model.layers[0].attn_norm.weight, torch.ones_like(want.layers[0].attn_norm.weight))
    assert all(torch.isfinite(p).all() and p.dtype == fabric.plan.param_dtype for p in model.parameters())
    model(torch.tensor([[1, 2, 3]]))


def user_meta(build, seed=0):
    with torch.device("meta"):
        model = build()
    torch.manual_seed(seed)
    return model


def torch_layers():
    return nn.ModuleDict(dict(
        linear=nn.Linear(16, 32), conv=nn.Conv2d(3, 4, 3), embedding=nn.Embedding(50, 8, padding_idx=3),
        mha=nn.MultiheadAttention(8, 2), layernorm=nn.LayerNorm(32), batchnorm=nn.BatchNorm1d(4),
    ))


def post_order_reset(model):
    """The reference: each owner's own init once, children before parents."""
    def walk(m):
        for child in m.children():
            yield from walk(child)
        yield m
    for m in walk(model):
        if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
            (getattr(m, "reset_parameters", None) or m._reset_parameters)()


def test_user_meta_model_gets_each_modules_own_init_once_children_first():
    model = user_meta(torch_layers, seed=3)
    with torchinit.nan_poison():
        report = torchinit.materialize(model, "cpu")
    want = torch_layers()
    torch.manual_seed(3)
    with torch.no_grad():
        post_order_reset(want)
    assert_bitwise_equal(model, want)
    assert torch.equal(model.mha.out_proj.bias, torch.zeros(8)), "MHA's _reset_parameters wins over its child's"
    assert torch.equal(model.embedding.weight[3], torch.zeros(8)), "padding_idx row"
    assert torch.equal(model.batchnorm.running_var, torch.ones(4)) and model.batchnorm.num_batches_tracked == 0
    assert model.batchnorm.num_batches_tracked.dtype == torch.int64
    assert len(report.from_init) == len(tensors(model))


class Counting(nn.Module):
    calls = []

    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.empty(n))

    def reset_parameters(self):
        Counting.calls.append(self)
        nn.init.ones_(self.w)


class Container(nn.Module):
    """No tensors of its own: its reset_parameters must never be asked."""

    def __init__(self):
        super().__init__()
        self.a, self.b = Counting(2), Counting(3)
        self.shared = self.a  # the same module twice: still one init

    def reset_parameters(self):
        raise AssertionError("a parameter-less container was asked to initialize")


def test_each_owner_once_containers_never():
    model = user_meta(Container)
    Counting.calls.clear()
    torchinit.materialize(model, "cpu")
    assert Counting.calls == [model.a, model.b]


class NoInit(nn.Module):
    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.empty(2))
        self.register_buffer("table", torch.empty(3), persistent=False)


def test_modules_without_init_are_named_in_one_error_and_nothing_changes():
    model = user_meta(lambda: nn.Sequential(nn.Linear(2, 2), NoInit(), nn.Sequential(NoInit())))
    before = {name: (id(t), t.device) for name, t in tensors(model).items()}
    with pytest.raises(torchinit.MaterializeError, match=r"2 module\(s\).*'1' \(NoInit: alpha, table\), "
                                                         r"'2.0' \(NoInit: alpha, table\)"):
        torchinit.materialize(model, "cpu")
    assert {name: (id(t), t.device) for name, t in tensors(model).items()} == before
    # the ways out the error names: a registered init, or one passed in
    torchinit.register_init(NoInit, lambda m: (m.alpha.data.fill_(1), m.table.zero_()))
    try:
        torchinit.materialize(model, "cpu", init_fns={nn.Linear: lambda m: (m.weight.data.fill_(2), m.bias.zero_())})
    finally:
        torchinit.register_init(NoInit, None)
    assert torch.equal(model[1].alpha, torch.ones(2)) and torch.equal(model[0].weight, torch.full((2, 2), 2.0))
    with pytest.raises(torchinit.MaterializeError, match="NoInit"):
        torchinit.materialize(user_meta(NoInit), "cpu")  # the registration is gone again


class Forgetful(nn.Module):
    def __init__(self):
        super().__init__()
        self.done, self.forgotten = nn.Parameter(torch.empty(2)), nn.Parameter(torch.empty(2))

    def reset_parameters(self):
        nn.init.zeros_(self.done)


def test_init_that_forgets_a_tensor_is_an_error_and_the_model_stays_meta():
    model = user_meta(lambda: nn.Sequential(nn.Linear(2, 2), Forgetful()))
    ids = objects(model)
    with pytest.raises(torchinit.MaterializeError, match=r"init did not write them: 1\.forgotten"):
        torchinit.materialize(model, "cpu")
    assert all(t.device.type == "meta" for t in tensors(model).values())
    assert objects(model) == ids


class Overreaching(nn.Module):
    """Violates the contract: its reset_parameters also initializes its child's tensors."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(4))
        self.child = nn.Linear(4, 4)

    def reset_parameters(self):
        nn.init.ones_(self.scale)
        nn.init.zeros_(self.child.weight)


def test_init_that_writes_a_childs_tensor_is_reported():
    model = user_meta(Overreaching)
    with pytest.warns(UserWarning, match=r"Initialized twice, the parent's value kept: child\.weight"):
        torchinit.materialize(model, "cpu")
    assert torch.equal(model.child.weight, torch.zeros(4, 4)), "eager order: the parent runs last"


class Meddler(nn.Module):
    def __init__(self, victim):
        super().__init__()
        self.own = nn.Parameter(torch.empty(2))
        self.victim = [victim]  # not a submodule: a tensor it does not own

    def reset_parameters(self):
        nn.init.zeros_(self.own)
        nn.init.zeros_(self.victim[0].weight)


def test_init_that_writes_anothers_tensor_is_refused_and_reported():
    loaded = nn.Linear(2, 2)
    with torch.no_grad():
        loaded.weight.fill_(5.0)
    model = nn.Sequential(loaded)
    with torch.device("meta"):
        model.append(Meddler(loaded))
    with pytest.warns(UserWarning, match=r"Refused writes to tensors with another source: 0\.weight \(by '1'\)"):
        torchinit.materialize(model)
    assert torch.equal(loaded.weight, torch.full((2, 2), 5.0))
    assert torch.equal(model[1].own, torch.zeros(2))


class Replacer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.empty(3)), nn.Parameter(torch.empty(3))

    def reset_parameters(self):
        self.a = nn.Parameter(torch.full((3,), 2.0))  # a new object
        self.b.data = torch.full((3,), 3.0)  # new memory


def test_init_that_replaces_objects_or_memory_keeps_identity():
    model = user_meta(Replacer)
    a, b = model.a, model.b
    torchinit.materialize(model, "cpu", torch.bfloat16)
    assert model.a is a and model.b is b
    assert torch.equal(a, torch.full((3,), 2.0, dtype=torch.bfloat16))
    assert torch.equal(b, torch.full((3,), 3.0, dtype=torch.bfloat16))


class Recorded:
    """A stand-in for the recorded-init source: fills what it covers with 7, in one replay."""

    def __init__(self, tensors):
        self.ids, self.replayed = {id(t) for t in tensors}, []

    def covers(self, tensor):
        return id(tensor) in self.ids

    def replay(self, targets):
        self.replayed.append(sorted(targets))
        for t in targets.values():
            t.fill_(7.0)


def test_sources_in_order_checkpoint_then_recorded_then_own_init():
    model = user_meta(lambda: nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    record = Recorded([model[0].weight, model[0].bias, model[1].weight])
    report = torchinit.materialize(model, "cpu", checkpoint={"0.weight": torch.ones(2, 2)}, recorded=record)
    assert record.replayed == [["0.bias", "1.weight"]]
    assert torch.equal(model[0].weight, torch.ones(2, 2))
    assert torch.equal(model[0].bias, torch.full((2,), 7.0)) and torch.equal(model[1].weight, torch.full((2, 2), 7.0))
    assert (report.from_checkpoint, report.from_record, report.from_init) == (["0.weight"], ["0.bias", "1.weight"],
                                                                              ["1.bias"])
    assert model[1].bias.abs().max() <= 2**-0.5, "1.bias: Linear's own init (the weight it reads is recorded)"


def test_checkpoint_shape_mismatch_is_one_error_naming_the_keys():
    model = user_meta(lambda: nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 3)))
    bad = {"0.weight": torch.ones(3, 2), "1.bias": torch.ones(2)}
    with pytest.raises(torchinit.MaterializeError, match=r"0\.weight \(checkpoint \(3, 2\), model \(2, 2\)\), "
                                                         r"1\.bias \(checkpoint \(2,\), model \(3,\)\)"):
        torchinit.materialize(model, "cpu", checkpoint=bad)
    assert all(t.device.type == "meta" for t in tensors(model).values())


def test_float_buffers_cast_integer_buffers_kept():
    model = user_meta(lambda: nn.BatchNorm1d(3))
    torchinit.materialize(model, "cpu", torch.float16)
    assert model.running_mean.dtype == torch.float16 and model.weight.dtype == torch.float16
    assert model.num_batches_tracked.dtype == torch.int64


def test_partly_meta_after_a_partial_load_is_completed_by_setup():
    want = eager(llama, torch.bfloat16)
    module = on_meta(llama, torch.bfloat16)
    partial = {k: v for k, v in want.state_dict().items() if "layers.1.mlp" not in k}
    module.load_state_dict(partial, strict=False, assign=True)  # torch's way: those become real, the rest stays meta
    assert any(p.device.type == "meta" for p in module.parameters())
    fabric = torchinit.Fabric(accelerator="cpu", precision="bf16-true")
    with torchinit.nan_poison(), pytest.warns(UserWarning, match="_init_weights"):
        model = fabric.setup(module)
    for key, value in partial.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model(torch.tensor([[1, 2, 3]]))


def test_optimizer_made_from_meta_parameters_works_after_setup():
    fabric = torchinit.Fabric(accelerator="cpu", precision="bf16-true", seed=0)
    module = on_meta(lambda: nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)))
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1)  # the seed's foot-gun order
    model = fabric.setup(module)
    optimizer = fabric.setup_optimizers(optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    fabric.backward(model(torch.ones(3, 4)).sum())
    optimizer.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert optimizer.param_groups[0]["params"][0] is module[0].weight


def test_optimizer_holding_state_for_meta_parameters_is_an_error():
    fabric = torchinit.Fabric(accelerator="cpu")
    module = user_meta(lambda: nn.Linear(2, 2))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # on meta: momentum buffers with no values
    with pytest.raises(RuntimeError, match="already holds state for 2 parameter"):
        fabric.setup(module, optimizer)
    assert module.weight.device.type == "meta", "checked before the model changed"
    with pytest.raises(RuntimeError, match="already holds state"):
        fabric.setup_optimizers(optimizer)


def test_setup_optimizers_before_setup_is_an_error():
    fabric = torchinit.Fabric(accelerator="cpu")
    module = user_meta(lambda: nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match=r"still on the meta device.*fabric\.setup\(model\)"):
        fabric.setup_optimizers(torch.optim.SGD(module.parameters(), lr=0.1))


def test_preflight_refuses_what_cannot_fit_before_allocating():
    total = psutil.virtual_memory().total
    third = total // 3 // 4  # fp32 elements in a third of the machine's memory
    model = user_meta(lambda: nn.ModuleList(nn.Embedding(third, 1) for _ in range(4)))
    with pytest.raises(torchinit.InsufficientMemoryError, match=r"needs .* GiB on cpu, but only .* free.*precision"):
        torchinit.materialize(model, "cpu")
    assert all(p.device.type == "meta" for p in model.parameters())
    huge = user_meta(lambda: nn.Linear(2**20, total // 2**20))  # one tensor larger than the machine
    with pytest.raises(torchinit.InsufficientMemoryError, match=r"cannot place weight .* larger than the whole device"):
        torchinit.materialize(huge, "cpu")


def test_verify_names_every_problem_at_once():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model.register_buffer("mask", torch.tensor([0.0, float("-inf")]))  # -inf in a buffer is legitimate
    ties = torchinit.tie_groups(model)
    torchinit.verify(model, ties)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
        model[1].bias[0] = float("inf")
    model[1].weight = model[0].weight
    with torch.device("meta"):
        model.append(nn.Linear(1, 1))
    with pytest.raises(torchinit.VerificationError) as info:
        torchinit.verify(model, ties)
    message = str(info.value)
    assert "meta device: 2.weight, 2.bias" in message
    assert "ties changed" in message and "0.weight = 1.weight" in message
    assert "NaN" in message and "0.weight" in message
    assert "infinite values in parameters: 1.bias" in message


def test_verify_checks_float8_parameters_and_dtensor_shards():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    model = nn.Linear(4, 4).to(torch.float8_e4m3fn)
    torchinit.verify(model)
    with torch.no_grad():
        model.weight.view(torch.uint8)[0, 0] = 0x7F  # e4m3fn's NaN (it has no inf)
    with pytest.raises(torchinit.VerificationError, match="NaN.*weight"):
        torchinit.verify(model)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        sharded = nn.Linear(4, 4)
        # (from_local: under the fake group, torch 2.7's distribute_tensor leaves the local shard zeros)
        sharded.weight = nn.Parameter(DTensor.from_local(torch.full((2, 4), float("inf")), mesh, [Shard(0)]))
        with pytest.raises(torchinit.VerificationError, match="infinite values in parameters: weight"):
            torchinit.verify(sharded)  # a DTensor parameter is a parameter (inf is allowed in buffers only)
    finally:
        dist.destroy_process_group()


def test_unwritten_empty_init_memory_is_found_by_verify():
    with torchinit.nan_poison(), torchinit.Fabric(accelerator="cpu").init_module(empty_init=True):
        model = nn.Linear(2, 2)
    with pytest.raises(torchinit.VerificationError, match="never written.*weight, bias"):
        torchinit.verify(model, check_values=False)


@pytest.mark.parametrize("path", ["init", "checkpoint", "partial-checkpoint", "empty-init-setup", "empty-init-load"])
def test_nan_poison_finds_nothing_on_any_path(path):
    """G5: fresh memory is NaN before it is filled; after each path not one NaN is left anywhere."""
    want = eager(llama, torch.bfloat16)
    partial = {k: v for k, v in want.state_dict().items() if "mlp" not in k}
    fabric = torchinit.Fabric(accelerator="cpu", precision="bf16-true")
    with torchinit.nan_poison(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path.startswith("empty-init"):
            with fabric.init_module(empty_init=True):
                model = llama()
            if path == "empty-init-load":
                model.load_state_dict(partial, strict=False)
            model = fabric.setup(model).module
        else:
            model = on_meta(llama, torch.bfloat16)
            checkpoint = {"init": None, "checkpoint": want.state_dict(), "partial-checkpoint": partial}[path]
            torchinit.materialize(model, "cpu", torch.bfloat16, checkpoint=checkpoint,
                                  init_fns={nn.Module: model._init_weights})
    for name, t in tensors(model).items():
        assert t.device.type == "cpu" and not (t.is_floating_point() and t.isnan().any()), name


def test_meta_context_nesting_and_parameter_attributes():
    with torchinit.InitContext("cpu", torch.float32, meta=True):
        layer = nn.Linear(2, 2)
        with pytest.raises(ValueError, match="meta=True"):
            with torchinit.InitContext("cpu", torch.float32):
                pass
        frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        frozen.tag = "kept"
        layer.frozen = frozen
    assert layer.weight.device.type == "meta" and not layer.frozen.requires_grad and layer.frozen.tag == "kept"
    torchinit.materialize(layer, "cpu", checkpoint={"frozen": torch.ones(2)})
    assert layer.frozen.tag == "kept" and not layer.frozen.requires_grad


class Raising(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.empty(2))

    def reset_parameters(self):
        raise ValueError("broken init")


class WrongShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.empty(2))

    def reset_parameters(self):
        self.w = nn.Parameter(torch.ones(3))


@pytest.mark.parametrize("build, match", [
    (Raising, r"The init of '1' \(Raising\) raised ValueError: broken init"),
    (WrongShape, r"The init of WrongShape replaced 1\.w with shape \(3,\); the module declared \(2,\)"),
])
def test_a_failing_init_is_named_and_the_model_stays_meta(build, match):
    model = user_meta(lambda: nn.Sequential(nn.Linear(2, 2), build()))
    ids = objects(model)
    with pytest.raises(torchinit.MaterializeError, match=match):
        torchinit.materialize(model, "cpu")
    assert objects(model) == ids and all(t.device.type == "meta" for t in tensors(model).values())


def test_a_weak_reference_to_a_meta_parameter_is_a_clear_error():
    import weakref

    model = user_meta(lambda: nn.Linear(2, 2))
    ref = weakref.ref(model.weight)
    with pytest.raises(torchinit.MaterializeError, match=r"shape \(2, 2\) in place.*weak references"):
        torchinit.materialize(model, "cpu")
    assert ref() is model.weight and model.weight.device.type == "meta"
