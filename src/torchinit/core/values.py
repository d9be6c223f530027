"""The one non-finite check on tensors in memory: which hold NaN, which +-inf.

Both checkers of values use it, each with its own rules and message: `materialize.verify` (parameters finite,
buffers NaN-free) and the checkpoint reader (`Checkpoint.load_into`: NaN anywhere, +-inf outside its `inf_ok`
keys). The safetensors reader's own check runs on the bytes as it reads them (`checkpoint/safetensors.py`) and
gives the same verdicts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from torchinit.core.placement import local_tensor

__all__ = ["FINITE", "INF", "NAN", "nonfinite"]

FINITE, INF, NAN = 0, 1, 2  # the verdicts, ordered: the worst of several pieces is their max


def nonfinite(tensors: Sequence[torch.Tensor]) -> list[int]:
    """A verdict per tensor, in order: `NAN` if it holds a NaN, else `INF` if it holds +-inf, else `FINITE`.

    A DTensor is judged on this rank's part; tensors that are neither floating nor complex, or hold no elements
    (here), are `FINITE`. One min/max pass per tensor (float8s through float16, which keeps NaN and inf; complex
    ones as their real and imaginary parts) and one device sync per device.
    """
    verdicts = [FINITE] * len(tensors)
    extremes: dict[torch.device, list[torch.Tensor]] = {}
    where: dict[torch.device, list[int]] = {}
    with torch.no_grad():
        for i, t in enumerate(tensors):
            if not (t.is_floating_point() or t.is_complex()):
                continue
            t = local_tensor(t).detach()
            if not t.numel():
                continue
            flat = torch.view_as_real(t).reshape(-1) if t.is_complex() else t.reshape(-1)
            flat = flat.half() if flat.itemsize == 1 else flat  # float8s have no aminmax; the cast keeps NaN/inf
            extremes.setdefault(t.device, []).append(torch.stack(torch.aminmax(flat)).float())  # NaN shows in both
            where.setdefault(t.device, []).append(i)
    for device, pairs in extremes.items():
        for i, (low, high) in zip(where[device], torch.stack(pairs).cpu().tolist(), strict=True):
            if low != low or high != high:
                verdicts[i] = NAN
            elif abs(low) == float("inf") or abs(high) == float("inf"):
                verdicts[i] = INF
    return verdicts
