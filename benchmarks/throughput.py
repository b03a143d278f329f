"""Training throughput per ZeRO stage and world size: prints a table of tokens/s.

    python benchmarks/throughput.py [--steps 40] [--nproc 1 2] [--stages 0 2 3] [extra overrides]

Each configuration is a real `rmtrain train` run on this machine's CPU (one process, or
launch/cpu.sh for several gloo ranks; it does not start GPU launchers). tokens/s is the median
of `train/tokens_per_s` (non-pad tokens of all ranks per optimizer step, wall clock) over the
steps after the first five.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(stage: int, nproc: int, steps: int, extra: list[str]) -> tuple[float, float]:
    out = Path(tempfile.mkdtemp(prefix="rmtrain-bench-")) / "run"
    overrides = [
        f"deepspeed=zero{stage}", "deepspeed.stage3_param_persistence_threshold=0",
        f"trainer.max_steps={steps}", "trainer.eval_every=0", "trainer.eval_at_start=false",
        "trainer.export=false", "logger=none", f"output_dir={out}", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "rmtrain.train", *overrides]
    else:
        env["NPROC"] = str(nproc)
        cmd = ["bash", str(REPO / "launch" / "cpu.sh"), *overrides]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=REPO)
    wall = time.perf_counter() - start
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r][5:]
    return statistics.median(tps), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3])
    args, extra = parser.parse_known_args()
    print(f"{'ranks':>5} {'ZeRO':>4} {'tokens/s':>10} {'wall s':>7}  overrides: {extra}")
    for nproc in args.nproc:
        for stage in args.stages:
            tps, wall = run(stage, nproc, args.steps, extra)
            print(f"{nproc:>5} {stage:>4} {tps:>10.0f} {wall:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
