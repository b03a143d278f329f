"""LoRA through peft (issue 10): adapters merge exactly as peft merges them, a LoRA run on the
tiny model learns the held-out task under ZeRO-2 and 2-rank ZeRO-3, and its export is a plain
LlamaForSequenceClassification that scores what the trained model scored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SMALL, check_export, check_ok, export_weights, read_metrics, run_train
from peft import LoraConfig, get_peft_model

from rmtrain.arch import VERIFIED
from rmtrain.config import TOY_MODEL_TYPES, LoRAConfig, ModelConfig, ToyConfig
from rmtrain.errors import ConfigError
from rmtrain.hf import build_score_model, load_tokenizer, lora_targets, merge_lora

LORA = ["model.lora.enabled=true", "model.lora.r=8", "model.lora.alpha=16"]


@pytest.mark.parametrize("model_type", TOY_MODEL_TYPES)
def test_merge_equals_peft_merge_and_unload(model_type: str) -> None:
    """Every architecture's default targets (Phi-3: the fused qkv_proj / gate_up_proj) get
    adapters, and merging gives what peft's merge_and_unload gives."""
    cfg = ModelConfig(name_or_path="tiny", toy=ToyConfig(model_type=model_type))
    torch.manual_seed(0)
    base = build_score_model(cfg, load_tokenizer(cfg), torch.float32)
    settings = LoRAConfig(enabled=True, r=4, alpha=12)
    targets = lora_targets(base, settings)
    assert targets == list(VERIFIED[model_type].lora_targets)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=12, target_modules=targets, modules_to_save=["score"])
    )
    adapted = {n.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1]
               for n, _ in model.named_parameters() if ".lora_A." in n}  # fmt: skip
    assert adapted == set(targets)  # each target really got an adapter
    with torch.no_grad():  # adapters as after training (peft starts lora_B at 0)
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_()
    ours = merge_lora(model.state_dict(), settings)
    want = model.merge_and_unload().state_dict()
    assert ours.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_unknown_target_module_is_one_clear_error() -> None:
    cfg = ModelConfig(name_or_path="tiny", toy=ToyConfig(model_type="phi3"))
    model = build_score_model(cfg, load_tokenizer(cfg), torch.float32)
    with pytest.raises(
        ConfigError,
        match=r"q_proj, k_proj, v_proj not in this phi3 backbone; "
        r"its linear layers: down_proj, gate_up_proj, o_proj, qkv_proj",
    ):
        lora_targets(model, LoRAConfig(enabled=True, target_modules=["q_proj", "k_proj",
                                                                       "v_proj"]))  # fmt: skip


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
