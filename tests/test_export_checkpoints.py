"""`rmtrain export` of a checkpoint equals the export written at the end of training, for every
ZeRO stage, precision and world size (issue 10): consolidation goes through DeepSpeed's own
zero_to_fp32, which reads bf16 ZeRO checkpoints (`bf16_zero_pp_rank_*`) too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMALL, check_ok, cli_env, export_weights, run_train

CASES = [  # (precision, ZeRO stage, ranks)
    ("bf16", 3, 2),
    ("bf16", 0, 1),
    ("fp32", 1, 2),
    ("fp32", 0, 1),
]


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "stage", "nproc"), CASES, ids=lambda v: str(v))
def test_export_of_checkpoint_equals_training_export(
    tmp_path: Path, precision: str, stage: int, nproc: int
) -> None:
    run_dir = tmp_path / "run"
    check_ok(run_train([*SMALL, f"output_dir={run_dir}", f"trainer.precision={precision}",
                        f"deepspeed=zero{stage}", "deepspeed.stage3_param_persistence_threshold=0",
                        "trainer.max_steps=3", "trainer.save_every=3", "trainer.eval_every=0"],
                       nproc=nproc))  # fmt: skip
    out = tmp_path / "from_checkpoint"
    proc = subprocess.run(
        [sys.executable, "-m", "rmtrain", "export", str(run_dir), "--out", str(out)],
        env=cli_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained, exported = export_weights(run_dir / "export"), export_weights(out)
    assert trained.keys() == exported.keys()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for name, tensor in trained.items():
        assert tensor.dtype == exported[name].dtype == dtype, name
        # bf16: the fp32 master weights rounded to bf16 are the bf16 weights trained with
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0, msg=name)
