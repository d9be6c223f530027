"""Recorded init: built on fake tensors, replayed on real memory — the eager model's values, bit for bit (G3)."""

import gc
import weakref

import numpy as np
import pytest
import torch
import transformers as tf
from conftest import assert_bitwise_equal, on_fake_ranks, tensors
from test_exact import eager
from torch import nn
from torch.overrides import _get_current_function_mode_stack
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

import torchinit
from torchinit.record.recording import _RECORDS, records_of

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=100)
MODELS = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL)),
    "llama-tied": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL, tie_word_embeddings=True)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32,
                                                     bos_token_id=0, eos_token_id=0)),
    "bert": lambda: tf.BertModel(tf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                               intermediate_size=128, vocab_size=100)),
    "t5": lambda: tf.T5ForConditionalGeneration(tf.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
                                                            vocab_size=100)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**SMALL)),
    "mixtral-moe": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**SMALL, num_local_experts=4)),
    "torch-layers": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Embedding(10, 4, padding_idx=0),
                                          nn.MultiheadAttention(8, 2), nn.LayerNorm(8), nn.GRU(4, 4)),
}


def recorded(build, device="cpu", dtype=None, seed=0):
    torch.manual_seed(seed)
    with torchinit.RecordContext(device, dtype):
        return build()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", MODELS)
def test_real_models_replay_bit_for_bit(name, dtype):
    build = MODELS[name]
    model = recorded(build, dtype=dtype)
    assert all(t.device.type == "meta" for t in tensors(model).values()), "no memory before materialize"
    ids, ties = {n: id(t) for n, t in tensors(model).items()}, torchinit.tie_groups(model)
    with torchinit.nan_poison():
        report = torchinit.materialize(model)
    assert report.from_record and not report.from_init and not report.kept
    reference = eager(build, dtype)
    assert_bitwise_equal(model, reference)
    assert {n: id(t) for n, t in tensors(model).items()} == ids, "the same Parameter and buffer objects"
    if name == "torch-layers":  # RNN keeps a list of its weights: it must hold the parameters, not fakes
        x = torch.randn(2, 3, 4, dtype=dtype)
        assert torch.equal(model[5](x)[0], reference[5](x)[0])
    assert torchinit.tie_groups(model) == ties


class Hard(nn.Module):
    """Every construction pattern the issue names."""

    def __init__(self, outside: torch.Tensor):
        super().__init__()
        self.trunc = nn.Parameter(torch.empty(6, 5))
        nn.init.trunc_normal_(self.trunc, std=0.5)  # a data-dependent rejection loop
        self.orthogonal = nn.Parameter(torch.empty(6, 5))
        nn.init.orthogonal_(self.orthogonal)  # QR
        self.xavier = nn.Parameter(torch.empty(6, 5))
        nn.init.xavier_uniform_(self.xavier)
        nn.init.xavier_normal_(self.xavier)
        self.kaiming = nn.Parameter(torch.empty(6, 5))
        nn.init.kaiming_normal_(self.kaiming)
        with torch.no_grad():
            self.kaiming[:, :2].zero_()  # in place, on a view
        self.factory = nn.Parameter(torch.randn(4, 4) * 0.02)
        self.factory.data = torch.randn(4, 4) + outside  # .data assignment; a real tensor from outside
        self.register_buffer("from_numpy", torch.from_numpy(np.arange(5.0)), persistent=False)
        self.register_buffer("literal", torch.tensor([1.0, 2.5, 3.25]), persistent=False)
        n = int(torch.randint(3, 7, ()).item())  # .item() on a fresh random tensor
        self.sized = nn.Parameter(torch.full((n,), torch.rand(3).tolist()[1]))  # .tolist()
        self.linear = nn.Linear(3, 3)
        nn.init.sparse_(self.linear.weight, 0.5)
        self.plain = torch.randn(3)  # a plain attribute, not registered
        from transformers import initialization  # keeps the nn.init functions it imported: recorded lower down

        self.captured = nn.Parameter(torch.empty(5, 5))
        initialization.trunc_normal_(self.captured, std=0.1)


def test_hard_cases_replay_bit_for_bit():
    outside = torch.randn(4, 4)
    original = outside.clone()
    model = recorded(lambda: Hard(outside), dtype=torch.float32)  # float64 buffers cast, as Module.to does
    outside.add_(1)  # changing it later changes nothing: the record holds a copy
    torchinit.materialize(model)
    reference = eager(lambda: Hard(original), torch.float32)
    assert_bitwise_equal(model, reference)
    assert torch.equal(model.plain, reference.plain) and model.plain.device.type == "cpu"


def test_placeholders_keep_user_attributes_and_nothing_of_the_fake_tensor():
    def build():
        m = nn.Linear(4, 4)
        m.weight.no_decay = True
        return m

    model = recorded(build)
    torchinit.materialize(model)
    assert vars(model.weight) == {"no_decay": True} and vars(model.bias) == {}


def test_replay_leaves_the_random_stream_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with torchinit.RecordContext("cpu"):
        model = nn.Linear(4, 4)
    assert torch.equal(torch.get_rng_state(), before), "recording draws no random numbers"
    torch.manual_seed(123)
    user = torch.get_rng_state()
    torchinit.materialize(model)
    assert torch.equal(torch.get_rng_state(), user), "replay draws from the recorded state, then gives it back"
    torch.manual_seed(0)
    assert torch.equal(model.weight, nn.Linear(4, 4).weight)


def test_explicit_generators_replay_from_their_recorded_state():
    def build():
        g = torch.Generator().manual_seed(5)
        m = nn.Linear(4, 4)
        nn.init.normal_(m.weight, generator=g)
        m.bias.data = torch.randn(4, generator=g)
        return m

    model = recorded(build)
    torchinit.materialize(model)
    assert_bitwise_equal(model, eager(build, torch.float32))


def test_partial_replay_then_the_rest():
    build = MODELS["llama"]
    model = recorded(build)
    torchinit.materialize(model.model.layers[1])  # later in the record: what comes before is kept for later
    torchinit.materialize(model)
    assert_bitwise_equal(model, eager(build, torch.float32))
    assert records_of(model) is None, "every value handed out: the record is released"


def test_layer_replaced_before_setup():
    build = lambda: nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))  # noqa: E731
    model = recorded(build)
    model[1] = replacement = nn.Linear(4, 4)  # real, built outside the record: kept as it is
    with torch.device("meta"):
        model[2] = nn.Linear(4, 4)  # on meta, not recorded: its own init
    before = replacement.weight.clone()
    report = torchinit.materialize(model)
    reference = eager(build, torch.float32)
    assert torch.equal(model[0].weight, reference[0].weight) and torch.equal(model[0].bias, reference[0].bias)
    assert torch.equal(model[1].weight, before)
    assert report.from_init == ["2.weight", "2.bias"]


def test_missing_keys_of_a_checkpoint_are_replayed(tmp_path):
    from safetensors.torch import save_file

    build = MODELS["llama"]
    reference = eager(build, torch.float32)
    save_file({"lm_head.weight": torch.ones(100, 64)}, tmp_path / "head.safetensors")
    model = recorded(build)
    report = torchinit.load_checkpoint(model, tmp_path / "head.safetensors", strict=False)
    assert report.loaded == ["lm_head.weight"] and torch.equal(model.lm_head.weight, torch.ones(100, 64))
    for name, value in tensors(reference).items():
        if name != "lm_head.weight":
            assert torch.equal(tensors(model)[name], value), name


class DataDependent(nn.Module):
    """Ops fake tensors cannot run: value-dependent shapes (timm's RegNet calls unique in its constructor)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5))
        self.register_buffer("picked", torch.nonzero(self.weight > 0))
        widths = torch.unique(torch.tensor([8.0, 8.0, 16.0]) * 1.5)
        self.layers = nn.ModuleList(nn.Linear(int(w), 2) for w in widths)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_dependent_ops_are_computed_for_real_and_recorded(dtype):
    torch.manual_seed(0)
    with torchinit.RecordContext("cpu", dtype):
        model = DataDependent()
    torchinit.materialize(model)
    assert_bitwise_equal(model, eager(DataDependent, dtype))


_LIBRARY = torch.library.Library("torchinit_test", "DEF")  # ops with a CPU kernel only: no fake kernel
_LIBRARY.define("scale_inplace(Tensor(a!) x) -> Tensor(a!)")
_LIBRARY.impl("scale_inplace", lambda x: x.mul_(2), "CPU")
_LIBRARY.define("scaled(Tensor x) -> Tensor")
_LIBRARY.impl("scaled", lambda x: x * 2, "CPU")


class WithoutFakeKernel(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ops.torchinit_test.scaled(torch.randn(3)))


def test_an_op_without_a_fake_kernel_is_computed_for_real_and_recorded():
    torch.manual_seed(0)
    with torchinit.RecordContext("cpu"):
        model = WithoutFakeKernel()
    torchinit.materialize(model)
    assert_bitwise_equal(model, eager(WithoutFakeKernel, torch.float32))


class MutatesWithoutFakeKernel(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))
        torch.ops.torchinit_test.scale_inplace(self.weight.data)


def test_an_op_that_cannot_be_recorded_is_named_at_record_time():
    default_device = torch.get_default_device()
    with pytest.raises(torchinit.RecordError, match=r"scale_inplace.*MutatesWithoutFakeKernel\.__init__"):
        with torchinit.RecordContext("cpu"):
            MutatesWithoutFakeKernel()
    assert torch.get_default_device() == default_device and torch.nn.init.normal_.__module__ == "torch.nn.init"
    assert not _get_current_dispatch_mode_stack() and not _is_fake_mode_on()


def _is_fake_mode_on() -> bool:
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def test_global_state_restored_at_exit_and_on_error():
    from torch._subclasses.fake_tensor import FakeTensor

    originals = dict(vars(nn.init))
    state = (torch.get_default_dtype(), torch.get_default_device(), len(_get_current_function_mode_stack()),
             len(_get_current_dispatch_mode_stack()), nn.Module._apply, FakeTensor.__dict__.get("__deepcopy__"))
    with pytest.raises(KeyError):
        with torchinit.RecordContext("cpu"):
            nn.Linear(2, 2)
            raise KeyError("user error")
    with torchinit.RecordContext("cpu", torch.bfloat16):
        assert _is_fake_mode_on()
        assert nn.Module._apply is not state[4] and "__deepcopy__" in FakeTensor.__dict__  # (record_apply.py)
    assert (torch.get_default_dtype(), torch.get_default_device(), len(_get_current_function_mode_stack()),
            len(_get_current_dispatch_mode_stack()), nn.Module._apply, FakeTensor.__dict__.get("__deepcopy__")) == state
    assert dict(vars(nn.init)) == originals and not _is_fake_mode_on()


def test_record_contexts_nest_only_with_the_same_plan():
    with torchinit.InitContext("cpu", torch.float32), pytest.raises(ValueError, match="different plan"):
        with torchinit.RecordContext("cpu"):
            pass
    with torchinit.RecordContext("cpu", torch.bfloat16), pytest.raises(ValueError, match="different plan"):
        with torchinit.RecordContext("cpu"):
            pass
    context = torchinit.RecordContext("cpu")
    with context, context:  # re-entered: the inner one does nothing
        layer = nn.Linear(2, 2)
    assert layer.weight.device.type == "meta" and records_of(layer) is not None


def test_the_record_is_freed_with_its_model():
    big = torch.ones(2**22)  # captured from outside: the record holds a 16 MiB copy

    def build():
        m = nn.Linear(4, 4)
        m.register_buffer("table", big * 2)
        return m

    model = recorded(build)
    record = records_of(model)
    copy = weakref.ref(record.record.consts[0])
    del model, record
    gc.collect()
    assert copy() is None and len(_RECORDS) == 0, "the record and its memory go with the model"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_cuda_replay_equals_eager_on_cuda(name):
    build = MODELS[name]
    model = recorded(build, device="cuda", dtype=torch.bfloat16)
    torchinit.materialize(model, "cuda")
    assert_bitwise_equal(model, eager(build, torch.bfloat16, device="cuda"))


def bundled_llama():
    from torchinit.models import Llama, config_for

    return Llama(config_for("tiny"))  # re-initializes through `.data.normal_()`


@pytest.mark.parametrize("build", [MODELS["llama"], bundled_llama], ids=["transformers", "bundled"])
def test_replay_holds_about_one_full_tensor_at_a_time(build):
    """Models initialize every weight twice (the layer's own init, then the model's scheme): the first value is
    dead, so it is freed at once, and the replay never holds the model in full."""
    model = recorded(build)
    record = records_of(model)
    largest = max(p.numel() for p in model.parameters()) * 4  # replayed in fp32
    total = sum(p.numel() for p in model.parameters()) * 4
    peak, left = allocated_peak(lambda: torchinit.materialize(model))
    assert 0 < record.peak_bytes <= 2 * largest < total / 2
    # measured, not the replay's own counter: the allocator's bytes alive at most, the model (its targets) included
    assert total <= left and total <= peak <= total + 2 * largest, (peak - total) / largest


def allocated_peak(fn) -> tuple[int, int]:
    """The most CPU memory alive at once while `fn()` runs, as the allocator saw it (torch's profiler records every
    allocation and free), and what is still alive after it, both counted from the start of `fn`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    alive = peak = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):
        alive += nbytes
        peak = max(peak, alive)
    return peak, alive


def fsdp_shards(build, change=None, empty_init=None, after_setup=None) -> list[dict[str, torch.Tensor]]:
    """FSDP with 2 ranks (the fake process group, in this process): each rank's local shards."""

    def rank(fabric):
        with fabric.init_module(empty_init=empty_init):
            module = build()
        if change is not None:
            change(module)
        model = fabric.setup(module)
        if after_setup is not None:
            after_setup(fabric, model)
        return {n: p.to_local().detach().clone() for n, p in model.named_parameters()}

    return on_fake_ranks(2, rank, precision="bf16-true", seed=0)


def stacked(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([s[key] for s in shards]) for key in shards[0]}


@pytest.mark.parametrize("name", ["llama-tied", "gpt2", "t5", "mixtral-moe"])
def test_fsdp_two_ranks_replay_eager_values(name):
    full, reference = stacked(fsdp_shards(MODELS[name])), dict(eager(MODELS[name], torch.bfloat16).named_parameters())
    assert full.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(full[key], value), key


def test_fsdp_with_a_layer_replaced_after_recording():
    """Not everything is in the record: setup goes unit by unit, replaying what the record covers."""
    build = MODELS["llama"]

    def replace(model):
        with torch.device("meta"):
            model.model.layers[1].mlp.down_proj = nn.Linear(128, 64, bias=False)

    full, reference = stacked(fsdp_shards(build, replace)), dict(eager(build, torch.bfloat16).named_parameters())
    for key, value in reference.items():
        if key != "model.layers.1.mlp.down_proj.weight":
            assert torch.equal(full[key], value), key
    assert torch.isfinite(full["model.layers.1.mlp.down_proj.weight"]).all()


def test_fsdp_empty_init_then_a_partial_checkpoint_keeps_eager_values_for_the_rest(tmp_path):
    from safetensors.torch import save_file

    build = MODELS["llama"]
    save_file({"lm_head.weight": torch.ones(100, 64)}, tmp_path / "head.safetensors")
    full = stacked(fsdp_shards(build, empty_init=True, after_setup=lambda fabric, model: fabric.load_raw(
        tmp_path / "head.safetensors", model, strict=False)))
    reference = dict(eager(build, torch.bfloat16).named_parameters())
    assert torch.equal(full["lm_head.weight"], torch.ones(100, 64, dtype=torch.bfloat16))
    for key, value in reference.items():
        if key != "lm_head.weight":
            assert torch.equal(full[key], value), f"{key}: replayed, not reset"


class Reseeds(nn.Module):
    """Seeds inside its constructor, draws in a fork of the generator, and draws after it."""

    def __init__(self):
        super().__init__()
        self.before = nn.Parameter(torch.randn(3))
        torch.manual_seed(7)
        self.weight = nn.Parameter(torch.randn(3))
        with torch.random.fork_rng():
            torch.manual_seed(11)
            self.forked = nn.Linear(4, 4)
        self.after = nn.Linear(4, 4)
        self.register_buffer("state_sum", torch.get_rng_state().sum().reshape(1).double())


@pytest.mark.parametrize("how", ["record", "init_module", "empty", "empty_partial", "empty_fp32"])
def test_reseeding_inside_the_constructor_is_replayed_where_it_happened(how):
    torch.manual_seed(0)
    want = Reseeds().to(torch.float32 if how == "empty_fp32" else torch.bfloat16)
    want_rng = torch.get_rng_state()
    torch.manual_seed(0)
    if how == "record":
        with torchinit.RecordContext("cpu", torch.bfloat16):
            model = Reseeds()
        torchinit.materialize(model)
    else:
        precision = "32-true" if how == "empty_fp32" else "bf16-true"
        fabric = torchinit.Fabric(accelerator="cpu", precision=precision)
        with fabric.init_module(empty_init=how != "init_module"):
            model = Reseeds()
        if how == "init_module":
            assert torch.equal(torch.get_rng_state(), want_rng), "the stream ends where eager's does"
        if how == "empty_partial":
            model.load_state_dict({"weight": want.weight.detach()}, strict=False)
        model = fabric.setup(model).module
    assert_bitwise_equal(model, want)


def test_a_generator_moved_in_a_way_the_record_cannot_repeat_is_an_error():
    class DrawsForReal(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3))
            torch.default_generator.manual_seed(5)  # a C method: not seen by the record

    seeding = lambda: [torch.manual_seed, torch.random.manual_seed, torch.get_rng_state, torch.cuda.manual_seed_all]  # noqa: E731
    before = seeding()  # (torch._dynamo's first import, in the first record of a process, wraps torch.manual_seed)
    torch.manual_seed(0)
    with pytest.raises(torchinit.RecordError, match="re-seeded"):
        with torchinit.RecordContext("cpu"):
            DrawsForReal()
    assert seeding() == before or torch.manual_seed.__wrapped__ is before[0], "the seeding functions are restored"
    before = seeding()
    torch.manual_seed(0)
    with pytest.raises(torchinit.RecordError, match="re-seeded"):
        with torchinit.RecordContext("cpu"):
            DrawsForReal()
    assert all(a is b for a, b in zip(seeding(), before, strict=True))


def test_modules_from_two_records_each_replay_their_own():
    first, second = recorded(MODELS["llama"], seed=0), recorded(MODELS["gpt2"], seed=1)
    combined = nn.ModuleDict({"first": first, "second": second})
    torchinit.materialize(combined)
    assert_bitwise_equal(first, eager(MODELS["llama"], torch.float32, seed=0))
    assert_bitwise_equal(second, eager(MODELS["gpt2"], torch.float32, seed=1))
