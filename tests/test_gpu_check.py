"""benchmarks/gpu_check.py never rots: its tiny CPU mode runs every stage the GPU run has, in CI."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_stage_on_cpu(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--size", "tiny",
         "--out", str(tmp_path), "--tests", "tests/test_plan.py"],
        capture_output=True, text=True, timeout=1500, cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["tests", "init", "materialize", "record", "load", "load-fp32", "fsdp"]
    assert all(s["status"] == "ok" for s in stages.values()), {k: s["status"] for k, s in stages.items()}
    assert "passed" in stages["tests"]["summary"]
    for name in ("init", "materialize", "record", "load", "load-fp32", "fsdp"):
        keys = {r["key"] for r in stages[name]["rows"]}
        assert any(k.startswith("torchinit") for k in keys), (name, keys)
    exact = {(s["stage"], r["key"]): r.get("exact") for s in report["stages"] for r in s["rows"]}
    compared = [("init", "torchinit"), ("materialize", "torchinit"), ("record", "torchinit-replay")]
    assert all(exact[key] for key in compared), exact
    assert len(report["targets"]) == 6 and all(t["met"] is None for t in report["targets"])  # 7b-on-cuda targets
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| stage | case |" in markdown and "torchinit init_module()" in markdown
