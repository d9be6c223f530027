"""`python -m torchinit demo` end to end (tiny size): every torchinit variant reproduces the naive model's logits."""

import subprocess
import sys

import pytest


def test_demo_cli_tiny():
    out = subprocess.run([sys.executable, "-m", "torchinit", "demo", "--size", "tiny", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("exact") == 2, out.stdout
    assert "[3/3]" in out.stdout


@pytest.mark.parametrize("command, usage", [("demo", "usage: torchinit demo"), ("inspect", "usage: torchinit inspect"),
                                            (None, "usage: torchinit [-h] {demo,inspect}")])
def test_each_command_prints_its_own_help(capsys, command, usage):
    from torchinit.cli import main

    with pytest.raises(SystemExit) as done:
        main([command, "--help"] if command else ["--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(usage)
