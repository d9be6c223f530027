"""Launch and DDP with real processes (gloo on CPU). Every test has a deadline: a bug is a failure, not a hang."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from dist_workers import crash_on_rank_one, ddp_training, die_on_rank_one, relaunch
from torch import nn

import torchinit

DEADLINE = 180


@contextlib.contextmanager
def deadline_guard(seconds: int = DEADLINE):
    """Raise TimeoutError in the test if it runs longer than `seconds`: a hang becomes a failure."""
    def expire(*_):
        raise TimeoutError(f"distributed test still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def deadline():
    with deadline_guard():
        yield


@pytest.mark.parametrize("empty_init", [False, True, "meta"])
def test_ddp_launch_fn_trains_with_ranks_in_step(empty_init):
    fabric = torchinit.Fabric(accelerator="cpu", devices=2, precision="32-true", seed=0)
    result = fabric.launch(ddp_training, empty_init)
    assert result["ranks"] == [(0, 0, 2, True), (1, 1, 2, False)]
    assert result["start"][0] == result["start"][1], "all ranks start from rank 0's weights"
    assert result["after"][0] == result["after"][1] and result["moved"], "gradients were averaged"
    assert (result["sum"], result["mean"], result["broadcast"]) == (3.0, 1.5, "from 0")
    assert result["keys"] == ["0.weight", "0.bias", "2.weight", "2.bias"], "no 'module.' prefix from DDP"


def test_a_crash_in_one_rank_stops_all_with_an_error():
    fabric = torchinit.Fabric(accelerator="cpu", devices=2)
    with pytest.raises(RuntimeError, match=r"Rank 1 of 2 failed first(.|\n)*ValueError: rank one broke"):
        fabric.launch(crash_on_rank_one)


def test_a_rank_that_dies_without_an_error_is_named_and_the_others_stopped():
    fabric = torchinit.Fabric(accelerator="cpu", devices=2)
    with pytest.raises(RuntimeError, match=r"Rank 1 of 2 failed \(process 1 terminated with exit code 3\)"):
        fabric.launch(die_on_rank_one)  # rank 0 sleeps for a minute: the deadline proves it was stopped


def test_launch_twice_is_an_error():
    fabric = torchinit.Fabric(accelerator="cpu", devices=2)
    assert "launch() was already called" in fabric.launch(relaunch)


def test_multi_process_work_before_launch_is_an_error():
    fabric = torchinit.Fabric(accelerator="cpu", devices=2)
    with pytest.raises(RuntimeError, match=r"call fabric\.launch\(\)"):
        fabric.init_module()
    with pytest.raises(RuntimeError, match=r"call fabric\.launch\(\)"):
        fabric.setup(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match=r"call fabric\.launch\(\)"):
        fabric.setup_optimizers(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))


SCRIPT = textwrap.dedent("""
    import os
    import sys
    import torch
    import torchinit
    from torch import nn

    fabric = torchinit.Fabric(accelerator="cpu", devices=2, seed=0)
    fabric.launch()
    with fabric.init_module():
        model = nn.Linear(4, 4)
    model = fabric.setup(model)
    if sys.argv[1:] == ["crash"] and fabric.global_rank == 1:
        raise SystemExit(3)
    total = fabric.all_reduce(torch.tensor([float(fabric.global_rank)]), reduce_op="sum")
    fabric.barrier()
    line = f"rank {fabric.global_rank}/{fabric.world_size} sum={total.item()} w={model.weight.sum().item():.6f}\\n"
    os.write(1, line.encode())  # one write: the ranks share stdout
""")


def run(tmp_path, *command):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "TORCHINIT_TIMEOUT": "60"}
    return subprocess.run([sys.executable, *command[:-1], str(script), *command[-1:]] if command else
                          [sys.executable, str(script)], capture_output=True, text=True, timeout=DEADLINE - 30,
                          env=env, cwd=tmp_path)


def rank_lines(out: str) -> list[str]:
    return sorted(line for line in out.splitlines() if line.startswith("rank "))


def test_script_launch_reruns_the_script_for_the_other_ranks(tmp_path):
    done = run(tmp_path)
    assert done.returncode == 0, done.stderr
    lines = rank_lines(done.stdout)
    assert [line.split(" w=")[0] for line in lines] == ["rank 0/2 sum=1.0", "rank 1/2 sum=1.0"]
    assert lines[0].split(" w=")[1] == lines[1].split(" w=")[1]


def test_script_launch_stops_everything_when_a_rank_dies(tmp_path):
    done = run(tmp_path, "crash")
    assert done.returncode != 0
    assert "rank 1 exited with code 3" in done.stderr


def test_torchrun_is_joined_and_its_size_checked(tmp_path):
    done = run(tmp_path, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "")
    assert done.returncode == 0, done.stderr
    assert [line.split(" w=")[0] for line in rank_lines(done.stdout)] == ["rank 0/2 sum=1.0", "rank 1/2 sum=1.0"]
    wrong = run(tmp_path, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "")
    assert wrong.returncode != 0 and "WORLD_SIZE=3" in wrong.stderr
