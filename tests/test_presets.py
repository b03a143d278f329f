"""Every `configs/experiment/*.yaml` composes, validates, and trains on CPU with tiny overrides.

Parametrized over the files found, so a new preset is covered without editing this test. The
smoke runs go through the real CLI (`python -m rmtrain train -m ...`) in one subprocess, as
one Hydra multirun (one job per preset) to keep the file fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rmtrain.config import Config, register_schemas, to_config

ROOT = Path(__file__).parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
# Tiny CPU run: the presets pick /model: llama with a hub name, so model and name are overridden.
SMOKE = [
    "model=tiny", "model.name_or_path=tiny", "data=sample", "data.max_length=64",
    "data.sample_train_rows=64", "data.sample_eval_rows=32",
    "deepspeed.stage3_param_persistence_threshold=0", "trainer.precision=fp32",
    "trainer.max_steps=2", "trainer.micro_batch_size=4", "trainer.gradient_accumulation_steps=1",
    "trainer.eval_batch_size=16", "trainer.eval_every=0", "trainer.save_every=0", "logger=none",
]  # fmt: skip
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def compose_preset(name: str, overrides: list[str] | None = None):
    register_schemas()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=[f"experiment={name}", *(overrides or [])])


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_and_validates(name: str) -> None:
    dcfg = compose_preset(name)
    if OmegaConf.is_missing(dcfg.model, "name_or_path"):
        dcfg = compose_preset(name, ["model.name_or_path=x"])
    cfg = to_config(dcfg)
    assert cfg.trainer.lr > 0


def test_beaver_reward_is_the_published_recipe() -> None:
    cfg = to_config(compose_preset("beaver_reward"))
    assert cfg.model.name_or_path == "PKU-Alignment/alpaca-7b-reproduced"
    assert (cfg.data.path, cfg.data.preference, cfg.data.template, cfg.data.max_length) == (
        "PKU-Alignment/PKU-SafeRLHF", "better", "safe_rlhf", 512
    )  # fmt: skip
    assert (cfg.loss.name, cfg.loss.score_reg) == ("bt", 0.001)
    assert (cfg.deepspeed.stage, cfg.trainer.precision) == (3, "bf16")
    assert (cfg.trainer.lr, cfg.trainer.epochs) == (2e-5, 2)


@pytest.mark.parametrize(
    "name", ["beaver_reward", "beaver_cost", "llama7b_pku_zero3", "fsfairx_llama3_rm"]
)
def test_real_scale_presets_pack(name: str) -> None:
    assert to_config(compose_preset(name, ["model.name_or_path=x"])).trainer.packing


def test_fsfairx_llama3_rm_is_the_rlhflow_recipe() -> None:
    cfg = to_config(compose_preset("fsfairx_llama3_rm"))
    assert cfg.model.name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert (cfg.data.template, cfg.data.max_length) == ("chat", 4096)
    assert (cfg.loss.name, cfg.deepspeed.stage, cfg.trainer.precision) == ("bt", 3, "bf16")
    assert (cfg.trainer.lr, cfg.trainer.epochs) == (2e-6, 1)
    # the mixture over local files, each in its own format, 1% of each held out
    assert [(s.display(), s.format) for s in cfg.data.mixture] == [
        ("hh_rlhf", "hh_rlhf"), ("shp", "standard"), ("ultrafeedback_binarized", "ultrafeedback"),
        ("helpsteer", "conversational"), ("pku_saferlhf", "pku_saferlhf"),
    ]  # fmt: skip
    assert cfg.data.mixture[0].path == "data/rlhflow/hh_rlhf.jsonl"
    assert cfg.data.eval_fraction == 0.01
    # global batch 512 on 8 GPUs
    assert cfg.trainer.micro_batch_size * cfg.trainer.gradient_accumulation_steps * 8 == 512


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path]:
    """One Hydra multirun through the real CLI: one job per preset, imports paid once."""
    sweep = tmp_path_factory.mktemp("presets")
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "rmtrain", "train", "-m", f"experiment={','.join(PRESETS)}",
           *SMOKE, f"hydra.sweep.dir={sweep}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr, sweep


@pytest.mark.parametrize("job", range(len(PRESETS)), ids=PRESETS)
def test_preset_smoke_run(smoke_runs, job: int) -> None:
    code, log, sweep = smoke_runs
    assert code == 0, log[-3000:]
    run_dir = sweep / str(job)  # multirun jobs are numbered in the order of the sweep list
    expected = compose_preset(PRESETS[job], ["model.name_or_path=x"])
    assert OmegaConf.load(run_dir / "config.yaml").run_name == expected.run_name
    assert (run_dir / "export" / "config.json").is_file()
    assert (run_dir / "export" / "README.md").is_file()


# --------------------------------------------------------------------------- minimal YAML

GROUPS = ("model", "data", "loss", "deepspeed", "logger")


def _leaves(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        out: dict[str, object] = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _yaml(path: Path) -> dict[str, object]:
    data = OmegaConf.to_container(OmegaConf.load(path)) or {}
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize(
    "path",
    sorted(p for g in GROUPS for p in (ROOT / "configs" / g).glob("*.yaml")),
    ids=lambda p: f"{p.parent.name}/{p.stem}",
)
def test_group_yaml_lists_only_what_differs_from_the_schema(path: Path) -> None:
    schema = OmegaConf.to_container(OmegaConf.structured(Config))[path.parent.name]
    defaults = _leaves(schema)
    for key, value in _leaves(_yaml(path)).items():
        assert key in defaults, f"{path}: {key} is not a schema field"
        assert value != defaults[key], f"{path}: {key}={value!r} repeats the schema default"


def _base_choices() -> dict[str, str]:
    root = _yaml(ROOT / "configs" / "config.yaml")
    return {k: v for d in root["defaults"] if isinstance(d, dict) for k, v in d.items()}


@pytest.mark.parametrize("name", PRESETS)
def test_overlay_lists_only_what_it_changes(name: str) -> None:
    overlay = _yaml(ROOT / "configs" / "experiment" / f"{name}.yaml")
    base_choices = _base_choices()
    picks = {}
    for entry in overlay.pop("defaults", []):
        for key, option in entry.items():
            group = key.removeprefix("override /")
            assert base_choices.get(group) != option, (
                f"experiment/{name}: re-selects the default {group}={option}"
            )
            picks[group] = option
    # What the same group options give without the overlay's own values.
    register_schemas()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        base = compose(
            config_name="config",
            overrides=["~experiment", *(f"{g}={o}" for g, o in picks.items())],
        )
    base_leaves = _leaves(OmegaConf.to_container(base))
    for key, value in _leaves(overlay).items():
        assert key in base_leaves, f"experiment/{name}: {key} is not a config key"
        assert value != base_leaves[key], (
            f"experiment/{name}: {key}={value!r} is what it would be without the overlay"
        )
