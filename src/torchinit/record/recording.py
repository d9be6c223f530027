"""A record bound to a model: its placeholders, the values they get, and which modules it belongs to.

`Recording` is the `RecordedInit` that `materialize` and the strategies replay: `covers` says whether a tensor
object is one of its placeholders, `rebind` follows a placeholder that sharding replaced, `replay` writes the
recorded values into the covered tensors (a DTensor keeps its own part), `dtype` is the dtype the placeholders
were made in. The registry keeps each module's recording next to it (freed with it): `register` at the end of a
record context, `records_of` wherever a model is materialized.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Protocol

import torch
from torch import nn

from torchinit.core.placement import is_distributed, local_part
from torchinit.record.data import Alias, Record, Ref
from torchinit.record.replay import Replayer, backward_slice

__all__ = ["RecordedInit", "Recording", "Recordings", "kept_for", "records_of", "register"]


class RecordedInit(Protocol):
    """A recorded initialization (built while constructing) that can replay itself into fresh tensors."""

    dtype: torch.dtype | None  # the dtype its placeholders were made in (None: as constructed)

    def covers(self, tensor: torch.Tensor) -> bool:
        """Whether the record can produce this tensor object (a placeholder it made)."""

    def rebind(self, old: torch.Tensor, new: torch.Tensor) -> None:
        """`new` (a sharded or full replacement made by a strategy) takes the place of the placeholder `old`."""

    def replay(self, targets: dict[str, torch.Tensor]) -> None:
        """Write the recorded values into `targets` (qualified name -> the covered tensor, now with memory)."""


class Recording:
    """A record bound to its placeholder tensors: the `RecordedInit` that `materialize` replays."""

    def __init__(self, record: Record, targets: dict[int, tuple[torch.Tensor, Ref | Alias]],
                 loose: dict[int, tuple[weakref.ref, str]], dtype: torch.dtype | None, sliced: bool = False):
        self.record = record
        self.sliced = sliced  # empty init: each replay runs only the ops its targets need (the rest was loaded)
        self.targets = targets  # id(placeholder) -> (placeholder, value reference)
        self.loose = loose  # id(placeholder) -> (module, attribute): plain tensor attributes, set when replayed
        self.cache: dict[int, torch.Tensor] = {}  # finished values of targets not asked for yet
        self._replayer: Replayer | None = None
        self.peak_bytes = 0  # the most memory a replay held besides the targets (a diagnostic)
        self.final_rng: dict[int, torch.Tensor] | None = None
        self.dtype = dtype  # the dtype the record's placeholders were made in (None: as constructed)

    @property
    def alive(self) -> bool:
        return len(self.targets) > len(self.loose)

    def covers(self, tensor: torch.Tensor) -> bool:
        entry = self.targets.get(id(tensor))
        return entry is not None and entry[0] is tensor

    def rebind(self, old: torch.Tensor, new: torch.Tensor) -> None:
        """`new` replaces the placeholder `old` (FSDP or TP made a sharded Parameter from it, or model parallel a full
        placeholder to init before keeping its part)."""
        entry = self.targets.pop(id(old), None)
        if entry is not None:
            self.targets[id(new)] = (new, entry[1])
            if id(old) in self.cache:  # finished while replaying for other targets
                self.cache[id(new)] = self.cache.pop(id(old))

    def replay(self, targets: dict[str, torch.Tensor]) -> None:
        """Write the recorded values into `targets` (tensors this record covers, with memory now)."""
        wanted = {id(t): t for t in targets.values() if self.covers(t)}
        if self.sliced:
            self._replay_slice(wanted)
            return
        for key in [k for k in wanted if k in self.cache]:
            _write(wanted.pop(key), self.cache.pop(key))
            del self.targets[key]
        last = len(self.targets) == len(self.loose) + len(wanted)  # after these, only loose attributes remain
        if not wanted and not last:
            return
        if self._replayer is None:
            self._replayer = Replayer(self.record)
        replayer = self._replayer
        by_memory: dict[int, list[int]] = {}
        for key, (_, ref) in self.targets.items():
            by_memory.setdefault(self.record.memory_of[ref.node], []).append(key)

        def finished(memory: int) -> None:
            for key in by_memory.get(memory, ()):
                value = replayer.value(self.targets[key][1])
                if key in self.loose:
                    _set_loose(*self.loose.pop(key), self.targets.pop(key)[0], value)
                elif key in wanted:
                    _write(wanted.pop(key), value)
                    del self.targets[key]
                else:
                    self.cache[key] = value

        if last:
            stop = len(self.record.ops)
        else:
            stop = 1 + max(replayer.finish_at[self.record.memory_of[self.targets[k][1].node]] for k in wanted)
        replayer.run(stop, finished)
        self.peak_bytes = max(self.peak_bytes, replayer.peak)
        if last:  # where eager leaves the random streams (init_module() moves the user's there)
            self.final_rng = dict(replayer.rng)
        if not self.targets:  # every value handed out: free the record's memory
            self._replayer = None
            self.cache.clear()
            self.record.ops.clear()
            self.record.consts.clear()

    def _replay_slice(self, wanted: dict[int, torch.Tensor]) -> None:
        """Replay only the ops the wanted targets depend on, from the start; the other targets keep their record
        (something else wrote them, or a later replay will)."""
        if not wanted:
            return
        by_memory: dict[int, list[int]] = {}
        for key in wanted:
            by_memory.setdefault(self.record.memory_of[self.targets[key][1].node], []).append(key)
        replayer = Replayer(self.record, backward_slice(self.record, set(by_memory)))

        def finished(memory: int) -> None:
            for key in by_memory.get(memory, ()):
                value = replayer.value(self.targets[key][1])
                if key in self.loose:
                    _set_loose(*self.loose.pop(key), self.targets[key][0], value)
                else:
                    _write(wanted[key], value)
                del self.targets[key]

        replayer.run(len(self.record.ops), finished)
        self.peak_bytes = max(self.peak_bytes, replayer.peak)
        if not self.targets:
            self.record.ops.clear()
            self.record.consts.clear()


def _set_loose(module_ref: weakref.ref, name: str, placeholder: torch.Tensor, value: torch.Tensor) -> None:
    """A plain tensor attribute gets its eager value (device and dtype as recorded: `Module.to` skips these)."""
    module = module_ref()
    if module is not None and vars(module).get(name) is placeholder:
        object.__setattr__(module, name, value)


def _write(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full value into a target; a DTensor (FSDP2 / tensor-parallel shard) keeps only its own part."""
    with torch.no_grad():
        if is_distributed(target):
            target.to_local().copy_(local_part(target, value))
        else:
            target.copy_(value)


class Recordings:
    """Several records (modules built in separate record contexts), each replaying its own tensors."""

    def __init__(self, recordings: Iterable[Recording]):
        self.recordings = list(recordings)
        dtypes = {r.dtype for r in self.recordings}
        self.dtype = dtypes.pop() if len(dtypes) == 1 else None  # the placeholders' dtype, where they agree

    def covers(self, tensor: torch.Tensor) -> bool:
        return any(r.covers(tensor) for r in self.recordings)

    def rebind(self, old: torch.Tensor, new: torch.Tensor) -> None:
        for r in self.recordings:
            r.rebind(old, new)

    def replay(self, targets: dict[str, torch.Tensor]) -> None:
        for r in self.recordings:
            r.replay({name: t for name, t in targets.items() if r.covers(t)})


_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register(modules: Iterable[nn.Module], recording: Recording) -> None:
    """Keep `recording` next to each of `modules` (freed with them)."""
    for module in modules:
        _RECORDS[module] = recording


def kept_for(module: nn.Module) -> Recording | None:
    """The recording kept for this very module (not its submodules)."""
    return _RECORDS.get(module)


def records_of(module: nn.Module) -> Recording | Recordings | None:
    """The recording(s) kept for `module`'s modules (None if none was built in record mode)."""
    found = []
    for sub in module.modules():
        recording = _RECORDS.get(sub)
        if recording is not None and recording.alive and all(r is not recording for r in found):
            found.append(recording)
    if not found:
        return None
    return found[0] if len(found) == 1 else Recordings(found)
