"""`python -m torchinit demo` end to end (tiny size): every torchinit variant reproduces the naive model's logits."""

import subprocess
import sys


def test_demo_cli_tiny():
    out = subprocess.run([sys.executable, "-m", "torchinit", "demo", "--size", "tiny", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("exact") == 2, out.stdout
    assert "[3/3]" in out.stdout
