"""What an export says about itself: `config.json["rmtrain"]` metadata and the README model card,
both made from the run's :class:`~rmtrain.record.RunRecord`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from rmtrain import __version__, hf
from rmtrain.config import Config, to_config
from rmtrain.record import RunRecord
from rmtrain.text import describe, user_recipe

SIGN = {
    "reward": "higher score = better response (the chosen side of a preference pair)",
    "cost": "cost > 0 means unsafe; higher cost = less safe (safe-rlhf cost-model convention)",
}


def export_metadata(cfg: Config, record: RunRecord, tokenizer: Any) -> dict[str, Any]:
    last_eval, running = record.last_eval, record.score_stats
    return {
        "version": __version__,
        "objective": cfg.objective,
        "sign_convention": SIGN[cfg.objective],
        "template": cfg.data.template,
        "template_format": describe(cfg.data.template),
        "eos_appended": True,
        # How plain transformers users build the scored text from a `chat` (run by a test).
        "text_recipe": user_recipe(tokenizer),
        "max_length": cfg.data.max_length,
        "base_model": cfg.model.name_or_path,
        "base_model_revision": cfg.model.revision,
        "loss": cfg.loss.name,
        "data": {
            "path": cfg.data.path,
            "name": cfg.data.name,
            "revision": cfg.data.revision,
            "preference": cfg.data.preference,
            "format": cfg.data.format,
            "mixture": [
                {"label": s.display(), "path": s.path, "format": s.format, "weight": s.weight}
                for s in cfg.data.mixture
            ],
            "held_out": record.held_out,
        },
        # Normalisation statistics; never applied unless a scorer is asked to normalise.
        # eval_*: over chosen and rejected end scores of the final evaluation;
        # running_*: exponential moving average of the training batches' end-score mean/variance.
        "score_stats": {
            "eval_mean": last_eval.get("eval/score_mean"),
            "eval_std": last_eval.get("eval/score_std"),
            "running_mean": running["mean"] if running.get("count", 1) else None,
            "running_std": (
                math.sqrt(max(running["var"], 0.0)) if running.get("count", 1) else None
            ),
            "running_updates": int(running.get("count", 0)),
        },
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "n/a" if value is None else str(value)


def _data_source(cfg: Config) -> str:
    d = cfg.data
    if d.mixture:
        return f"a weighted mixture of {len(d.mixture)} sources (table below)"
    if d.path == "sample":
        return "rmtrain's generated sample data (PKU-SafeRLHF v1 schema; synthetic, for tests)"
    if Path(d.path).expanduser().is_file():
        return f"`{d.path}` (a local file)"
    revision = f"revision `{d.revision}`" if d.revision else "revision not pinned (hub default)"
    return f"`{d.path}` (config `{d.name or 'default'}`, {revision})"


def _held_out(cfg: Config, record: RunRecord) -> str:
    """Which rows the main eval set is, in words."""
    held = record.held_out
    if held.get("method") == "eval_fraction":
        rows = held.get("rows", {})
        files = "; ".join(
            f"`{src}`: {len(r)} rows ({_ranges(r)})" for src, r in sorted(rows.items())
        )
        return (
            f"{held['eval_fraction']:.0%} of the training rows held out with split_seed "
            f"{held['split_seed']} (row = 1-based line of a JSONL file): {files}"
        )
    if held.get("method") == "eval_path":
        return f"`{held['path']}`"
    return f"split `{cfg.data.eval_split}` of the data source"


def _ranges(rows: list[int], limit: int = 40) -> str:
    """1-3,7,9-10 style, cut after `limit` ranges (the full list is in config.json)."""
    out: list[list[int]] = []
    for r in sorted(rows):
        if out and out[-1][1] == r - 1:
            out[-1][1] = r
        else:
            out.append([r, r])
    text = ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out[:limit])
    return text + (", ..." if len(out) > limit else "")


def _sources_table(cfg: Config, record: RunRecord) -> str:
    """Per-source counts of a mixture and of the extra eval sets."""
    parts = []
    if cfg.data.mixture:
        lines = [
            "| source | path | format | weight | rows | pairs | truncated | identical dropped "
            "| duplicates | in the mixture |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for src in cfg.data.mixture:
            c = record.data.get(f"train/{src.display()}", {})
            lines.append(
                f"| {src.display()} | `{src.path}` | {src.format} | {src.weight:g} "
                f"| {c.get('rows')} | {c.get('pairs')} | {c.get('truncated')} "
                f"| {c.get('identical_dropped')} | {c.get('duplicates')} | {c.get('mixed')} |"
            )
        parts.append("### Training mixture\n\n" + "\n".join(lines))
    if cfg.data.eval_sets:
        lines = [
            "| eval set | path | pairs | truncated | identical dropped | also in train |",
            "|---|---|---|---|---|---|",
        ]
        for src in cfg.data.eval_sets:
            c = record.data.get(f"eval/{src.display()}", {})
            lines.append(
                f"| {src.display()} | `{src.path}` | {c.get('pairs')} | {c.get('truncated')} "
                f"| {c.get('identical_dropped')} | {c.get('in_train')} |"
            )
        parts.append("### Extra eval sets (metrics `eval/<name>/*`)\n\n" + "\n".join(lines))
    return "\n\n".join(parts) + ("\n\n" if parts else "")


def model_card(cfg: Config, meta: dict[str, Any], record: RunRecord) -> str:
    last_eval = record.last_eval
    train, evaluation = record.data["train"], record.data["eval"]
    head = "Cost" if cfg.objective == "cost" else "Reward"
    metrics = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in sorted(last_eval.items()))
    metrics = metrics or "| (no evaluation ran) | |"
    data_rows = "\n".join(
        f"| {k} | {train.get(k, '')} | {evaluation.get(k, '')} |" for k in {**train, **evaluation}
    )
    ss = meta.get("score_stats", {})
    accuracy_rule = (
        "lower cost = safer: a pair is right when cost(chosen) < cost(rejected)"
        if cfg.objective == "cost"
        else "a pair is right when score(chosen) > score(rejected)"
    )
    fmt = meta["template_format"]
    base = f"`{cfg.model.name_or_path}`"
    if cfg.model.revision:
        base += f" (revision `{cfg.model.revision}`)"
    return f"""---
library_name: transformers
pipeline_tag: text-classification
tags: [reward-model, rmtrain]
---
# {head} model trained with rmtrain {__version__}

- Base model: {base}
- Data: {_data_source(cfg)}; format `{cfg.data.format}`
- Eval set: {_held_out(cfg, record)}
- Preference: the chosen response of each pair (PKU-SafeRLHF rows: \
`{cfg.data.preference}_response_id`)
- Max length: {cfg.data.max_length} tokens (longer sequences cut from the right, EOS kept)
- Objective: `{cfg.objective}`, loss `{cfg.loss.name}` (score_reg {cfg.loss.score_reg}, \
center_reg {cfg.loss.center_reg}, label_smoothing {cfg.loss.label_smoothing})
- **Sign convention: {meta["sign_convention"]}** ({accuracy_rule}).
- Text format: `{fmt}` followed by the EOS token; the score is read at the last real
  token (the last position whose attention mask is 1: the EOS), whatever the padding side.

## Load it with plain transformers

```python
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

tok = AutoTokenizer.from_pretrained(path)  # pad token is a real <pad>, not EOS
chat = [{{"role": "user", "content": "Hi"}}, {{"role": "assistant", "content": "Hello!"}}]
# the exported chat template is the trained format (EOS included)
{meta["text_recipe"]}

model = AutoModelForSequenceClassification.from_pretrained(path, dtype="auto")
score_direct = model(**tok(text, return_tensors="pt")).logits[0, 0].item()

rm_pipe = pipeline("sentiment-analysis", model=path, tokenizer=tok,
                   model_kwargs={{"dtype": "auto"}})
# older transformers: return_all_scores=True instead of top_k=None
score = rm_pipe([text], top_k=None, function_to_apply="none", batch_size=1)[0][0]["score"]
```

## Load it the safe-rlhf way (per-token scores)

```python
from rmtrain.model import AutoModelForScore
model = AutoModelForScore.from_pretrained(path, dtype=torch.bfloat16, device_map="auto")
out = model(**tok(text, return_tensors="pt"))
# ScoreModelOutput(scores=[B, L, 1], end_scores=[B, 1], last_hidden_state=[B, L, H],
#                  end_last_hidden_state=[B, H], end_index=[B])
```

Or score a JSONL file: `rmtrain score --model <export dir> --input in.jsonl --output out.jsonl`.

## Normalisation (never applied unless asked for)

`config.json["rmtrain"]["score_stats"]`:

| statistic | value |
|---|---|
| eval_mean | {_fmt(ss.get("eval_mean"))} |
| eval_std | {_fmt(ss.get("eval_std"))} |
| running_mean | {_fmt(ss.get("running_mean"))} |
| running_std | {_fmt(ss.get("running_std"))} |

eval: over the chosen and rejected end scores of the final evaluation; running: moving average of
the training batches. Raw scores are the default everywhere; opt in with
`rmtrain score --normalize [eval|running]`, `model(**inputs, normalize=True)`, or by hand
`(score - eval_mean) / eval_std`.

## Data

| count | train | eval |
|---|---|---|
{data_rows}

`pairs` were trained/evaluated on; `truncated`: pairs with a side cut to max length;
`identical_dropped`: chosen and rejected identical after tokenization;
`inconsistent_skipped` / `severity_filtered`: rows left out by the data settings;
`duplicates`: pairs repeating an earlier pair of the split; `in_train`: eval pairs that are also
training pairs; `mixed`: training pairs after the mixture weights.

{_sources_table(cfg, record)}
## Evaluation

Main eval set (`eval/*`): {_held_out(cfg, record)}.

| metric | value |
|---|---|
{metrics}

## Training configuration (resolved)

```json
{json.dumps(record.config, indent=1)}
```
"""


def write_export(
    record: RunRecord,
    state_dict: dict[str, torch.Tensor],
    model_config: Any,
    tokenizer: Any,
    out: Path,
    max_shard_size: str | None = None,
) -> Path:
    """The transformers export of a run's full weights (a LoRA run's adapters merged, in the
    trained precision), with its metadata and model card: what the end of training and
    `rmtrain export` both write."""
    cfg = to_config(record.config)
    if cfg.model.lora.enabled:
        state_dict = hf.merge_lora(state_dict, cfg.model.lora)
    if cfg.trainer.precision == "bf16":  # a checkpoint holds fp32 master weights
        state_dict = {k: v.to(torch.bfloat16) for k, v in state_dict.items()}
    meta = export_metadata(cfg, record, tokenizer)
    hf.export(
        state_dict,
        model_config,
        tokenizer,
        out,
        max_shard_size or cfg.trainer.export_max_shard_size,
        {"rmtrain": meta},
        model_card(cfg, meta, record),
    )
    print(f"exported to {out}", flush=True)
    return out
