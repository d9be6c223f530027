"""G10: the guarantees on third-party architectures, a fixed fast subset of benchmarks/zoo.py (the full sweep).

Each case runs in its own process (one import, every mode) with a timeout; bf16-true on CPU, bitwise against
`torch.manual_seed(0); build().to(torch.bfloat16)`, parameters and buffers, ties by object and by storage.
timm and torchvision cases run under TORCHINIT_ZOO_PYTHON (an interpreter where they import; torchvision's
wheel needs a matching torch) and are skipped, saying why, where they cannot import.
"""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import zoo  # noqa: E402

MODES = ["init_module", "record", "empty", "empty_partial", "empty_poison"]
CASES = [  # the patterns that once failed: .data-swapped biased heads, sinks, RoPE/xIELU/trunc_normal_ under bf16,
    # value-dependent constructors (RegNet), a custom _apply (EVA-02's rope bands), float widths (torchvision RegNet)
    "hf:distilbert:masked", "hf:flaubert:masked", "hf:xlm:masked", "hf:funnel:masked", "hf:modernbert:masked",
    "hf:gpt_oss:causal", "hf:llama:causal", "hf:gptj:causal", "hf:apertus:causal",
    "timm:regnety_002", "timm:eva02_tiny_patch14_224", "tv:regnet_y_400mf",
]
FSDP = {"hf:llama:causal", "hf:gpt_oss:causal", "hf:modernbert:masked", "timm:regnety_002"}  # + FSDP on fake ranks
PYTHON = os.environ.get("TORCHINIT_ZOO_PYTHON", sys.executable)


@functools.cache
def _cannot_import(module: str) -> str | None:
    done = subprocess.run([PYTHON, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    if done.returncode == 0:
        return None
    return f"{module} does not import under {PYTHON}: {(done.stderr.strip().splitlines() or ['?'])[-1][:160]}"


@pytest.mark.parametrize("case", CASES)
def test_zoo_case(case):
    why = _cannot_import({"hf": "transformers", "timm": "timm", "tv": "torchvision"}[case.split(":")[0]])
    if why:
        pytest.skip(why + " (set TORCHINIT_ZOO_PYTHON to an interpreter where it does)")
    results = zoo.run_isolated(case, MODES + ["fsdp"] * (case in FSDP), timeout=240, python=PYTHON)
    wrong = {mode: r for mode, r in results.items() if r["status"] != "exact"}
    assert not wrong, f"{case}: {wrong}"


def test_the_comparisons_name_what_differs():
    import torch
    from torch import nn

    def build():
        return nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))

    want = zoo._eager(build)
    assert zoo.compare(zoo._eager(build), want) == [] and zoo.fsdp_compare(build, want) == []
    with torch.no_grad():
        want[0].weight[7, 0] += 1  # row 7: rank 3's shard of 4
        want[1].bias[0] += 1  # 8 elements: rank 0 holds bias[0:2]
    assert zoo.compare(zoo._eager(build), want) == ["0.weight", "1.bias"]
    assert zoo.fsdp_compare(build, want) == ["rank 0: 1.bias", "rank 3: 0.weight"]
