"""Lightning's strategy arguments at work, with real processes (gloo on CPU, 2 ranks): activation checkpointing,
the sharding strategies' meshes, `state_dict_type="full"`, `sync_module_states`, DDP's `find_unused_parameters`."""

import zipfile

import pytest
import torch
from dist_workers import tiny_llama
from strategy_workers import ddp_unused_parameters, fsdp_lightning_arguments, sync_module_states
from test_distributed import deadline, deadline_guard  # noqa: F401  (the hang guard, also for fixtures)
from test_exact import eager

import torchinit


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("full") / "state.pt"
    with deadline_guard():
        out = torchinit.Fabric(accelerator="cpu", strategy="fsdp", devices=2).launch(fsdp_lightning_arguments, path)
    return out, path


def test_activation_checkpointing_recomputes_each_block_with_the_same_gradients(run):
    plain, checkpointed = run[0]["checkpointing"]["plain"], run[0]["checkpointing"]["checkpointed"]
    blocks = len(tiny_llama().layers)
    assert plain[2] == blocks and checkpointed[2] == 2 * blocks, "each Block's forward ran again in backward"
    assert plain[0] == checkpointed[0]
    assert plain[1].keys() == checkpointed[1].keys()
    assert all(torch.equal(plain[1][k], checkpointed[1][k]) for k in plain[1]), "gradients bit for bit"


def test_shard_grad_op_keeps_parameters_gathered_after_forward(run):
    assert run[0]["kept after forward"] == {"FULL_SHARD": False, "SHARD_GRAD_OP": True}


def test_hybrid_meshes_place_replicas_and_shards_and_keep_eager_values(run):
    meshes = run[0]["meshes"]
    assert {k: (v["shape"], v["placements"], v["local"]) for k, v in meshes.items()} == {
        "HYBRID_SHARD (1, 2)": ((1, 2), ["R", "S(0)"], (64, 128)),  # q_proj is 128 x 128: half the rows each
        "HYBRID_SHARD (2, 1)": ((2, 1), ["R", "S(0)"], (128, 128)),  # two replicas of one shard
        "NO_SHARD None": ((2, 1), ["R", "S(0)"], (128, 128)),  # replicated on every rank, as DDP
    }
    want = dict(eager(tiny_llama, torch.float32).named_parameters())
    for name, mesh in meshes.items():
        assert all(torch.equal(v, want[k]) for k, v in mesh["full"].items()), name
    assert len({mesh["loss"] for mesh in meshes.values()}) == 1, "one step's loss does not depend on the mesh"


def test_full_state_dict_is_one_file_that_torch_load_reads(run):
    full, path = run[0]["full"], run[1]
    assert full["files"] == [[path.name], [path.name]], "one file, no temporary left"
    saved = torch.load(path, weights_only=True)
    assert saved.keys() == {"model", "optimizer", "step", "extra"} and saved["step"] == 3
    assert torch.equal(saved["extra"]["t"], torch.arange(3))
    assert saved["model"].keys() == {*full["saved"], "lm_head.weight"}
    assert all(torch.equal(saved["model"][k], v) for k, v in full["saved"].items())
    tied = saved["model"]["lm_head.weight"], saved["model"]["embed.weight"]
    assert tied[0].untyped_storage().data_ptr() == tied[1].untyped_storage().data_ptr(), "the tie stored once"
    state = saved["optimizer"]["state"]  # by parameter name, as Lightning's full optimizer state
    assert saved["optimizer"]["param_groups"][0]["params"] == list(full["saved"])
    assert all(torch.equal(state[k]["exp_avg"], v) for k, v in full["moments"].items())
    mapped = torch.load(path, weights_only=True, mmap=True)
    assert all(torch.equal(mapped["model"][k], v) for k, v in full["saved"].items())
    assert zipfile.ZipFile(path).testzip() is None, "every record's CRC-32 is right"


def test_full_state_dict_is_streamed_one_tensor_at_a_time(run):
    events = run[0]["full"]["events"]
    gathers = [i for i, e in enumerate(events) if e == "gather"]
    assert len(gathers) == len(run[0]["full"]["saved"]) + 2 * len(run[0]["full"]["moments"]), "weights, 2 moments"
    assert all(events[i + 1] == "write" for i in gathers), "rank 0 writes each gathered tensor before the next"


def test_full_state_dict_loads_back_into_fsdp(run):
    full = run[0]["full"]
    assert all(torch.equal(full["loaded"][k], v) for k, v in full["saved"].items())
    assert full["step"] == 3 and set(full["rest"]) == {"extra"}
    assert full["continued"][0] == full["continued"][1], "the next step after loading is the step after saving"


def test_sync_module_states_shards_rank_zeros_values():
    out = torchinit.Fabric(accelerator="cpu", strategy="fsdp", devices=2).launch(sync_module_states)
    (original, unsynced), (rank_zero, synced) = out[False], out[True]
    assert all(torch.equal(synced[k], rank_zero[k]) for k in rank_zero)
    assert not all(torch.equal(unsynced[k], original[k]) for k in original), "without it: a mix of both ranks"


def test_ddp_find_unused_parameters_trains_a_model_with_an_unused_branch():
    out = torchinit.Fabric(accelerator="cpu", strategy="ddp", devices=2).launch(ddp_unused_parameters)
    assert out == {"find_unused": True, "backend": "gloo"}
