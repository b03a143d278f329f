"""`rmtrain export` of a checkpoint equals the export written at the end of training, for every
ZeRO stage, precision and world size (issue 10): consolidation goes through DeepSpeed's own
zero_to_fp32, which reads bf16 ZeRO checkpoints (`bf16_zero_pp_rank_*`) too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SMALL, check_ok, export_weights, run_train, run_train_many

from rmtrain.export import export_checkpoint

CASES = [  # (precision, ZeRO stage, ranks)
    ("bf16", 3, 2),
    ("bf16", 0, 1),
    ("fp32", 1, 2),
    ("fp32", 0, 1),
]


def _overrides(run_dir: Path, precision: str, stage: int) -> list[str]:
    return [*SMALL, f"output_dir={run_dir}", f"trainer.precision={precision}",
            f"deepspeed=zero{stage}", "deepspeed.stage3_param_persistence_threshold=0",
            "trainer.max_steps=3", "trainer.save_every=3", "trainer.eval_every=0"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int, int], Path]:
    """Every case trained once: one-rank cases in this process, the two-rank ones in one
    launch (tests/launch_runs.py)."""
    root = tmp_path_factory.mktemp("export_checkpoints")
    dirs = {case: root / "_".join(map(str, case)) for case in CASES}
    for (precision, stage, nproc), run_dir in dirs.items():
        if nproc == 1:
            check_ok(run_train(_overrides(run_dir, precision, stage)))
    check_ok(run_train_many([_overrides(d, p, s) for (p, s, n), d in dirs.items() if n == 2]))
    return dirs


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "stage", "nproc"), CASES, ids=lambda v: str(v))
def test_export_of_checkpoint_equals_training_export(
    runs: dict[tuple[str, int, int], Path], tmp_path: Path, precision: str, stage: int, nproc: int
) -> None:
    run_dir = runs[precision, stage, nproc]
    out = export_checkpoint(run_dir, tmp_path / "from_checkpoint")
    trained, exported = export_weights(run_dir / "export"), export_weights(out)
    assert trained.keys() == exported.keys()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for name, tensor in trained.items():
        assert tensor.dtype == exported[name].dtype == dtype, name
        # bf16: the fp32 master weights rounded to bf16 are the bf16 weights trained with
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0, msg=name)
