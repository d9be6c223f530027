"""SLURM (srun, one task per process): ranks from SLURM's variables, the master from its node list, the port from
MASTER_PORT or the job id, as Lightning reads them. Real processes on loopback, started as srun would start them."""

import os
import socket
import subprocess
import sys

import pytest
from test_distributed import DEADLINE, SCRIPT, deadline, rank_lines  # noqa: F401  (the hang guard)

import torchinit
from torchinit import launch
from torchinit.launch import first_host, from_environment, slurm_port

TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "LOCAL_WORLD_SIZE")


def slurm(rank, tasks=2, nodes=1, **extra):
    return {"SLURM_NTASKS": str(tasks), "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % (tasks // nodes)),
            "SLURM_NODEID": str(rank // (tasks // nodes)), "SLURM_NNODES": str(nodes),
            "SLURM_NTASKS_PER_NODE": str(tasks // nodes), "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train",
            "SLURM_NODELIST": "node[07-09,12],gpu3", **extra}


@pytest.fixture
def clean(monkeypatch):
    """No torchrun or SLURM variables; whatever the test (or the launcher) sets is removed after it."""
    for name in [*TORCHRUN, *(n for n in os.environ if n.startswith("SLURM_"))]:
        monkeypatch.setenv(name, "")  # recorded, so that the launcher's own writes are undone too
        monkeypatch.delenv(name)
    return monkeypatch


def test_the_first_host_of_a_node_list():
    assert first_host("node[01-03,07]") == "node01"
    assert first_host("node[07-09,12],gpu3") == "node07"
    assert first_host("gpu3,node[1-2]") == "gpu3"
    assert first_host("host0 host1") == "host0"
    assert first_host("rack[2-3]-gpu[05,07]") == "rack2-gpu05"
    assert first_host("127.0.0.[1-4]") == "127.0.0.1"
    assert first_host("single") == "single"


def test_the_port_is_derived_from_the_job_id_as_lightning_does():
    assert slurm_port("123456") == 15000 + 3456
    assert slurm_port("77") == 15077
    assert slurm_port(None) == 12910


def test_slurm_variables_become_ranks_and_torchruns_variables(clean):
    for name, value in slurm(3, tasks=4, nodes=2).items():
        clean.setenv(name, value)
    plan = torchinit.Fabric(accelerator="cpu", devices=2, num_nodes=2).plan
    assert from_environment(plan) == launch.Ranks(global_rank=3, local_rank=1, node_rank=1, world_size=4)
    assert {n: os.environ[n] for n in TORCHRUN} == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node07", "MASTER_PORT": str(15000 + 4242),
        "GROUP_RANK": "1", "LOCAL_WORLD_SIZE": "2"}


def test_master_address_and_port_given_win(clean):
    for name, value in slurm(0, MASTER_ADDR="10.0.0.5", MASTER_PORT="29500", SLURM_JOB_ID="1").items():
        clean.setenv(name, value)
    from_environment(torchinit.Fabric(accelerator="cpu", devices=2).plan)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.0.0.5", "29500")


def test_when_slurm_does_not_start_the_processes(clean):
    plan = torchinit.Fabric(accelerator="cpu", devices=2).plan
    for name, value in slurm(0, tasks=1, nodes=1).items():  # one task (srun python train.py): launch() starts them
        clean.setenv(name, value)
    assert from_environment(plan) is None
    for name, value in slurm(0, SLURM_JOB_NAME="interactive").items():  # an interactive allocation, as Lightning
        clean.setenv(name, value)
    assert from_environment(plan) is None


@pytest.mark.parametrize(("kwargs", "devices", "nodes", "message"), [
    (dict(tasks=4, nodes=2), 2, 1, "srun started 4 tasks"),
    (dict(tasks=4, nodes=1), 2, 2, "SLURM runs 1 node"),
    (dict(tasks=2, nodes=1, SLURM_LOCALID="2"), 2, 1, "SLURM_LOCALID=2"),
])
def test_a_job_that_does_not_match_the_fabric_is_an_error(clean, kwargs, devices, nodes, message):
    for name, value in slurm(0, **kwargs).items():
        clean.setenv(name, value)
    with pytest.raises(torchinit.ConfigurationError, match=message):
        from_environment(torchinit.Fabric(accelerator="cpu", devices=devices, num_nodes=nodes).plan)


def test_the_strategy_sets_the_process_groups_backend_and_timeout(monkeypatch):
    from datetime import timedelta

    made = {}
    monkeypatch.setattr(launch.dist, "init_process_group", lambda backend, **kwargs: made.update(kwargs, b=backend))
    strategy = torchinit.DDPStrategy(process_group_backend="mpi", timeout=timedelta(seconds=77))
    plan = torchinit.Fabric(accelerator="cpu", strategy=strategy, devices=2).plan
    launch.join(plan, launch.Ranks(1, 1, 0, 2), "tcp://127.0.0.1:1")
    assert (made["b"], made["timeout"], made["rank"]) == ("mpi", timedelta(seconds=77), 1)
    launch.join(torchinit.Fabric(accelerator="cpu", devices=2).plan, launch.Ranks(1, 1, 0, 2), "tcp://127.0.0.1:1")
    assert (made["b"], made["timeout"]) == ("gloo", launch.collective_timeout()), "the defaults otherwise"


def _free_slurm_port() -> int:
    """A free port that a SLURM job id can name (15000 + its last four digits)."""
    for port in range(15000 + os.getpid() % 5000, 25000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port between 15000 and 25000")


def test_two_srun_tasks_join_on_loopback(tmp_path):
    """The script as srun starts it: two processes with SLURM's variables only (no torchrun, no MASTER_*); the
    master is the node list's first host (a bracket range on loopback) and the port comes from the job id."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    port = _free_slurm_port()
    base = {k: v for k, v in os.environ.items() if k not in TORCHRUN and not k.startswith("SLURM_")}
    env = {**base, "TORCHINIT_TIMEOUT": "60"}
    job = {"SLURM_JOB_ID": f"9{port - 15000:04d}", "SLURM_NODELIST": "127.0.0.[1-4]"}
    ranks = [subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, **slurm(r, **job)}) for r in range(2)]
    outs = [rank.communicate(timeout=DEADLINE - 30) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], [err for _, err in outs]
    lines = rank_lines("".join(out for out, _ in outs))
    assert [line.split(" w=")[0] for line in lines] == ["rank 0/2 sum=1.0", "rank 1/2 sum=1.0"]
    assert lines[0].split(" w=")[1] == lines[1].split(" w=")[1], "one model: DDP made the ranks equal"
