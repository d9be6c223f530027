"""The one streamed file (checkpoint/full_save.py) in one process: what `torch.load` reads from it, ties, the filter,
and failures that leave the checkpoint already there as it was. The sharded, two-process case is in
test_strategy_arguments.py."""

import errno
import os
import zipfile

import pytest
import torch
from torch import nn

import torchinit
from torchinit.checkpoint import full_save


def trained(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4), nn.Linear(4, 5, bias=False))
    model[2].weight = model[0].weight  # tied, as an LM head
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.tensor([1, 2])).sum().backward()
    optimizer.step()
    return model, optimizer


def test_torch_load_reads_the_state_with_ties_and_named_optimizer_state(tmp_path):
    model, optimizer = trained()
    path = tmp_path / "state.pt"
    full_save.save_full(path, {"model": model, "optimizer": optimizer, "iter_num": 7, "data": [torch.arange(4)]})
    saved = torch.load(path, weights_only=True)
    assert saved["iter_num"] == 7 and torch.equal(saved["data"][0], torch.arange(4))
    assert saved["model"].keys() == model.state_dict().keys()
    assert all(torch.equal(saved["model"][k], v) for k, v in model.state_dict().items())
    assert saved["model"]["2.weight"].untyped_storage().data_ptr() == saved["model"]["0.weight"].untyped_storage(
    ).data_ptr(), "the tie stored once"
    assert saved["optimizer"]["param_groups"][0]["params"] == ["0.weight", "1.weight", "1.bias"]
    assert torch.equal(saved["optimizer"]["state"]["1.bias"]["exp_avg"], optimizer.state[model[1].bias]["exp_avg"])
    assert zipfile.ZipFile(path).testzip() is None
    assert os.listdir(tmp_path) == ["state.pt"]

    fresh, fresh_optimizer = trained(seed=1)  # and fabric.load reads it back, optimizer state by name
    state = {"model": fresh, "optimizer": fresh_optimizer, "iter_num": 0}
    torchinit.Fabric(accelerator="cpu").load(path, state)
    pairs = zip(fresh.parameters(), model.parameters(), strict=True)
    assert state["iter_num"] == 7 and all(torch.equal(a, b) for a, b in pairs)
    assert torch.equal(fresh_optimizer.state[fresh[1].bias]["exp_avg"], optimizer.state[model[1].bias]["exp_avg"])


def test_the_filter_keeps_what_it_accepts(tmp_path):
    model, _ = trained()
    path = tmp_path / "lora.pt"
    full_save.save_full(path, {"model": model}, filter={"model": lambda name, value: name.startswith("1.")})
    assert list(torch.load(path, weights_only=True)["model"]) == ["1.weight", "1.bias"]


class Box:
    def __init__(self):
        self.t = torch.ones(2)


def test_a_tensor_hidden_in_an_object_is_refused_and_the_old_file_kept(tmp_path):
    model, _ = trained()
    path = tmp_path / "state.pt"
    full_save.save_full(path, {"model": model})
    before = path.read_bytes()
    with pytest.raises(torchinit.ArgumentTypeError, match="inside an object that is not a dict"):
        full_save.save_full(path, {"model": model, "box": Box()})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["state.pt"]


def test_a_full_disk_is_a_save_error_and_the_old_file_kept(tmp_path, monkeypatch):
    model, _ = trained()
    path = tmp_path / "state.pt"
    full_save.save_full(path, {"model": model})
    before = path.read_bytes()

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(full_save.os, "pwrite", full)
    with pytest.raises(torchinit.SaveError, match="No space left on device") as caught:
        full_save.save_full(path, {"model": model})
    assert caught.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["state.pt"]
