"""The README's Quick start is what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    block = re.search(r"## Quick start\s+```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 2 and commands[0].endswith("torchinit demo")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
