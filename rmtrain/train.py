"""`python -m rmtrain.train [hydra overrides]`: compose -> validate -> build -> fit -> export.

Works alone (a world of one), under `torchrun -m rmtrain.train` and under
`deepspeed --module rmtrain.train` (whose `--local_rank=N` argument is removed before Hydra
parses the command line; the rank comes from the LOCAL_RANK environment variable).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import hydra
import torch
from accelerate.utils import set_seed  # as transformers.set_seed, without importing peft
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from rmtrain import engine, hf, text
from rmtrain.batching import BatchPlan, TokenBudgetPlan
from rmtrain.card import write_export
from rmtrain.checkpoint import (
    Checkpointer,
    check_compatible,
    complete_checkpoints,
    find_resume_point,
    read_marker,
)
from rmtrain.config import Config, ConfigError, register_schemas, to_config
from rmtrain.data.assemble import RunData, load_run_data, summary
from rmtrain.data.collate import collate_pairs
from rmtrain.data.errors import DataError
from rmtrain.eval.outputs import write_run
from rmtrain.loggers import build_logger
from rmtrain.record import RunRecord
from rmtrain.trainer import DivergenceError, Trainer

# Keys that may change when a run is resumed; they take effect from the resumed step (and the
# marker records the change). Any other difference from the checkpoint's config is refused.
RESUME_MAY_CHANGE = (
    "trainer.lr",
    "trainer.max_steps",
    "trainer.eval_every",
    "trainer.eval_at_start",
    "trainer.save_every",
    "trainer.save_every_minutes",
    "trainer.log_every",
    "trainer.keep_last",
    "trainer.resume",
    "trainer.export",
    "trainer.export_max_shard_size",
    "deepspeed.timeout_s",
    "output_dir",
    "run_name",
    "logger.",
)

CONFIG_DIR = next(
    p
    for p in (Path(__file__).parent / "configs", Path(__file__).parents[1] / "configs")
    if p.is_dir()
)


SEQ_COLUMNS = ("chosen_input_ids", "rejected_input_ids")


def main() -> None:
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    try:
        check_command_line(sys.argv[1:])
    except ConfigError as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"rmtrain: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    register_schemas()
    _hydra_main()


def check_command_line(argv: list[str]) -> None:
    """Refuse, before Hydra runs anything: a sweep under a multi-rank launcher (each rank would
    run the jobs on its own), and code in a config: `_target_` keys or `hydra.callbacks` in a
    `--config-path` directory (a saved run's config.yaml is plain data) or on the command line.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and any(
        a in ("-m", "--multirun") or a.startswith("hydra.mode=") for a in argv
    ):
        raise ConfigError(
            "a Hydra multirun (-m) cannot run under a multi-rank launcher; start one launch "
            "per setting (e.g. a shell loop over launch/cpu.sh)"
        )
    for a in argv:
        if "_target_" in a or a.lstrip("+~").startswith("hydra.callbacks"):
            raise ConfigError(f"{a}: configs hold data, not code (_target_ / hydra.callbacks)")
    config_path = None
    for i, a in enumerate(argv):
        if a in ("--config-path", "-cp") and i + 1 < len(argv):
            config_path = argv[i + 1]
        elif a.startswith("--config-path="):
            config_path = a.split("=", 1)[1]
    if config_path is not None:
        for file in sorted(Path(config_path).rglob("*.yaml")):
            found = _code_keys(OmegaConf.to_container(OmegaConf.load(file)), "")
            if found:
                raise ConfigError(
                    f"{file}: refusing to run a config that holds code ({found}); rmtrain "
                    "writes plain data, so this was added by hand"
                )


def _code_keys(node: Any, prefix: str) -> str | None:
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if key == "_target_" or path == "hydra.callbacks":
                return path
            found = _code_keys(value, f"{path}.")
            if found:
                return found
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found = _code_keys(value, f"{prefix}{i}.")
            if found:
                return found
    return None


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(dcfg: DictConfig) -> None:
    try:
        run(dcfg)
    except engine.Stopped as stop:
        if os.environ.get("RANK", "0") == "0":
            print(f"rmtrain: {stop}", file=sys.stderr, flush=True)
        engine.shutdown(engine.PREEMPTED_EXIT)
        sys.exit(engine.PREEMPTED_EXIT)
    except (
        ConfigError,
        DataError,
        text.TextError,
        engine.CheckpointError,
        DivergenceError,
    ) as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"rmtrain: error: {err}", file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):  # the run directory, if the error left it empty
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
    # Resolve ${now:} here, from Hydra's own config (its resolver cache is what named the run
    # directory): to_config merges into a new config, where ${now:} would be read again and can
    # land in the next second.
    dcfg.output_dir = str(dcfg.output_dir)
    cfg = to_config(dcfg)  # every check runs here, before any process group exists
    env = engine.init_distributed(cfg.deepspeed.timeout_s)
    output_dir = agree_output_dir(cfg.output_dir, env)
    stop = engine.StopRequest().install()
    try:
        with run_lock(output_dir, env):
            return _run(dcfg, cfg, env, output_dir, stop)
    finally:
        stop.uninstall()


def _run(
    dcfg: DictConfig, cfg: Config, env: engine.DistEnv, output_dir: Path, stop: engine.StopRequest
) -> dict[str, float]:
    dcfg.output_dir = str(output_dir)
    config_dict: dict[str, Any] = OmegaConf.to_container(dcfg, resolve=True)  # type: ignore[assignment]

    tokenizer, arch = load_text_format(cfg)
    resume_from = check_resume(cfg, output_dir, arch, env)
    changes: dict[str, Any] = {}
    if resume_from is not None:
        changes = resume_changes(read_marker(resume_from)["run"]["config"], config_dict)
        if env.is_main:
            drop_metrics_after(output_dir / "metrics.jsonl", read_marker(resume_from)["step"])
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

    label = run_label(cfg)
    logger = build_logger(
        cfg.logger,
        is_main=env.is_main,
        output_dir=output_dir,
        run_name=label,
        total_steps=steps,
        config=config_dict,
    )
    trainer = Trainer(
        cfg, eng, plan, train_pairs, data.eval, collate, logger, data.eval_sets,
        decode=lambda ids: str(tokenizer.decode(ids, skip_special_tokens=False)),
    )  # fmt: skip
    checkpointer = Checkpointer(
        eng,
        output_dir,
        every=t.save_every,
        keep_last=t.keep_last,
        states={"trainer": trainer},
        run={"config": record.config, "data": record.data, "held_out": record.held_out},
        architecture=arch,
        hf_files=(eng.module.config, tokenizer),
        every_minutes=t.save_every_minutes,
        stop=stop,
    )
    trainer.checkpointer = checkpointer
    if env.is_main:
        warn_disk_space(eng, output_dir, t.keep_last)
    if resume_from is not None:
        resume(checkpointer, resume_from, changes, t.lr)
    elif env.is_main:
        save_config(config_dict, output_dir / "config.yaml")
        logger.log(record.data_metrics(), 0)

    result = trainer.fit()
    if env.is_main:
        write_eval_scores(output_dir / "eval_scores.jsonl", trainer.eval_samples, tokenizer)
        images = write_run(
            output_dir, trainer.evaluations.values(), read_metrics(output_dir / "metrics.jsonl"),
            title=f"{label}: {trainer.step} steps",
        )  # fmt: skip
        logger.log_final(images, result)
    logger.close()
    if t.export:
        record.score_stats = trainer.score_stats.state_dict()
        record.last_eval = trainer.last_eval
        export_run(cfg, eng, record, tokenizer, output_dir)
    eng.close()
    engine.shutdown()
    return result


def load_text_format(cfg: Config) -> tuple[Any, dict[str, Any]]:
    """The tokenizer with the chat template the run trains and exports, and the model's
    architecture record (checked against a resumed checkpoint's)."""
    tokenizer = hf.load_tokenizer(cfg.model)
    text.use_template(tokenizer, cfg.data.template)
    model_config = hf.score_model_config(cfg.model, tokenizer)
    hf.check_training(model_config, cfg.model, cfg.trainer.packing)
    context = getattr(model_config, "max_position_embeddings", None)
    if context is not None and cfg.data.max_length > context:
        raise ConfigError(
            f"data.max_length={cfg.data.max_length} exceeds the model's context "
            f"({context} positions)"
        )
    return tokenizer, hf.architecture(model_config, tokenizer)


def resume(
    checkpointer: Checkpointer, path: Path, changes: dict[str, list[Any]], lr: float
) -> None:
    """Load `path` into the engine and trainer; record the keys changed on this resume."""
    step = checkpointer.load(path)
    checkpointer.engine.set_peak_lr(lr)  # the loaded scheduler state holds the old peak
    history = list(read_marker(path)["run"].get("resumed", []))
    if changes:
        history.append({"step": step, "changed": changes})
        print(f"resume: from step {step} on, {_describe(changes)}", flush=True)
    checkpointer.run["resumed"] = history
    print(f"resumed from {path} at step {step}", flush=True)


def export_run(
    cfg: Config, eng: engine.Engine, record: RunRecord, tokenizer: Any, output_dir: Path
) -> None:
    """The trained weights as <output_dir>/export (LoRA merged; the adapter too when asked).
    Gathering the weights is a collective: every rank calls this."""
    state_dict = eng.full_state_dict()
    if state_dict is not None:
        if cfg.model.lora.enabled:
            if cfg.model.lora.save_adapter:
                hf.save_adapter(eng.module, state_dict, output_dir / "export_adapter")
            state_dict = hf.merge_lora(state_dict, cfg.model.lora)
        try:
            write_export(record, state_dict, eng.module.config, tokenizer, output_dir / "export")
        except Exception as err:
            last = complete_checkpoints(output_dir / "checkpoints")
            full = engine.no_space(err, output_dir / "export", last[-1] if last else None)
            if full is None:
                raise
            raise full from None
    engine.barrier()


@contextlib.contextmanager
def run_lock(output_dir: Path, env: engine.DistEnv) -> Iterator[None]:
    """One run per directory: rank 0 holds an exclusive flock on <output_dir>/.rmtrain.lock for
    the run's life (released by the kernel however the process ends)."""
    holder = None
    error = None
    if env.is_main:
        holder = (output_dir / ".rmtrain.lock").open("a+")
        try:
            fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
            holder.seek(0)
            holder.truncate()
            holder.write(f"{os.getpid()}\n")
            holder.flush()
        except BlockingIOError:
            holder.seek(0)
            pid = holder.read().strip() or "?"
            holder.close()
            holder = None
            error = f"output_dir={output_dir} is in use by another run (pid {pid}); wait for it"
    error = engine.broadcast_object(error)
    if error:
        raise ConfigError(error)
    try:
        yield
    finally:
        if holder is not None:
            lock = output_dir / ".rmtrain.lock"
            if [p.name for p in output_dir.iterdir()] == [lock.name]:
                lock.unlink()  # a run that failed before writing anything leaves no directory
            holder.close()


def resume_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, list[Any]]:
    """{key: [was, now]} for the keys allowed to change on resume; ConfigError for any other."""
    was_flat, now_flat = _flatten(saved), _flatten(now)
    changes: dict[str, list[Any]] = {}
    for key in sorted(was_flat.keys() | now_flat.keys()):
        was, new = was_flat.get(key), now_flat.get(key)
        if was == new:
            continue
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_MAY_CHANGE):
            raise ConfigError(
                f"cannot resume with {key}={new!r}: the checkpoint was trained with {was!r}. "
                f"Only {', '.join(k.rstrip('.') for k in RESUME_MAY_CHANGE)} may change on resume"
            )
        if key not in ("trainer.resume", "output_dir"):
            changes[key] = [was, new]
    return changes


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def _describe(changes: dict[str, list[Any]]) -> str:
    return ", ".join(f"{k}={new!r} (was {was!r})" for k, (was, new) in changes.items())


def drop_metrics_after(path: Path, step: int) -> None:
    """Remove the lines a killed run logged after its last checkpoint: they are re-run."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(keep) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)


def warn_disk_space(eng: engine.Engine, output_dir: Path, keep_last: int) -> None:
    """Warn up front when the disk cannot hold the checkpoints (about 16 bytes per parameter:
    weights, fp32 master copy and two Adam moments) plus an export."""
    params = sum(getattr(p, "ds_numel", p.numel()) for p in eng.module.parameters())
    need = params * (16 * (keep_last + 1) + 4)
    free = shutil.disk_usage(output_dir).free
    if free < need:
        print(
            f"rmtrain: warning: {_size(free)} free at {output_dir}, checkpoints and export "
            f"need about {_size(need)}",
            file=sys.stderr,
            flush=True,
        )


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_resume(
    cfg: Config, output_dir: Path, architecture: dict[str, Any], env: engine.DistEnv
) -> Path | None:
    """The checkpoint to resume from, checked against this run before anything is built."""
    # Rank 0 reads and verifies the checkpoints; every rank gets its answer (or its error).
    found: tuple[str | None, str | None] = (None, None)
    if env.is_main:
        try:
            point = find_resume_point(cfg.trainer.resume, output_dir)
            found = (str(point) if point else None, None)
        except (ConfigError, engine.CheckpointError) as err:
            found = (None, str(err))
    path, error = engine.broadcast_object(found)
    if error:
        raise engine.CheckpointError(error)
    resume_from = Path(path) if path else None
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
    d = cfg.data
    paths = {"train": d.path, "eval": d.eval_path or d.path}
    paths.update({f"eval/{src.display()}": src.path for src in d.eval_sets})
    sets = [("train", data.train), ("eval", data.eval)]
    sets += [(f"eval/{name}", pairs) for name, pairs in data.eval_sets.items()]
    for name, pairs in sets:
        if len(pairs) == 0:
            c = data.counts.get(name, {})
            raise DataError(
                f"{paths.get(name, d.path)}: no usable pairs left in {name} ({c.get('rows', 0)} "
                f"rows; {c.get('identical_dropped', 0)} pairs identical after tokenization and "
                f"truncation to data.max_length={d.max_length}, "
                f"{c.get('inconsistent_skipped', 0)} inconsistent, "
                f"{c.get('severity_filtered', 0)} below data.min_severity_gap)"
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


def run_label(cfg: Config) -> str:
    """The run's name in wandb and its report: `run_name`, else the experiment preset's name,
    then the time this process started the run."""
    name = cfg.run_name
    if name is None:
        hc = HydraConfig.get() if HydraConfig.initialized() else None
        name = (hc.runtime.choices.get("experiment") if hc else None) or "rmtrain"
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl (none when the JSONL sink is off)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
