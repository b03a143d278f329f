"""`python -m rmtrain.train [hydra overrides]`: compose -> validate -> build -> fit -> export.

Works alone (a world of one), under `torchrun -m rmtrain.train` and under
`deepspeed --module rmtrain.train` (whose `--local_rank=N` argument is removed before Hydra
parses the command line; the rank comes from the LOCAL_RANK environment variable).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import datasets
import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from transformers import set_seed

from rmtrain import engine, hf, text
from rmtrain.batching import BatchPlan, TokenBudgetPlan
from rmtrain.card import write_export
from rmtrain.checkpoint import Checkpointer, check_compatible, find_resume_point, read_marker
from rmtrain.config import Config, ConfigError, register_schemas, to_config
from rmtrain.data.assemble import RunData, load_run_data, summary
from rmtrain.data.collate import collate_pairs
from rmtrain.data.errors import DataError
from rmtrain.loggers import build_logger
from rmtrain.record import RunRecord
from rmtrain.trainer import Trainer

CONFIG_DIR = next(
    p
    for p in (Path(__file__).parent / "configs", Path(__file__).parents[1] / "configs")
    if p.is_dir()
)


SEQ_COLUMNS = ("chosen_input_ids", "rejected_input_ids")


def main() -> None:
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    register_schemas()
    _hydra_main()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(dcfg: DictConfig) -> None:
    try:
        run(dcfg)
    except (ConfigError, DataError, text.TextError) as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"rmtrain: error: {err}", file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):  # the run directory, if the error left it empty
                Path(dcfg.output_dir).rmdir()
        sys.exit(2)


def run(dcfg: DictConfig) -> dict[str, float]:
    # Resolve ${now:} here, from Hydra's own config (its resolver cache is what named the run
    # directory): to_config merges into a new config, where ${now:} would be read again and can
    # land in the next second.
    dcfg.output_dir = str(dcfg.output_dir)
    cfg = to_config(dcfg)  # every check runs here, before any process group exists
    env = engine.init_distributed(cfg.deepspeed.timeout_s)
    output_dir = agree_output_dir(cfg.output_dir, env)
    dcfg.output_dir = str(output_dir)
    config_dict: dict[str, Any] = OmegaConf.to_container(dcfg, resolve=True)  # type: ignore[assignment]

    tokenizer = hf.load_tokenizer(cfg.model)
    text.use_template(tokenizer, cfg.data.template)  # the text format trained and exported
    arch = hf.architecture(hf.score_model_config(cfg.model, tokenizer), tokenizer)
    resume_from = check_resume(cfg, output_dir, arch, env)
    data, record = load_data(cfg, tokenizer, config_dict)
    if resume_from is not None:
        check_same_data(read_marker(resume_from), record, resume_from)
    train_pairs = data.train
    if env.is_main:
        for line in summary(record.data):
            print(line, flush=True)
        for warning in data.warnings:
            print(f"rmtrain: warning: {warning}", file=sys.stderr, flush=True)
    t = cfg.trainer
    plan = build_plan(cfg, train_pairs, env)
    steps = plan.total_steps(t.max_steps, t.epochs)
    eng = build_engine(cfg, env, tokenizer, steps)

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_pairs(rows, tokenizer.pad_token_id, cfg.model.padding_side)

    logger = build_logger(
        cfg.logger,
        is_main=env.is_main,
        output_dir=output_dir,
        run_name=cfg.run_name,
        total_steps=steps,
        config=config_dict,
    )
    trainer = Trainer(cfg, eng, plan, train_pairs, data.eval, collate, logger, data.eval_sets)
    checkpointer = Checkpointer(
        eng,
        output_dir,
        every=t.save_every,
        keep_last=t.keep_last,
        states={"trainer": trainer},
        run={"config": record.config, "data": record.data, "held_out": record.held_out},
        architecture=arch,
        hf_files=(eng.module.config, tokenizer),
    )
    trainer.checkpointer = checkpointer
    if resume_from is not None:
        step = checkpointer.load(resume_from)
        print(f"resumed from {resume_from} at step {step}", flush=True)
    elif env.is_main:
        save_config(config_dict, output_dir / "config.yaml")
        logger.log(record.data_metrics(), 0)

    result = trainer.fit()
    if env.is_main:
        write_eval_scores(output_dir / "eval_scores.jsonl", trainer.eval_samples, tokenizer)
    logger.close()
    if t.export:
        record.score_stats = trainer.score_stats.state_dict()
        record.last_eval = trainer.last_eval
        state_dict = eng.full_state_dict()  # a collective: every rank takes part
        if state_dict is not None:
            if cfg.model.lora.enabled:
                if cfg.model.lora.save_adapter:
                    hf.save_adapter(eng.module, state_dict, output_dir / "export_adapter")
                state_dict = hf.merge_lora(state_dict, cfg.model.lora)
            write_export(record, state_dict, eng.module.config, tokenizer, output_dir / "export")
        engine.barrier()
    eng.close()
    engine.shutdown()
    return result


def check_resume(
    cfg: Config, output_dir: Path, architecture: dict[str, Any], env: engine.DistEnv
) -> Path | None:
    """The checkpoint to resume from, checked against this run before anything is built."""
    resume_from = find_resume_point(cfg.trainer.resume, output_dir)
    if resume_from is not None:
        layout = {"zero_stage": cfg.deepspeed.stage, "world_size": env.world_size}
        check_compatible(read_marker(resume_from), architecture, layout, resume_from)
    elif engine.broadcast_object((output_dir / "metrics.jsonl").exists()):
        raise ConfigError(
            f"output_dir={output_dir} already holds a run; continue it with "
            "trainer.resume=auto or choose another output_dir"
        )
    if not env.is_main:
        datasets.disable_progress_bars()
    return resume_from


def load_data(
    cfg: Config, tokenizer: Any, config_dict: dict[str, Any]
) -> tuple[RunData, RunRecord]:
    """Tokenized train and eval pairs, and the run record with what was cut, dropped, skipped
    and which rows were held out."""
    data = load_run_data(cfg.data, tokenizer, cfg.objective, cfg.trainer.seed)
    empty = [name for name, pairs in [("train", data.train), ("eval", data.eval),
             *data.eval_sets.items()] if len(pairs) == 0]  # fmt: skip
    if empty:
        raise DataError(
            f"{cfg.data.path}: no usable pairs left in {', '.join(empty)} after dropping and "
            "filtering"
        )
    return data, RunRecord(config_dict, data.counts, held_out=data.held_out)


def check_same_data(marker: dict[str, Any], record: RunRecord, path: Path) -> None:
    """Refuse to resume with other held-out rows than the checkpoint's (a changed training set
    is caught by the data-order check)."""
    was = marker["run"]
    if was.get("held_out", {}) != record.held_out:
        raise ConfigError(
            f"cannot resume from {path}: its eval set was chosen differently "
            f"({_brief(was.get('held_out', {}))} there, {_brief(record.held_out)} now)"
        )


def _brief(held: dict[str, Any]) -> str:
    rows = held.get("rows")
    if rows is not None:
        n = sum(len(v) for v in rows.values())
        return f"eval_fraction={held['eval_fraction']} split_seed={held['split_seed']}, {n} rows"
    return ", ".join(f"{k}={v}" for k, v in held.items()) or "unrecorded"


def build_plan(
    cfg: Config, train_pairs: datasets.Dataset, env: engine.DistEnv
) -> BatchPlan | TokenBudgetPlan:
    """Which pairs each rank sees per step: micro_batch_size pairs per micro-batch, or
    token-budget micro-batches (trainer.max_tokens_per_micro_batch)."""
    t = cfg.trainer
    accum, world = t.gradient_accumulation_steps, env.world_size
    if t.max_tokens_per_micro_batch is None:
        return BatchPlan(len(train_pairs), t.micro_batch_size, accum, world, env.rank, t.seed)
    table = train_pairs.with_format("arrow")[:]
    lengths = [
        a + b
        for a, b in zip(
            *(table.column(k).combine_chunks().value_lengths().to_pylist() for k in SEQ_COLUMNS),
            strict=True,
        )
    ]
    return TokenBudgetPlan(lengths, t.max_tokens_per_micro_batch, accum, world, env.rank, t.seed)


def build_engine(cfg: Config, env: engine.DistEnv, tokenizer: Any, steps: int) -> engine.Engine:
    ds_config = engine.build_ds_config(cfg)
    dtype = torch.bfloat16 if cfg.trainer.precision == "bf16" else torch.float32
    set_seed(cfg.trainer.seed)  # identical random init on every rank
    # A random-init model is built whole: inside zero.Init transformers skips torch's default
    # init (fewer RNG draws), so the same seed would give ZeRO-3 other initial weights than
    # ZeRO 0-2. deepspeed.initialize partitions it; checkpoints still load sharded.
    init_context = (
        contextlib.nullcontext()
        if hf.random_init(cfg.model)
        else engine.model_init_context(ds_config)
    )
    with init_context:
        model = hf.build_score_model(cfg.model, tokenizer, dtype)
    return engine.Engine(model, cfg, ds_config, env, steps)


def save_config(config_dict: dict[str, Any], path: Path) -> None:
    """The resolved config as a primary Hydra config that re-runs the same experiment:
    `rmtrain train --config-path <run dir> --config-name config output_dir=<new dir>`."""
    rerun = {
        "defaults": ["rmtrain_schema", "_self_"],
        **config_dict,
        "hydra": {"run": {"dir": "${output_dir}"}, "output_subdir": None},
    }
    OmegaConf.save(OmegaConf.create(rerun), path)


def agree_output_dir(requested: str, env: engine.DistEnv) -> Path:
    """One run directory for all ranks: rank 0's (a per-rank `${now:}` may differ by a second).

    In a Hydra multirun each job writes to its own sweep subdirectory.
    """
    hc = HydraConfig.get() if HydraConfig.initialized() else None
    if hc is not None and hc.mode == RunMode.MULTIRUN:
        requested = hc.runtime.output_dir
    agreed = Path(engine.broadcast_object(str(Path(requested).absolute())))
    own = Path(requested).absolute()
    if own != agreed and own.is_dir() and not any(own.iterdir()):
        own.rmdir()  # the empty directory Hydra made from this rank's own timestamp
    if env.is_main:
        agreed.mkdir(parents=True, exist_ok=True)
    engine.barrier()
    return agreed


def write_eval_scores(path: Path, samples: list[tuple[list[int], float]], tokenizer: Any) -> None:
    """The trained model's end scores for a few eval sequences (ids and text), to check exports."""
    with path.open("w") as f:
        for ids, score in samples:
            decoded = tokenizer.decode(ids, skip_special_tokens=False)
            if ids[:1] == [tokenizer.bos_token_id] and text.adds_bos(tokenizer):
                decoded = decoded.removeprefix(tokenizer.bos_token)  # tokenizer(text) adds it
            f.write(json.dumps({"input_ids": ids, "text": decoded, "score": score}) + "\n")


if __name__ == "__main__":
    main()
