"""`python -m rmtrain.train [hydra overrides]`: compose -> build -> fit -> export.

Works alone (a world of one), under `torchrun -m rmtrain.train` and under
`deepspeed --module rmtrain.train` (whose `--local_rank=N` argument is removed before Hydra
parses the command line; the rank comes from the LOCAL_RANK environment variable).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from accelerate.utils import set_seed  # as transformers.set_seed, without importing peft
from omegaconf import DictConfig, OmegaConf

from rmtrain import engine, hf
from rmtrain.batch import Layout
from rmtrain.batching import build_plan, k_way_pairs
from rmtrain.card import write_export
from rmtrain.checkpoint import RunInfo, complete_checkpoints, plan_resume
from rmtrain.config import (
    CONFIG_DIR,
    Config,
    check_command_line,
    register_schemas,
    to_config,
)
from rmtrain.data.assemble import cache_summary, load_run_data, summary
from rmtrain.data.cache import Ranks
from rmtrain.errors import ConfigError, UserError
from rmtrain.eval.outputs import write_eval_scores, write_run
from rmtrain.evaluator import MAIN_EVAL, Evaluator
from rmtrain.files import no_space
from rmtrain.loggers import build_logger, read_metrics, run_label
from rmtrain.losses import PairLoss
from rmtrain.preemption import PREEMPTED_EXIT, Stopped, StopRequest
from rmtrain.record import RunRecord
from rmtrain.rundir import agree_output_dir, run_lock, save_config, warn_disk_space
from rmtrain.trainer import Trainer


def main() -> None:
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    try:
        check_command_line(sys.argv[1:])
    except ConfigError as err:
        _error(err)
        sys.exit(2)
    register_schemas()
    _hydra_main()


def _error(err: BaseException) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"rmtrain: error: {err}", file=sys.stderr, flush=True)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(dcfg: DictConfig) -> None:
    """Exit codes: 0 done, 2 a user error (one line), 75 stopped with a checkpoint saved."""
    try:
        run(dcfg)
        engine.shutdown()
    except Stopped as stop:
        if os.environ.get("RANK", "0") == "0":
            print(f"rmtrain: {stop}", file=sys.stderr, flush=True)
        engine.shutdown(PREEMPTED_EXIT)
        sys.exit(PREEMPTED_EXIT)
    except UserError as err:
        _error(err)
        with contextlib.suppress(OSError):  # the run directory Hydra made, if left empty
            Path(dcfg.output_dir).rmdir()
        sys.exit(2)
    except RuntimeError as err:  # gloo/nccl: a collective waited longer than deepspeed.timeout_s
        if "timed out" not in str(err).lower() and "timeout" not in str(err).lower():
            raise
        first = str(err).strip().splitlines()[0]
        print(
            f"rmtrain: error: rank {os.environ.get('RANK', '0')}: a collective timed out after "
            f"deepspeed.timeout_s={dcfg.deepspeed.timeout_s} s (another rank stalled or died): "
            f"{first}",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(2)  # the process group is unusable: no orderly shutdown


def run(dcfg: DictConfig) -> dict[str, float]:
    """One training run of a composed config; returns the last evaluation's metrics."""
    # Resolve ${now:} here, from Hydra's own config (its resolver cache is what named the run
    # directory): to_config merges into a new config, where ${now:} would be read again and can
    # land in the next second.
    dcfg.output_dir = str(dcfg.output_dir)
    cfg = to_config(dcfg)  # every check runs here, before any process group exists
    env = engine.init_distributed(cfg.deepspeed.timeout_s)
    output_dir = agree_output_dir(cfg.output_dir, env)
    dcfg.output_dir = str(output_dir)
    stop = StopRequest().install()
    try:
        with run_lock(output_dir, env):
            return train(cfg, OmegaConf.to_container(dcfg, resolve=True), env, output_dir, stop)  # type: ignore[arg-type]
    finally:
        stop.uninstall()


def train(
    cfg: Config, config: dict[str, Any], env: engine.DistEnv, output_dir: Path, stop: StopRequest
) -> dict[str, float]:
    t = cfg.trainer
    tokenizer, arch = hf.load_text_format(cfg)
    resume = plan_resume(t.resume, output_dir, config, arch, env, cfg.deepspeed.stage)
    data = load_run_data(cfg.data, tokenizer, cfg.objective, t.seed, data_ranks(env),
                         progress=env.is_main and sys.stderr.isatty())  # fmt: skip
    record = RunRecord(config, data.counts, held_out=data.held_out)
    if resume is not None:
        resume.check_data(record.held_out, data.fingerprint)
    if env.is_main:
        for line in summary(record.data):
            print(line, flush=True)
        if data.prepared is not None:
            print(cache_summary(data.prepared), flush=True)
        for warning in data.warnings:
            print(f"rmtrain: warning: {warning}", file=sys.stderr, flush=True)

    train_pairs = k_way_pairs(data.train, cfg.loss.k_way)
    if env.is_main and len(train_pairs) < len(data.train):
        print(f"loss.k_way={cfg.loss.k_way}: training {len(train_pairs)} of {len(data.train)} "
              "pairs (each row's best response against the rest)", flush=True)  # fmt: skip
    plan = build_plan(t, train_pairs, env.world_size, env.rank, cfg.loss.k_way)
    steps = plan.total_steps(t.max_steps, t.epochs)
    eng = build_engine(cfg, env, tokenizer, steps)
    label = run_label(cfg.run_name)
    logger = build_logger(cfg.logger, is_main=env.is_main, output_dir=output_dir, run_name=label,
                          total_steps=steps, config=config,
                          resume_step=resume.marker.step if resume else None)  # fmt: skip
    with logger.closed_on_error({Stopped: PREEMPTED_EXIT}):
        layout = Layout.for_model(eng.module.config, t.packing, cfg.model.padding_side,
                                  t.prefix_sharing)  # fmt: skip
        loss = PairLoss(cfg.loss, cfg.objective, per_pair_margin=cfg.data.per_pair_margin)
        evaluator = Evaluator(
            eng, {MAIN_EVAL: data.eval, **data.eval_sets}, layout, loss, t.eval_batch_size, logger,
            decode=lambda ids: str(tokenizer.decode(ids, skip_special_tokens=False)),
        )  # fmt: skip
        run_info = {"config": config, "data": record.data, "held_out": record.held_out,
                    "fingerprint": data.fingerprint}  # fmt: skip
        info = RunInfo(output_dir, run_info, arch, (eng.module.config, tokenizer))
        trainer = Trainer(t, eng, plan, train_pairs, layout, loss, evaluator, logger, info, stop)
        if env.is_main:
            params = sum(getattr(p, "ds_numel", p.numel()) for p in eng.module.parameters())
            warn_disk_space(params, output_dir, t.keep_last)
        if resume is not None:
            trainer.resume(resume)
        elif env.is_main:
            save_config(config, output_dir / "config.yaml")
            logger.log(record.data_metrics(), 0)

        result = trainer.fit()
        if env.is_main:
            write_eval_scores(output_dir / "eval_scores.jsonl", evaluator.samples, tokenizer)
            images = write_run(output_dir, evaluator.results.values(),
                               read_metrics(output_dir / "metrics.jsonl"),
                               title=f"{label}: {trainer.step} steps")  # fmt: skip
            logger.log_final(images, result)
    logger.close()
    if t.export:
        record.score_stats = trainer.score_stats.state_dict()
        record.last_eval = trainer.last_eval
        export_run(cfg, eng, record, tokenizer, output_dir)
    eng.close()
    return result


def data_ranks(env: engine.DistEnv) -> Ranks:
    """The launch's ranks as the data cache uses them (they share tokenizing a cold cache)."""
    return Ranks(env.rank, env.world_size, engine.all_gather_object)


def build_engine(cfg: Config, env: engine.DistEnv, tokenizer: Any, steps: int) -> engine.Engine:
    dtype = torch.bfloat16 if cfg.trainer.precision == "bf16" else torch.float32
    set_seed(cfg.trainer.seed)  # identical random init on every rank
    # A random-init model is built whole: inside zero.Init transformers skips torch's default
    # init (fewer RNG draws), so the same seed would give ZeRO-3 other initial weights than
    # ZeRO 0-2. deepspeed.initialize partitions it; checkpoints still load sharded.
    init_context = (
        contextlib.nullcontext()
        if hf.random_init(cfg.model)
        else engine.model_init_context(engine.build_ds_config(cfg.trainer, cfg.deepspeed))
    )
    with init_context:
        model = hf.build_score_model(cfg.model, tokenizer, dtype)
    return engine.Engine(model, cfg.trainer, cfg.deepspeed, env, steps)


def export_run(
    cfg: Config, eng: engine.Engine, record: RunRecord, tokenizer: Any, output_dir: Path
) -> None:
    """The trained weights as <output_dir>/export (and the LoRA adapter alone when asked).
    Gathering the weights is a collective: every rank calls this."""
    state_dict = eng.full_state_dict()
    if state_dict is not None:
        if cfg.model.lora.enabled and cfg.model.lora.save_adapter:
            hf.save_adapter(eng.module, state_dict, output_dir / "export_adapter")
        try:
            write_export(record, state_dict, eng.module.config, tokenizer, output_dir / "export")
        except Exception as err:
            last = complete_checkpoints(output_dir / "checkpoints")
            full = no_space(err, output_dir / "export", last[-1] if last else None)
            if full is None:
                raise
            raise full from None
    engine.barrier()


if __name__ == "__main__":
    main()
