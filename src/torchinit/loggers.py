"""Experiment loggers with Lightning Fabric's interface (`Fabric(loggers=...)`, `fabric.log`, `fabric.log_dict`).

Any object with `log_metrics(metrics, step)` works as a logger (Lightning's own included); `CSVLogger` and
`TensorBoardLogger` take Lightning's arguments and write the same folders (`root_dir/name/version_N`). Only rank 0
writes; the others' calls do nothing.
"""

from __future__ import annotations

import abc
import csv
import os
import warnings
from argparse import Namespace
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from torchinit.core.errors import ConfigurationError, UnsupportedError

__all__ = ["CSVLogger", "Logger", "TensorBoardLogger", "scalars"]


def rank() -> int:
    """This process's global rank: the process group's, else torchrun's variable, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def scalars(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """One-element tensors become Python numbers (detached from the graph), as Lightning's `log_dict` does."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ConfigurationError(f"fabric.log: {key!r} is a tensor of {value.numel()} elements; a logged value "
                                         "must be one number.")
            value = value.item()
        out[key] = value
    return out


def _prefixed(metrics: Mapping[str, Any], prefix: str, separator: str) -> dict[str, Any]:
    return {f"{prefix}{separator}{k}" if prefix else k: v for k, v in metrics.items()}


def _next_version(folder: str) -> int:
    if not os.path.isdir(folder):
        return 0
    found = [int(d.split("_", 1)[1]) for d in os.listdir(folder)
             if d.startswith("version_") and d.split("_", 1)[1].isdigit() and os.path.isdir(os.path.join(folder, d))]
    return max(found) + 1 if found else 0


class Logger(abc.ABC):
    """The interface Fabric calls (Lightning's): `log_metrics`, `log_hyperparams`, `save`, `finalize`, and where the
    run's files are (`name`, `version`, `root_dir`, `log_dir`)."""

    LOGGER_JOIN_CHAR = "-"

    def __init__(self, root_dir: str | os.PathLike, name: str | None = "lightning_logs",
                 version: int | str | None = None, prefix: str = ""):
        self._root_dir = os.fspath(root_dir)
        self._name = name or ""
        self._version = version
        self._prefix = prefix

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> int | str:
        """The given version, else the next free `version_N` number in `root_dir/name` (fixed at first use)."""
        if self._version is None:
            self._version = _next_version(os.path.join(self._root_dir, self._name))
        return self._version

    @property
    def root_dir(self) -> str:
        return self._root_dir

    @property
    def log_dir(self) -> str:
        version = self.version if isinstance(self.version, str) else f"version_{self.version}"
        return os.path.join(self._root_dir, self._name, version)

    @property
    def group_separator(self) -> str:
        return "/"

    @abc.abstractmethod
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Record `metrics` (name -> number) at `step`."""

    @abc.abstractmethod
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """Record the run's hyperparameters."""

    def log_graph(self, model: torch.nn.Module, input_array: torch.Tensor | None = None) -> None:
        return None

    def save(self) -> None:
        return None

    def finalize(self, status: str) -> None:
        self.save()


class CSVLogger(Logger):
    """Metrics to `log_dir/metrics.csv`: one row per `log_metrics` call, a `step` column, one column per metric
    (the header grows when new metrics appear). Rows are written every `flush_logs_every_n_steps` steps and at
    `save` / `finalize`."""

    NAME_METRICS_FILE = "metrics.csv"

    def __init__(self, root_dir: str | os.PathLike, name: str | None = "lightning_logs",
                 version: int | str | None = None, prefix: str = "", flush_logs_every_n_steps: int = 100):
        super().__init__(root_dir, name, version, prefix)
        self._flush_every = flush_logs_every_n_steps
        self._pending: list[dict[str, Any]] = []
        self._keys: list[str] = []
        self._started = False

    @property
    def metrics_file_path(self) -> str:
        return os.path.join(self.log_dir, self.NAME_METRICS_FILE)

    def _start(self) -> None:
        if self._started:
            return
        if os.path.isdir(self.log_dir) and os.listdir(self.log_dir):
            warnings.warn(f"Experiment logs directory {self.log_dir} exists and is not empty. Previous log files in "
                          "this directory will be deleted when the new ones are saved!", stacklevel=4)
            if os.path.isfile(self.metrics_file_path):
                os.remove(self.metrics_file_path)
        os.makedirs(self.log_dir, exist_ok=True)
        self._started = True

    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        raise UnsupportedError("The CSVLogger does not log hyperparameters (as Lightning's): use TensorBoardLogger.")

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if rank() != 0:
            return
        self._start()
        if step is None:
            step = len(self._pending)
        row = {k: v.item() if isinstance(v, torch.Tensor) else v
               for k, v in _prefixed(metrics, self._prefix, self.LOGGER_JOIN_CHAR).items()}
        row["step"] = step
        self._pending.append(row)
        if (step + 1) % self._flush_every == 0:
            self.save()

    def save(self) -> None:
        if rank() != 0 or not self._pending:
            return
        self._start()
        new = sorted({k for row in self._pending for k in row} - set(self._keys))
        exists = os.path.isfile(self.metrics_file_path)
        self._keys = sorted({*self._keys, *new})
        if new and exists:  # a new column: rewrite the file under the new header
            with open(self.metrics_file_path, newline="") as f:
                old = list(csv.DictReader(f))
            self._pending = old + self._pending
            exists = False
        with open(self.metrics_file_path, "a" if exists else "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._keys)
            if not exists:
                writer.writeheader()
            writer.writerows(self._pending)
        self._pending = []

    def finalize(self, status: str) -> None:
        if self._started:
            self.save()


class TensorBoardLogger(Logger):
    """Metrics and hyperparameters as TensorBoard event files in `log_dir` (`root_dir/name/version_N[/sub_dir]`),
    through torch's `SummaryWriter` (needs the `tensorboard` package). `**kwargs` go to the `SummaryWriter`."""

    def __init__(self, root_dir: str | os.PathLike, name: str | None = "lightning_logs",
                 version: int | str | None = None, default_hp_metric: bool = True, prefix: str = "",
                 sub_dir: str | os.PathLike | None = None, **kwargs: Any):
        try:
            import tensorboard  # noqa: F401 (torch's SummaryWriter writes through it)
        except ImportError:
            raise UnsupportedError("TensorBoardLogger writes through torch.utils.tensorboard, which needs the "
                                   "`tensorboard` package: `pip install tensorboard`, or use CSVLogger.") from None
        super().__init__(root_dir, name, version, prefix)
        self._sub_dir = None if sub_dir is None else os.fspath(sub_dir)
        self._default_hp_metric = default_hp_metric
        self._kwargs = kwargs
        self._experiment = None

    @property
    def sub_dir(self) -> str | None:
        return self._sub_dir

    @property
    def log_dir(self) -> str:
        folder = super().log_dir
        if self._sub_dir is not None:
            folder = os.path.join(folder, self._sub_dir)
        return os.path.expanduser(os.path.expandvars(folder))

    @property
    def experiment(self):
        """The `SummaryWriter` (made at first use, on rank 0 only)."""
        if self._experiment is None:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(self._root_dir, exist_ok=True)
            self._experiment = SummaryWriter(log_dir=self.log_dir, **self._kwargs)
        return self._experiment

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if rank() != 0:
            return
        for key, value in _prefixed(metrics, self._prefix, self.LOGGER_JOIN_CHAR).items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            if isinstance(value, dict):
                self.experiment.add_scalars(key, value, step)
            else:
                self.experiment.add_scalar(key, value, step)

    def log_hyperparams(self, params: dict[str, Any] | Namespace, metrics: dict[str, Any] | None = None,
                        step: int | None = None) -> None:
        if rank() != 0:
            return
        from torch.utils.tensorboard.summary import hparams

        params = vars(params) if isinstance(params, Namespace) else dict(params)
        params = {k: v if isinstance(v, (int, float, str, bool, torch.Tensor)) else str(v) for k, v in params.items()}
        if metrics is None:
            metrics = {"hp_metric": -1} if self._default_hp_metric else None
        elif not isinstance(metrics, dict):
            metrics = {"hp_metric": metrics}
        if metrics:
            self.log_metrics(metrics, step)
            writer = self.experiment.file_writer
            for summary in hparams(params, metrics):
                writer.add_summary(summary, step)

    def log_graph(self, model: torch.nn.Module, input_array: Any = None) -> None:
        if rank() != 0:
            return
        input_array = getattr(model, "example_input_array", None) if input_array is None else input_array
        if input_array is None:
            warnings.warn("Could not log the graph to TensorBoard: pass input_array (or set "
                          "model.example_input_array).", stacklevel=2)
            return
        self.experiment.add_graph(getattr(model, "module", model), input_array)

    def save(self) -> None:
        if self._experiment is not None:
            self._experiment.flush()

    def finalize(self, status: str) -> None:
        if self._experiment is not None:
            self._experiment.flush()
            self._experiment.close()

    def __getstate__(self) -> dict[str, Any]:  # a logger travels to spawned processes without its open writer
        return {**self.__dict__, "_experiment": None}
