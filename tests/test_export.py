"""fabric.save(format="safetensors") on sharded models (FSDP2, ZeRO-3; 2 gloo ranks): a transformers-style
folder written by every rank into the final files, read back exactly by `safetensors` and
`transformers.AutoModel.from_pretrained`."""

import importlib.util
import json

import pytest
import torch
from export_workers import export
from safetensors.torch import load_file
from test_distributed import deadline, deadline_guard  # noqa: F401  (the hang guard, also for fixtures)

import torchinit

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    with deadline_guard(300):
        fabric = torchinit.Fabric(accelerator="cpu", strategy="fsdp", devices=2, precision="bf16-true", seed=0)
        return fabric.launch(export, str(folder)) | {"folder": folder}


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
@pytest.mark.parametrize("shards", ["one", "many"])
def test_safetensors_reads_the_folder_exactly(exported, strategy, shards):
    folder, want = exported["folder"] / f"{strategy}-{shards}", exported[strategy]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == files
    assert (len(files) == 1) == (shards == "one") and files[0].endswith(f"-of-{len(files):05d}.safetensors")
    got = {k: v for f in files for k, v in load_file(folder / f).items()}
    tied = strategy == "zero3"
    assert set(got) == set(want) - ({"lm_head.weight"} if tied else set()), "a tied tensor is stored once"
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in got.values())
    if shards == "many":  # each rank wrote its shards' bytes (rank 0 also the few replicated ones), none all
        written, total = exported[f"{strategy} bytes"], index["metadata"]["total_size"]
        assert sum(written) == total and max(written) < 0.6 * total, written


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_transformers_from_pretrained_reads_the_folder_exactly(exported, strategy):
    from transformers import AutoModel, AutoModelForCausalLM

    folder, want = exported["folder"] / f"{strategy}-many", exported[strategy]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama"
    causal = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, local_files_only=True)
    assert all(torch.equal(v, want[k]) for k, v in causal.state_dict().items())
    base = AutoModel.from_pretrained(folder, dtype=torch.bfloat16, local_files_only=True)
    assert all(torch.equal(v, want["model." + k]) for k, v in base.state_dict().items())


def test_a_failed_export_leaves_nothing_and_says_where(exported):
    errors = exported["errors"]
    assert "format='safetensors' saves one module's tensors; this state has ['model', 'step']" in errors["two things"]
    assert "format='onnx' is not supported" in errors["format"]
    assert "failed on rank 1 (SaveError: [Errno 28]" in errors["rank 1 fails"]  # the full-disk error, named
    assert "no temporary file was left behind" in errors["rank 1 fails"]
    assert exported["leftovers"] == ["fsdp-many", "fsdp-one", "zero3-many", "zero3-one"], "no temporary left"


def test_one_process_export_and_what_safetensors_cannot_hold(tmp_path):
    fabric = torchinit.Fabric(accelerator="cpu")
    model = torch.nn.Linear(3, 2)
    fabric.save(tmp_path / "out", {"model": model}, format="safetensors")
    got = load_file(tmp_path / "out" / "model-00001-of-00001.safetensors")
    assert got.keys() == {"weight", "bias"} and all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    model.register_buffer("phase", torch.ones(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"out2: safetensors cannot hold phase \(torch.complex64\)"):
        fabric.save(tmp_path / "out2", {"model": model}, format="safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
