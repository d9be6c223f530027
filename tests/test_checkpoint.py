"""Checkpoint loading: every format into real, empty-init and meta models, exactly; every bad input one clear error."""

import importlib.util
import json
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import assert_bitwise_equal, tensors
from safetensors.torch import save_file
from test_exact import eager, gpt2, llama
from test_materialize import llama_tied, on_meta
from torch import nn

import torchinit
from torchinit.checkpoint.inspect import main as inspect_main


def unique(state):
    """safetensors refuses shared tensors: keep the first name of each (as transformers does for ties)."""
    seen, out = set(), {}
    for key, value in state.items():
        if value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            out[key] = value.contiguous()
    return out


def write(fmt, state, folder):
    """Write `state` in format `fmt`; returns the path to load."""
    if fmt == "safetensors":
        save_file(unique(state), folder / "model.safetensors")
        return folder / "model.safetensors"
    if fmt == "sharded-safetensors":
        items = list(unique(state).items())
        half = len(items) // 2
        weight_map = {}
        for i, part in enumerate((items[:half], items[half:])):
            name = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file(dict(part), folder / name)
            weight_map.update({k: name for k, _ in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return folder
    if fmt == "sharded-bin":
        items = list(state.items())
        weight_map = {}
        for i, part in enumerate((items[:3], items[3:])):
            name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
            torch.save(dict(part), folder / name)
            weight_map.update({k: name for k, _ in part})
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return folder / "pytorch_model.bin.index.json"
    if fmt == "pt":
        torch.save(state, folder / "model.pt")
        return folder / "model.pt"
    if fmt == "lightning-ckpt":  # nested and prefixed, as Lightning saves a LightningModule holding `self.model`
        torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}, folder / "last.ckpt")
        return folder / "last.ckpt"
    if fmt == "dcp":  # torch.distributed.checkpoint, one process; the model nested as fabric.save puts it
        dcp_save({"model": dict(state), "epoch": 3}, folder / "dcp")
        return folder / "dcp"
    raise AssertionError(fmt)


def dcp_save(state, folder):
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=folder)


FORMATS = ["safetensors", "sharded-safetensors", "sharded-bin", "pt", "lightning-ckpt", "dcp"]


def target(kind, build, dtype):
    if kind == "meta":
        return on_meta(build, dtype)
    if kind == "empty":
        with torchinit.InitContext("cpu", dtype, empty_init=True):
            return build()
    torch.manual_seed(123)  # other values than the checkpoint's
    return build().to(dtype)


@pytest.mark.parametrize("kind", ["meta", "empty", "real"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("build", [llama_tied, gpt2], ids=lambda b: b.__name__)
def test_every_format_into_every_target_is_exact(build, fmt, kind, tmp_path):
    want = eager(build, torch.bfloat16)
    path = write(fmt, want.state_dict(), tmp_path)
    with torchinit.nan_poison():
        model = target(kind, build, torch.bfloat16)
        ties, ids = torchinit.tie_groups(model), {n: id(t) for n, t in tensors(model).items()}
        report = torchinit.load_checkpoint(model, path, dtype=torch.bfloat16)
    assert_bitwise_equal(model, want)
    assert torchinit.tie_groups(model) == ties and {n: id(t) for n, t in tensors(model).items()} == ids
    assert not report.missing and not report.unexpected and not report.initialized
    assert report.bytes > 0


def test_fp32_checkpoint_into_a_bf16_meta_model_is_cast(tmp_path):
    want = eager(llama, torch.float32)
    path = write("safetensors", want.state_dict(), tmp_path)
    model = on_meta(llama, torch.bfloat16)
    torchinit.load_checkpoint(model, path, dtype=torch.bfloat16)
    assert_bitwise_equal(model, eager(llama, torch.bfloat16))


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_wrapper_prefixes_are_removed_and_key_map_renames(prefix, tmp_path):
    want = eager(llama, torch.float32)
    path = write("pt", {prefix + k: v for k, v in want.state_dict().items()}, tmp_path)
    model = on_meta(llama)
    torchinit.load_checkpoint(model, path)
    assert_bitwise_equal(model, want)
    renamed = write("safetensors", {k.replace("model.", "base."): v for k, v in want.state_dict().items()}, tmp_path)
    model = on_meta(llama)
    torchinit.load_checkpoint(model, renamed, key_map=lambda k: k.replace("base.", "model."))
    assert_bitwise_equal(model, want)


def test_strict_names_missing_and_unexpected_and_changes_nothing(tmp_path):
    state = eager(llama, torch.float32).state_dict()
    state.pop("lm_head.weight")
    state["extra.weight"] = torch.ones(2)
    path = write("safetensors", state, tmp_path)
    model = on_meta(llama)
    with pytest.raises(torchinit.CheckpointError, match=r"model\.safetensors.*Missing: lm_head\.weight\. "
                                                         r"Unexpected: extra\.weight"):
        torchinit.load_checkpoint(model, path)
    assert all(t.device.type == "meta" for t in model.parameters())


def test_not_strict_initializes_what_is_missing_and_reports_it(tmp_path):
    want = eager(llama, torch.float32)
    state = {k: v for k, v in want.state_dict().items() if "layers.1.mlp" not in k}
    path = write("safetensors", state, tmp_path)
    with torchinit.nan_poison():
        model = on_meta(llama)
        with pytest.warns(UserWarning, match="_init_weights"):
            report = torchinit.load_checkpoint(model, path, strict=False)
    assert report.missing == sorted(k for k in want.state_dict() if "layers.1.mlp" in k)
    assert sorted(report.initialized) == report.missing
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(not p.isnan().any() for p in model.parameters())


@pytest.mark.parametrize("how", ["empty init", "record"])
def test_not_strict_reports_what_it_filled_with_eager_values(how, tmp_path):
    """Issue 19 item 7: tensors filled from the record (eager's values) were missing from `initialized`."""
    want = eager(llama, torch.bfloat16)
    state = {k: v for k, v in want.state_dict().items() if "layers.1.mlp" not in k}
    path = write("safetensors", state, tmp_path)
    torch.manual_seed(0)
    if how == "empty init":
        with torchinit.Fabric(accelerator="cpu", precision="bf16-true").init_module(empty_init=True):
            model = llama()
    else:
        with torchinit.RecordContext("cpu", torch.bfloat16):
            model = llama()
    report = torchinit.load_checkpoint(model, path, strict=False)
    assert report.missing == sorted(k for k in want.state_dict() if "layers.1.mlp" in k)
    keys = want.state_dict()
    assert sorted(k for k in report.initialized if k in keys) == report.missing
    extra = {k for k in report.initialized if k not in keys}  # a meta model's non-persistent buffers (RoPE)
    assert extra <= dict(model.named_buffers()).keys() and (how == "record") == bool(extra)
    assert_bitwise_equal(model, want)


def test_shape_mismatch_is_an_error_naming_the_key(tmp_path):
    state = eager(llama, torch.float32).state_dict()
    state["lm_head.weight"] = torch.ones(3, 3)
    path = write("pt", state, tmp_path)
    model = on_meta(llama)
    with pytest.raises(torchinit.CheckpointError, match=r"lm_head\.weight \(checkpoint \[3, 3\], model \[96, 64\]\)"):
        torchinit.load_checkpoint(model, path, strict=False)
    assert all(t.device.type == "meta" for t in model.parameters())


def test_corrupt_and_truncated_files_are_named(tmp_path):
    path = write("safetensors", {"w": torch.ones(1000)}, tmp_path)
    data = path.read_bytes()
    cases = {
        "truncated": data[:-100],
        "garbage header": (20).to_bytes(8, "little") + b"{not json" + b" " * 11 + data[28:],
        "huge header": (2**40).to_bytes(8, "little") + data[8:],
        "tiny": b"abc",
    }
    for name, content in cases.items():
        bad = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(torchinit.CheckpointError, match=bad.name):
            torchinit.load_checkpoint(nn.Module(), bad, strict=False)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "config": Evil()}, path)
    with pytest.raises(torchinit.CheckpointError, match="evil.pt.*weights_only=True"):
        torchinit.load_checkpoint(nn.Linear(2, 1), path)


class Evil:
    pass


def test_missing_shard_and_unknown_layouts(tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    write("sharded-safetensors", eager(llama, torch.float32).state_dict(), folder)
    next(folder.glob("model-00002*")).unlink()
    with pytest.raises(torchinit.CheckpointError, match=r"model-00002-of-00002\.safetensors"):
        torchinit.load_checkpoint(on_meta(llama), folder)
    with pytest.raises(torchinit.CheckpointError, match="no such file"):
        torchinit.open_checkpoint(tmp_path / "nope.safetensors")
    nested = tmp_path / "nested.pt"
    torch.save({"epoch": 1, "optimizer": {"lr": 0.1}}, nested)
    with pytest.raises(torchinit.CheckpointError, match="select="):
        torchinit.open_checkpoint(nested)
    torch.save({"weights": {"w": torch.ones(2)}}, nested)
    assert list(torchinit.open_checkpoint(nested, select="weights")) == ["w"]


def test_inspect_reads_headers_only(tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    write("sharded-safetensors", eager(llama, torch.bfloat16).state_dict(), folder)
    done = subprocess.run([sys.executable, "-m", "torchinit.cli", "inspect", str(folder), "--limit", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "in 2 file(s)" in done.stdout and "bfloat16" in done.stdout
    assert "model.embed_tokens.weight" in done.stdout and "[96, 64]" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "torchinit.cli", "inspect", str(tmp_path / "missing.pt")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "no such file" in bad.stdout


def test_fabric_load_raw_into_an_empty_model_and_an_optimizer(tmp_path):
    fabric = torchinit.Fabric(accelerator="cpu", precision="bf16-true")
    want = eager(llama, torch.bfloat16)
    path = write("safetensors", want.state_dict(), tmp_path)
    with torchinit.nan_poison(), fabric.init_module(empty_init=True):
        module = llama()
    report = fabric.load_raw(path, module)
    assert report.loaded and not report.missing
    model = fabric.setup(module)
    assert_bitwise_equal(model.module, want)
    fabric.load_raw(path, model)  # after setup too
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    torch.save(optimizer.state_dict() | {"param_groups": [{**optimizer.param_groups[0], "lr": 0.25,
                                                           "params": list(range(len(optimizer.param_groups[0]
                                                                                    ["params"])))}]},
               tmp_path / "opt.pt")
    fabric.load_raw(tmp_path / "opt.pt", optimizer)
    assert optimizer.param_groups[0]["lr"] == 0.25


def test_sharded_strategies_load_any_state_and_check_what_they_are_given(tmp_path):
    """The round trips run with real processes (test_sharded_checkpoint.py); the checks before them need none."""
    path = write("pt", {"weight": torch.ones(1, 2), "bias": torch.ones(1)}, tmp_path)
    fsdp = torchinit.Fabric(accelerator="cpu", strategy="fsdp")
    with pytest.raises(ValueError, match=r"strategy='fsdp' reads shards.*state=\{'model': model"):
        fsdp.load(path)
    model = nn.Linear(2, 1)
    fsdp.load(path, {"model": model})  # a plain state dict is the one module's weights, under any strategy
    assert torch.equal(model.weight, torch.ones(1, 2)) and torch.equal(model.bias, torch.ones(1))
    (tmp_path / "empty").mkdir()
    with pytest.raises(torchinit.CheckpointError, match="empty: cannot tell which checkpoint to load"):
        fsdp.load(tmp_path / "empty", {"model": model})


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_deepspeed_saves_through_its_engine_only(tmp_path):
    path = write("pt", {"weight": torch.ones(1, 2), "bias": torch.ones(1)}, tmp_path)
    deepspeed = torchinit.Fabric(accelerator="cpu", strategy="deepspeed_stage_3")
    with pytest.raises(RuntimeError, match="engine, which does not exist yet"):
        deepspeed.save(tmp_path / "state", {"model": nn.Linear(2, 1)})
    with pytest.raises(TypeError, match="module or a torch optimizer"):
        deepspeed.load_raw(path, object())


def test_dcp_folders_pick_their_state_like_pickles_and_name_what_is_wrong(tmp_path, capsys):
    want = eager(llama, torch.float32)
    flat, nested, odd = tmp_path / "flat", tmp_path / "nested", tmp_path / "odd"
    dcp_save(want.state_dict(), flat)
    dcp_save({"net": want.state_dict(), "opt": {"lr": 0.1, "m": torch.ones(2)}}, nested)
    dcp_save({"a": {"w": torch.ones(2)}, "b": {"w": torch.ones(2)}}, odd)
    model = on_meta(llama)
    report = torchinit.load_checkpoint(model, flat)
    assert_bitwise_equal(model, want)
    assert report.bytes == sum(v.numel() * 4 for v in want.state_dict().values())
    model = on_meta(llama)
    torchinit.load_checkpoint(model, nested, select="net")
    assert_bitwise_equal(model, want)
    with pytest.raises(torchinit.CheckpointError, match=r"odd: found no state dict.*'a', 'b'.*select="):
        torchinit.open_checkpoint(odd)
    with pytest.raises(torchinit.CheckpointError, match=r"nested: has no entry 'model' to select.*'net', 'opt'"):
        torchinit.open_checkpoint(nested, select="model")
    assert torchinit.open_checkpoint(nested, select="opt")["m"].tolist() == [1.0, 1.0]
    with pytest.raises(torchinit.CheckpointError, match=r"nested: does not match the model.*Missing: lm_head\.weight"):
        torchinit.load_checkpoint(on_meta(llama), nested, select="net", key_map={"lm_head.weight": "head"})

    assert inspect_main([str(nested), "--select", "net", "--limit", "0"]) == 0
    listing = capsys.readouterr().out
    assert "metadata format: torch.distributed.checkpoint" in listing and "entries: net, opt" in listing
    assert "model.embed_tokens.weight" in listing and "[96, 64]" in listing

    next(flat.glob("*.distcp")).unlink()
    with pytest.raises(torchinit.CheckpointError, match=r"flat: its \.metadata names file\(s\) that are not in the "
                                                         r"folder: __0_0\.distcp"):
        torchinit.load_checkpoint(on_meta(llama), flat)


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_fabric_save_and_load_round_trip_into_a_meta_model(suffix, tmp_path):
    fabric = torchinit.Fabric(accelerator="cpu", precision="bf16-true", seed=0)
    with fabric.init_module():
        module = llama_tied()
    model = fabric.setup(module)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-3))
    fabric.backward(model(torch.tensor([[1, 2, 3]])).logits.float().mean())
    optimizer.step()
    path = tmp_path / f"state{suffix}"
    full = suffix == ".ckpt"
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 7} if full else {"model": model})

    restored = on_meta(llama_tied, torch.bfloat16)
    again = torch.optim.AdamW(restored.parameters(), lr=1e-3)
    state = {"model": restored, "optimizer": again, "step": 0} if full else {"model": restored}
    extra = fabric.load(path, state)
    assert_bitwise_equal(restored, module)
    assert restored.lm_head.weight is restored.model.embed_tokens.weight
    if full:
        assert state["step"] == 7 and extra == {}
        assert again.state_dict()["state"][0]["exp_avg"].shape == module.model.embed_tokens.weight.shape
        assert set(fabric.load(path)) == {"model", "optimizer", "step"}


def test_save_is_atomic(tmp_path):
    fabric = torchinit.Fabric(accelerator="cpu")
    path = tmp_path / "state.pt"
    fabric.save(path, {"model": nn.Linear(2, 2)})
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="cannot pickle"):
        fabric.save(path, {"model": nn.Linear(2, 2), "bad": Unpicklable()})
    assert path.read_bytes() == before, "the earlier file is untouched"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"], "no temporary file left behind"
    with pytest.raises(ValueError, match="one module"):
        fabric.save(tmp_path / "two.safetensors", {"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
    with pytest.raises(KeyError, match="optimizer"):
        fabric.load(path, {"model": nn.Linear(2, 2), "optimizer": torch.optim.SGD(nn.Linear(2, 2).parameters(), 0.1)})


@pytest.mark.parametrize("fmt", ["pt", "sharded-bin"])
def test_without_mmap_for_network_filesystems(fmt, tmp_path):
    want = eager(llama, torch.float32)
    path = write(fmt, want.state_dict(), tmp_path)
    model = on_meta(llama)
    torchinit.load_checkpoint(model, path, mmap=False)
    assert_bitwise_equal(model, want)


def test_progress_bar_shows_only_for_slow_loads_on_a_terminal():
    from torchinit.checkpoint.safetensors import _progress

    with _progress(100) as bar:  # pytest's output is not a terminal: created disabled, updates are no-ops
        bar.update(100)
    assert getattr(bar, "disable", True)


def test_ambiguous_prefixes_need_a_key_map(tmp_path):
    model = nn.Linear(2, 2, bias=False)
    path = write("pt", {"module.weight": torch.ones(2, 2), "model.weight": torch.zeros(2, 2)}, tmp_path)
    with pytest.raises(torchinit.CheckpointError, match="several prefixes.*key_map"):
        torchinit.load_checkpoint(model, path, strict=False)
    torchinit.load_checkpoint(model, path, strict=False, key_map={"module.weight": "weight"})
    assert torch.equal(model.weight, torch.ones(2, 2))


def test_folders_that_do_not_say_what_to_load(tmp_path):
    two = tmp_path / "two"
    two.mkdir()
    torch.save({"w": torch.ones(1)}, two / "a.pt")
    torch.save({"w": torch.ones(1)}, two / "b.pt")
    with pytest.raises(torchinit.CheckpointError, match=r"two: cannot tell which.*a\.pt"):
        torchinit.open_checkpoint(two)
    dcp = tmp_path / "dcp"
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(b"")
    with pytest.raises(torchinit.CheckpointError, match="dcp: a torch.distributed.checkpoint folder whose .metadata "
                                                        "cannot be read.*did not finish or the folder is damaged"):
        torchinit.open_checkpoint(dcp)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text("{not json")
    with pytest.raises(torchinit.CheckpointError, match="model.safetensors.index.json: not a valid checkpoint index"):
        torchinit.open_checkpoint(index)


def test_fabric_load_checks_what_it_is_given(tmp_path):
    fabric = torchinit.Fabric(accelerator="cpu")
    fabric.save(tmp_path / "state.pt", {"model": nn.Linear(2, 2), "step": 3})
    with pytest.raises(torchinit.CheckpointError, match="state.pt: the entry is a int, not a state dict of tensors"):
        fabric.load(tmp_path / "state.pt", {"step": nn.Linear(2, 2)})
    fabric.save(tmp_path / "model.safetensors", {"model": nn.Linear(2, 2)})
    with pytest.raises(ValueError, match="holds one module"):
        fabric.load(tmp_path / "model.safetensors", {"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})


def test_dtensors_get_their_part_and_partial_sums_are_refused(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        holder = nn.Module()
        holder.w = nn.Parameter(distribute_tensor(torch.zeros(4), mesh, [Replicate()]))
        path = write("pt", {"w": torch.arange(4.0)}, tmp_path)
        torchinit.load_checkpoint(holder, path)
        assert torch.equal(holder.w.to_local(), torch.arange(4.0)), "replicated: the whole value"
        holder.w = nn.Parameter(DTensor.from_local(torch.zeros(4), mesh, [Partial()]))  # (distribute_tensor: 2.9+)
        with pytest.raises(torchinit.CheckpointError, match=r"pt: cannot load 'w' into a DTensor .*partial sums"):
            torchinit.load_checkpoint(holder, path)
        assert torch.equal(holder.w.to_local(), torch.zeros(4)), "unchanged"
    finally:
        torch.distributed.destroy_process_group()
