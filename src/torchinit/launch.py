"""Processes: join the ones torchrun started, or start one per local device; then one process group.

`Fabric.launch` comes in three ways (this module never imports Fabric: `spawn` is handed a factory that makes
one, and each new process joins through the Fabric's public `join_process_group`):
1. Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set): join; the sizes must agree.
   Under SLURM's srun with one task per process, as Lightning reads it: the ranks from SLURM_PROCID,
   SLURM_LOCALID, SLURM_NODEID and SLURM_NTASKS, the master the first host of SLURM_NODELIST (bracket ranges
   read here, no `scontrol`), the port MASTER_PORT or one derived from SLURM_JOB_ID; they are then set as
   torchrun's variables (DeepSpeed reads those too) and joined the same way.
2. `launch(fn, *args)`: spawn one process per local device running `fn(fabric, *args)`; rank 0's result comes
   back. If any rank raises, the others are terminated and the error is raised here: never a hang.
3. `launch()` in a script: this process becomes rank 0 and runs the same command line again for the other
   local ranks, with torchrun's variables set. A watchdog ends every rank if one of them dies.
"""

from __future__ import annotations

import atexit
import gc
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchinit.core.errors import ConfigurationError, RankError, UsageError
from torchinit.plan import Plan

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def collective_timeout() -> timedelta:
    """How long a collective may wait for a missing rank before it fails (TORCHINIT_TIMEOUT seconds, default 1800)."""
    return timedelta(seconds=float(os.environ.get("TORCHINIT_TIMEOUT", 1800)))


@dataclass(frozen=True)
class Ranks:
    global_rank: int = 0
    local_rank: int = 0
    node_rank: int = 0
    world_size: int = 1


def from_environment(plan: Plan) -> Ranks | None:
    """This process's ranks if torchrun, srun (one task per process) or our script launcher started it, else
    None."""
    slurm = from_slurm(plan)
    if slurm is not None:
        ranks, address, port = slurm
        os.environ.update(RANK=str(ranks.global_rank), LOCAL_RANK=str(ranks.local_rank),
                          WORLD_SIZE=str(ranks.world_size), LOCAL_WORLD_SIZE=str(len(plan.device_indices)),
                          GROUP_RANK=str(ranks.node_rank), MASTER_ADDR=address, MASTER_PORT=port)
    if not all(name in os.environ for name in TORCHRUN_VARIABLES):
        return None
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size != plan.world_size:
        raise ConfigurationError(
            f"The environment says WORLD_SIZE={world_size}, but this Fabric was made for {plan.world_size} "
            f"process(es) (devices={len(plan.device_indices)} x num_nodes={plan.num_nodes}). Make devices and "
            "num_nodes match torchrun's --nproc-per-node and --nnodes."
        )
    local = int(os.environ["LOCAL_RANK"])
    return Ranks(int(os.environ["RANK"]), local, int(os.environ.get("GROUP_RANK", 0)), world_size)


def from_slurm(plan: Plan) -> tuple[Ranks, str, str] | None:
    """(ranks, master address, master port) when srun started this process as one of the job's processes; None
    outside SLURM, in an interactive allocation (job name "bash" / "interactive", as Lightning), under torchrun
    (its variables win) and for a single task (launch() then starts this node's processes itself)."""
    env = os.environ
    if "SLURM_NTASKS" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive") or \
            all(name in env for name in TORCHRUN_VARIABLES):
        return None
    tasks, per_node = int(env["SLURM_NTASKS"]), len(plan.device_indices)
    if tasks == 1 and plan.world_size > 1:
        return None
    made = f"this Fabric was made for {plan.world_size} process(es) (devices={per_node} x num_nodes={plan.num_nodes})"
    if tasks != plan.world_size:
        raise ConfigurationError(f"srun started {tasks} tasks (SLURM_NTASKS), but {made}. Make them match: "
                                 "--ntasks-per-node=devices and --nodes=num_nodes.")
    nodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", plan.num_nodes)))
    listed = re.match(r"\d+", env.get("SLURM_NTASKS_PER_NODE", ""))
    if nodes != plan.num_nodes or listed and int(listed.group()) != per_node:
        per = listed.group() if listed else "?"
        raise ConfigurationError(f"SLURM runs {nodes} node(s) x {per} task(s), but {made}. Set devices to "
                                 "--ntasks-per-node and num_nodes to --nodes.")
    rank, local = int(env["SLURM_PROCID"]), int(env["SLURM_LOCALID"])
    if local >= per_node:
        raise ConfigurationError(f"SLURM_LOCALID={local}, but {made}: each node runs devices={per_node} tasks.")
    node = int(env.get("SLURM_NODEID", rank // per_node))
    nodelist = env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    address = env.get("MASTER_ADDR") or first_host(nodelist)
    return Ranks(rank, local, node, tasks), address, env.get("MASTER_PORT") or str(slurm_port(env.get("SLURM_JOB_ID")))


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "node[01-03,07],gpu5" -> "node01", "a b" -> "a" (each bracket's
    first range taken, zero padding kept)."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += (ch == "[") - (ch == "]")
        if depth == 0 and ch in ", ":
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], nodelist[:end].strip())


def slurm_port(job_id: str | None) -> int:
    """Lightning's port for a SLURM job: 15000 + the job id's last four digits (12910 without a job id), so every
    task of the job finds the same one."""
    if job_id is None or not job_id[-4:].isdigit():
        return 12910
    return 15000 + int(job_id[-4:])


def from_group(plan: Plan) -> Ranks | None:
    """This process's ranks in a process group the caller already made, else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world_size, rank, per_node = dist.get_world_size(), dist.get_rank(), len(plan.device_indices)
    if world_size != plan.world_size:
        raise ConfigurationError(
            f"The process group already made has {world_size} rank(s), but this Fabric was made for "
            f"{plan.world_size} (devices={per_node} x num_nodes={plan.num_nodes}). Make them match, or make the "
            "Fabric before the process group and let launch() start it."
        )
    local = int(os.environ.get("LOCAL_RANK", rank % per_node))
    return Ranks(rank, local, rank // per_node, world_size)


def join(plan: Plan, ranks: Ranks, init_method: str | None) -> Plan:
    """Set this process's device and join the process group (gloo on CPU, nccl on CUDA, or the strategy's
    `process_group_backend`) unless the caller made it already (`init_method` None); returns its plan."""
    plan = plan.for_local_rank(ranks.local_rank)
    if plan.device.type == "cuda":
        torch.cuda.set_device(plan.device)
    cuda = plan.device.type == "cuda"
    # nccl is told this rank's GPU up front: barriers then know it (no "devices used by this process are
    # currently unknown" warning, no guessing device = rank)
    if init_method is None:
        return plan
    backend, timeout = plan.process_group  # the strategy's process_group_backend / timeout, if given
    dist.init_process_group(
        backend or ("nccl" if cuda else "gloo"), init_method=init_method, rank=ranks.global_rank,
        world_size=ranks.world_size, timeout=timeout or collective_timeout(),
        **({"device_id": plan.device} if cuda else {}),
    )
    return plan


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(make_fabric: Callable[[], Any], plan: Plan, fn: Callable, args: tuple) -> Any:
    """Run `fn(fabric, *args)` in one new process per local device; return rank 0's result. `make_fabric()`
    makes each process's Fabric (it must be picklable: the Fabric class with its arguments, `functools.partial`);
    the Fabric then joins the group with `join_process_group(ranks, init_method)`.

    Results and errors travel through files in a temporary folder (a pipe would block a large result until the
    parent reads, and the parent reads after the join); the process group meets through a file store there
    too, so no rank hosts a server that could go away before the others. If ranks fail, the error names the
    one that failed first (the others usually fail because of it).
    """
    count = len(plan.device_indices)
    with tempfile.TemporaryDirectory(prefix="torchinit-launch-") as folder:
        try:
            mp.start_processes(_worker, args=(make_fabric, fn, args, folder, count), nprocs=count,
                               start_method="spawn", join=True)
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
            failures = sorted(_load(path) for path in Path(folder).glob("error-*.pkl"))
            if not failures:
                raise RankError(f"Rank {error.error_index} of {count} failed ({error}); the other ranks were "
                                "stopped.") from None
            _, rank, trace = failures[0]
            later = "".join(f"\nrank {r} failed after it: {t.strip().splitlines()[-1]}" for _, r, t in failures[1:])
            raise RankError(f"Rank {rank} of {count} failed first; the other ranks were stopped.{later}\n"
                            f"Rank {rank}'s error:\n{trace}") from None
        result = Path(folder) / "result.pkl"
        return _load(result) if result.exists() else None


def _load(path: Path) -> Any:
    return pickle.loads(path.read_bytes())


def _worker(local_rank: int, make_fabric: Callable[[], Any], fn: Callable, args: tuple, folder: str,
            count: int) -> None:
    # torchrun's variables, for libraries that read them (DeepSpeed does)
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(count),
                      LOCAL_WORLD_SIZE=str(count))
    fabric = make_fabric()
    fabric.join_process_group(Ranks(local_rank, local_rank, 0, count), f"file://{folder}/store")
    try:
        result = fn(fabric, *args)
        if local_rank == 0:
            (Path(folder) / "result.pkl").write_bytes(pickle.dumps(result))
        del result
        dist.barrier()  # nobody tears the group down while another rank still talks through it
    except BaseException:
        (Path(folder) / f"error-{local_rank}.pkl").write_bytes(
            pickle.dumps((time.time(), local_rank, traceback.format_exc()))
        )
        raise
    finally:
        # DDP's reducer keeps the group alive through reference cycles; a group that outlives Python's
        # shutdown aborts the process, so collect them first.
        gc.collect()
        dist.destroy_process_group()


def start_script_ranks(plan: Plan) -> tuple[Ranks, str]:
    """Re-run this script for local ranks 1..N-1 with torchrun's variables; this process is rank 0."""
    if plan.num_nodes > 1:
        raise UsageError(
            f"num_nodes={plan.num_nodes}: start every node with torchrun (--nnodes, --nproc-per-node); "
            "Fabric.launch() only starts processes on this machine."
        )
    port, count = free_port(), len(plan.device_indices)
    command = [sys.executable, *sys.orig_argv[1:]]
    if len(command) < 2 or command[1] == "-c" and len(command) < 3:
        raise UsageError("launch() without a function re-runs this script, but there is no script (interactive "
                         "session): call launch(fn, *args) instead.")
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(count)}
    children = [
        subprocess.Popen(command, env={**base, "RANK": str(r), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(count)})
        for r in range(1, count)
    ]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(count), LOCAL_WORLD_SIZE=str(count))
    threading.Thread(target=_watch, args=(children,), daemon=True, name="torchinit-watchdog").start()
    atexit.register(_finish, children)
    return Ranks(0, 0, 0, count), f"tcp://127.0.0.1:{port}"


def _report(rank: int, code: int) -> None:
    print(f"torchinit: rank {rank} exited with code {code}; stopping all ranks.", file=sys.stderr, flush=True)


def _watch(children: list[subprocess.Popen]) -> None:
    """If another rank dies with an error, end them all: rank 0 may be blocked in a collective forever."""
    while True:
        for rank, child in enumerate(children, start=1):
            code = child.poll()
            if code not in (None, 0):
                _report(rank, code)
                _stop(children)
                os._exit(1)
        if all(child.poll() == 0 for child in children):
            return
        time.sleep(0.2)


def _stop(children: list[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            child.kill()


def _finish(children: list[subprocess.Popen]) -> None:
    """At rank 0's exit: wait for the others (they run the same program). If rank 0 failed, give them a few
    seconds to end on their own (so that the rank that failed first is named), then stop them. Any rank that
    failed is named, and makes rank 0's exit code non-zero."""
    if getattr(sys, "last_value", None) is not None:  # rank 0 ends with an uncaught exception
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(child.poll() is None for child in children):
            time.sleep(0.05)
        _stop(children)
    codes = [child.wait() for child in children]
    failed = [(rank, code) for rank, code in enumerate(codes, start=1) if code not in (0, -signal.SIGKILL)]
    for rank, code in failed:
        _report(rank, code)
    if failed:
        os._exit(1)  # a group with a dead member cannot be torn down cleanly: leave without trying
    leave_group()


def leave_group() -> None:
    """Destroy the process group after collecting the cycles that keep it alive (see `_worker`)."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
