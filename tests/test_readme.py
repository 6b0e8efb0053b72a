"""The README's Python API example runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from .conftest import REPO, qemu_pids


def test_readme_api_example(state_dir: Path) -> None:
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    env = {**os.environ, "VMBEAM_STATE_DIR": str(state_dir), "VMBEAM_ACCEL": "tcg"}
    proc = subprocess.run([sys.executable, "-c", code.group(1)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    _total_ms, sent, ratio = proc.stdout.splitlines()[0].split()
    assert int(sent) < 1 << 20 and float(ratio) >= 0.99
    assert "'running': True" in proc.stdout
    assert qemu_pids(str(state_dir)) == []
