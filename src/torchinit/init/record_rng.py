"""Random generators in record mode. Fake ops draw nothing, so a record starts from the generators' states at
enter and its replay makes every draw in order. A constructor may also move a generator itself:

1. Enter: the default generators (CPU, and the record's GPU) are noted with their states.
2. Construct: `torch.manual_seed`, `torch.seed`, `torch.set_rng_state` and their `torch.cuda` forms run for
   real on the generators outside the record; for the recorded ones the new state is written down as an op of
   its own (`set_state`, a random op: replayed in order with the draws) and the real generator is put back.
   `torch.get_rng_state` (also inside `torch.random.fork_rng`) answers with the state eager would have at that
   point: a replay of the draws so far.
3. Exit: a recorded generator whose state still moved was changed some other way (`Generator.manual_seed` on
   one already used, draws outside the record): a replay would not repeat it, so that is an error.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Iterator

import torch

from torchinit.core.compat import unset_fake_temporarily
from torchinit.core.patching import patched
from torchinit.record.data import Record, RecordError
from torchinit.record.replay import generator_states

_SETTERS = {"torch": ["manual_seed", "seed", "set_rng_state"], "torch.random": ["manual_seed", "seed", "set_rng_state"],
            "torch.cuda": ["manual_seed", "manual_seed_all", "seed", "seed_all", "set_rng_state", "set_rng_state_all"],
            "torch.cuda.random": ["manual_seed", "manual_seed_all", "seed", "seed_all", "set_rng_state",
                                  "set_rng_state_all"]}
_GETTERS = {"torch": ["get_rng_state"], "torch.random": ["get_rng_state"],
            "torch.cuda": ["get_rng_state", "get_rng_state_all"],
            "torch.cuda.random": ["get_rng_state", "get_rng_state_all"]}


def set_state(generator: torch.Generator, state: torch.Tensor) -> None:
    """The recorded form of a re-seed: the generator's state from here on."""
    generator.set_state(state)


def snapshot(recorder, device: torch.device) -> None:
    """Step 1: the default generators the record draws from, with their states now."""
    recorder.generator(torch.default_generator)
    if device.type == "cuda":
        torch.cuda.init()  # `default_generators` is empty until CUDA's lazy init (a fresh process: IndexError)
        index = device.index if device.index is not None else torch.cuda.current_device()
        recorder.generator(torch.cuda.default_generators[index])


@contextlib.contextmanager
def recording_seeds(recorder) -> Iterator[None]:
    """Step 2: the seeding functions patched while `recorder` records (restored at exit, on every path)."""
    with patched(_targets(_SETTERS), lambda fn: _setter(fn, recorder)), \
            patched(_targets(_GETTERS), lambda fn: _getter(fn, recorder)):
        yield


def _targets(table: dict[str, list[str]]) -> list[tuple[object, str]]:
    modules = {name: importlib.import_module(name) for name in table}
    return [(modules[m], name) for m, names in table.items() for name in names if callable(getattr(modules[m], name,
                                                                                                  None))]


def _setter(fn: Callable, recorder) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if recorder.paused:
            return fn(*args, **kwargs)
        with _for_real(recorder) as generators:
            before = [g.get_state() for g in generators]
            result = fn(*args, **kwargs)
            after = [g.get_state() for g in generators]
            moved = [(i, state) for i, state in enumerate(after) if not torch.equal(state, before[i])]
            for i, _ in moved:
                generators[i].set_state(before[i])
            ops = [(recorder.generator(generators[i]), recorder.constant(state)) for i, state in moved]
        for gen, const in ops:
            recorder.touched = set()
            recorder.add(set_state, (gen, const), {}, None)
        return result

    return wrapper


def _getter(fn: Callable, recorder) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if recorder.paused:
            return fn(*args, **kwargs)
        with _for_real(recorder) as generators:
            real = [g.get_state() for g in generators]
            for i, state in states_now(recorder.record).items():
                generators[i].set_state(state)
            try:
                return fn(*args, **kwargs)
            finally:
                for g, state in zip(generators, real, strict=True):
                    g.set_state(state)

    return wrapper


@contextlib.contextmanager
def _for_real(recorder) -> Iterator[list[torch.Generator]]:
    """The seeding function itself runs on real tensors, unrecorded; yields the recorded generators."""
    recorder.paused = True
    try:
        with unset_fake_temporarily():
            yield recorder.record.generators
    finally:
        recorder.paused = False


def states_now(record: Record) -> dict[int, torch.Tensor]:
    """Each recorded generator's state as eager would have it now: its start state moved by the draws and
    re-seeds recorded so far (a replay of those and what they read; none if nothing has drawn yet)."""
    if not any(op.random for op in record.ops):
        return dict(record.rng)
    return generator_states(record)


def check(record: Record) -> None:
    """Step 3: refuse a generator moved in a way the record cannot repeat, rather than give other values."""
    for i, state in record.rng.items():
        if not torch.equal(record.generators[i].get_state(), state):
            raise RecordError(
                f"A random generator ({record.generators[i].device} generator {i}) was re-seeded or drew random "
                "numbers for real while the model was built in record mode, in a way the record cannot repeat "
                "(torch.manual_seed, torch.set_rng_state and fork_rng are recorded; Generator.manual_seed on a "
                "generator already drawn from is not). Seed before the context (fabric = Fabric(seed=...), or "
                "torch.manual_seed before init_module()), or through torch.manual_seed."
            )
