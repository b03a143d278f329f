"""The checkout itself: no unresolved merge conflict left in any tracked text file."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKERS = ("<<<<<<< ", ">>>>>>> ")


def test_no_merge_conflict_markers() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()  # fmt: skip
    bad = []
    for name in files:
        path = REPO / name
        if path.suffix not in {".py", ".md", ".yaml", ".toml", ".sh", ".cfg", ".txt", ""}:
            continue
        if not path.is_file():
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if line.startswith(MARKERS) or line == "=======":
                bad.append(f"{name}:{n}")
    assert not bad, f"unresolved merge conflict markers at {bad}"
