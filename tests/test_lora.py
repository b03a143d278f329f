"""LoRA through peft (issue 10): adapters merge exactly as peft merges them, a LoRA run on the
tiny model learns the held-out task under ZeRO-2 and 2-rank ZeRO-3, and its export is a plain
LlamaForSequenceClassification that scores what the trained model scored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    SMALL,
    check_export,
    check_ok,
    export_weights,
    read_metrics,
    run_train,
    tiny_score_config,
)
from peft import LoraConfig, get_peft_model

from rmtrain.config import LoRAConfig
from rmtrain.hf import merge_lora
from rmtrain.model import LlamaScoreModel

LORA = ["model.lora.enabled=true", "model.lora.r=8", "model.lora.alpha=16"]


def test_merge_equals_peft_merge_and_unload() -> None:
    torch.manual_seed(0)
    base = LlamaScoreModel(tiny_score_config(100, num_labels=1))
    settings = LoRAConfig(enabled=True, r=4, alpha=12)
    model = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=12, target_modules=settings.target_modules,
                   modules_to_save=["score"]),
    )  # fmt: skip
    with torch.no_grad():  # adapters as after training (peft starts lora_B at 0)
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_()
    ours = merge_lora(model.state_dict(), settings)
    want = model.merge_and_unload().state_dict()
    assert ours.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=key)


def _train(run_dir: Path, nproc: int, extra: list[str]) -> None:
    check_ok(run_train([*SMALL, *LORA, f"output_dir={run_dir}", "trainer.max_steps=24",
                        "trainer.eval_every=12", "trainer.lr=1e-2", *extra],
                       nproc=nproc))  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "nproc"), [(2, 1)], ids=["zero2"])
def test_lora_learns_and_exports_a_plain_model(tmp_path: Path, stage: int, nproc: int) -> None:
    """ZeRO-2 here; 2-rank ZeRO-3 LoRA trains, exports and resumes exactly in
    test_resume.test_lora_sigkill_then_resume_matches_uninterrupted_run."""

    run_dir = tmp_path / "run"
    _train(run_dir, nproc, [f"deepspeed=zero{stage}", "trainer.save_every=12",
                            "deepspeed.stage3_param_persistence_threshold=0",
                            "model.lora.save_adapter=true"])  # fmt: skip
    evals = [r for r in read_metrics(run_dir) if "eval/accuracy" in r]
    assert evals[-1]["eval/accuracy"] > 0.7  # the bar test_e2e sets for full fine-tuning
    train = [r for r in read_metrics(run_dir) if "train/loss" in r]
    assert train[-1]["train/loss"] < train[0]["train/loss"]
    check_export(run_dir)  # plain transformers + pipeline score what the trained model scored
    names = set(json.loads((run_dir / "export" / "model.safetensors.index.json").read_text())[
        "weight_map"])  # fmt: skip
    assert "score.weight" in names and not any("lora" in n or "base_model" in n for n in names)
    # the adapter alone, in peft's format
    adapter = run_dir / "export_adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert any(adapter.glob("adapter_model.safetensors"))
    # rmtrain export of the last checkpoint merges the same weights
    from rmtrain.export import export_checkpoint

    out = export_checkpoint(run_dir, tmp_path / "from_ckpt")
    merged, again = export_weights(run_dir / "export"), export_weights(out)
    assert merged.keys() == again.keys()
    for key in merged:
        torch.testing.assert_close(again[key], merged[key], rtol=1e-5, atol=1e-5, msg=key)
