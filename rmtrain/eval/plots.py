"""PNG plots and a Markdown report for an evaluation run.

matplotlib is imported inside each function, so ``import rmtrain.eval.plots`` stays cheap and
a scoring run that never plots does not need it. Figures are built with the object API
(``matplotlib.figure.Figure`` on the Agg canvas), never pyplot: no global backend switch, no
figure leaks in long runs. Every PNG has a fixed pixel size (``FIGSIZE`` x ``DPI``, saved without
``bbox_inches="tight"``) so reports and tests can rely on it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmtrain.eval.metrics import PairResult, as_pair_result

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DPI",
    "FIGSIZE",
    "plot_category_accuracy",
    "plot_reliability",
    "plot_reward_histograms",
    "plot_score_histograms",
    "plot_training_curves",
    "report_section",
    "write_report",
]

FIGSIZE: tuple[float, float] = (8.0, 5.0)
DPI = 100  # 8 x 5 in at 100 dpi = 800 x 500 px


def _figure() -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png")
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def plot_reward_histograms(
    results: Iterable[PairResult | Mapping[str, Any]],
    path: str | os.PathLike[str],
    bins: int = 40,
    title: str = "Scores of chosen vs rejected responses",
) -> Path:
    """Overlaid histograms of chosen and rejected scores: separation at a glance, and a
    collapsed (constant) or exploding score range is obvious before any accuracy is read."""
    pairs = [as_pair_result(r) for r in results]
    return plot_score_histograms(
        [p.chosen_score for p in pairs], [p.rejected_score for p in pairs], path, bins, title
    )


def plot_score_histograms(
    chosen: Sequence[float],
    rejected: Sequence[float],
    path: str | os.PathLike[str],
    bins: int = 40,
    title: str = "Scores of chosen vs rejected responses",
    labels: tuple[str, str] = ("chosen", "rejected"),
) -> Path:
    """Overlaid histograms of two groups of scores (chosen / rejected responses, or a
    benchmark's correct / incorrect completions); non-finite scores are left out."""
    chosen = [x for x in chosen if math.isfinite(x)]
    rejected = [x for x in rejected if math.isfinite(x)]
    fig = _figure()
    ax = fig.add_subplot()
    both = chosen + rejected
    if both:
        lo, hi = min(both), max(both)
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
        ax.hist(chosen, bins=edges, alpha=0.6, label=f"{labels[0]} (n={len(chosen)})", color="C2")
        ax.hist(
            rejected, bins=edges, alpha=0.6, label=f"{labels[1]} (n={len(rejected)})", color="C3"
        )
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no finite scores", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("score")
    ax.set_ylabel("responses")
    ax.set_title(title)
    return _save(fig, path)


def plot_reliability(
    calib: Mapping[str, Any],
    path: str | os.PathLike[str],
    title: str = "Reliability diagram",
) -> Path:
    """Reliability diagram from :func:`rmtrain.eval.metrics.calibration` output (or the
    ``calibration`` block of a summary): accuracy per confidence bin against the diagonal."""
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    filled = [b for b in calib.get("bins", []) if b.get("count")]
    if filled:
        centers = [(b["lower"] + b["upper"]) / 2 for b in filled]
        widths = [b["upper"] - b["lower"] for b in filled]
        ax.bar(
            centers,
            [b["accuracy"] for b in filled],
            width=widths,
            edgecolor="black",
            alpha=0.7,
            label="accuracy",
        )
        ax.plot(
            [b["mean_confidence"] for b in filled],
            [b["accuracy"] for b in filled],
            marker="o",
            color="C1",
            label="mean confidence",
        )
    ece, brier = calib.get("ece"), calib.get("brier")
    sub = []
    if ece is not None:
        sub.append(f"ECE {ece:.3f}")
    if brier is not None:
        sub.append(f"Brier {brier:.3f}")
    ax.set_title(title + (f" ({', '.join(sub)})" if sub else ""))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence max(p, 1-p), p = sigmoid(chosen - rejected)")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_category_accuracy(
    groups: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike[str],
    title: str = "Accuracy per category",
    xlabel: str = "accuracy",
    reference: float | None = 0.5,
) -> Path:
    """Horizontal bars of accuracy per group (``by_subset``, ``by_category``,
    ``safety.by_harm_category`` ...), labelled with each group's size so tiny groups are not
    over-read, with a dashed line at chance (``reference``). Groups with no accuracy are left
    out."""
    items = [(k, v) for k, v in groups.items() if _finite(v.get("accuracy"))]
    items.sort(key=lambda kv: kv[1]["accuracy"])
    fig = _figure()
    ax = fig.add_subplot()
    if items:
        labels = [f"{k} (n={v.get('n', '?')})" for k, v in items]
        accs = [v["accuracy"] for _, v in items]
        ax.barh(range(len(items)), accs, color="C0")
        ax.set_yticks(range(len(items)), labels, fontsize=max(5, min(9, 300 // len(items))))
        if reference is not None:
            ax.axvline(reference, linestyle="--", color="grey", linewidth=1)
    else:
        ax.text(0.5, 0.5, "no groups", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return _save(fig, path)


def plot_training_curves(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    title: str = "Training curves",
) -> Path:
    """Loss, accuracy and eval margin against ``step`` from ``metrics.jsonl`` rows.

    Panels: ``train/loss`` (and ``eval/loss``); ``train/accuracy`` and ``eval/accuracy``;
    ``eval/margin``. A key missing from a row, or non-finite, is skipped for that row.
    """
    panels = [
        ("loss", ["train/loss", "eval/loss"]),
        ("accuracy", ["train/accuracy", "eval/accuracy"]),
        ("margin", ["eval/margin", "train/margin"]),
    ]
    fig = _figure()
    axes = fig.subplots(1, len(panels))
    for ax, (name, keys) in zip(axes, panels, strict=True):
        drawn = False
        for key in keys:
            pts = [
                (row["step"], row[key])
                for row in rows
                if _finite(row.get("step")) and _finite(row.get(key))
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                marker = "o" if key.startswith("eval/") else None
                ax.plot(xs, ys, marker=marker, markersize=3, label=key)
                drawn = True
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(name)
        ax.set_xlabel("step")
    fig.suptitle(title)
    return _save(fig, path)


def _fmt(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return "n/a" if x is None else str(x)
    if isinstance(x, float):
        return f"{x:.4f}"
    return str(x)


def _metric_rows(summary: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The handful of numbers a reader looks for first, in a fixed order."""
    rows: list[tuple[str, Any]] = [("kind", summary.get("kind"))]
    overall = summary.get("overall") or {}
    rows += [
        ("pairs scored", overall.get("n")),
        ("non-finite pairs (excluded)", summary.get("n_nonfinite")),
        ("accuracy (ties = 1/2)", overall.get("accuracy")),
        ("ties", overall.get("n_ties")),
        ("mean margin", overall.get("mean_margin")),
    ]
    calib = summary.get("calibration") or {}
    rows += [("ECE", calib.get("ece")), ("Brier", calib.get("brier"))]
    rb = summary.get("rewardbench")
    if rb:
        rows += [(f"RewardBench {k}", v) for k, v in rb.get("sections", {}).items()]
        rows.append(("RewardBench score", rb.get("score")))
    rb2 = summary.get("rewardbench2")
    if rb2:
        rows += [(f"RewardBench 2 {k}", v) for k, v in rb2.get("scores", {}).items()]
        rows.append(("RewardBench 2 score", rb2.get("score")))
    rm = summary.get("rmbench")
    if rm:
        rows += [(f"RM-Bench {k}", rm.get(k)) for k in ("easy", "normal", "hard", "overall")]
    lb = summary.get("length_bias")
    if lb:
        rows += [
            ("length corr. (Pearson)", lb.get("pearson")),
            ("length corr. (Spearman)", lb.get("spearman")),
            ("accuracy, chosen longer", (lb.get("chosen_longer") or {}).get("accuracy")),
            ("accuracy, chosen shorter", (lb.get("chosen_shorter") or {}).get("accuracy")),
        ]
    cs = summary.get("cost_sign")
    if cs:
        rows.append(("cost sign accuracy", cs.get("accuracy")))
    return rows


def write_report(
    out_dir: str | os.PathLike[str],
    summary: Mapping[str, Any],
    images: Mapping[str, str | os.PathLike[str]],
    title: str = "Evaluation report",
) -> Path:
    """Write ``out_dir/report.md``: a compact metrics table, then each image (by caption)
    embedded with a link relative to ``out_dir``, so the folder can be moved or published."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = out / "report.md"
    lines = [f"# {title}", *report_section(summary, images, out, "##")]
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


def report_section(
    summary: Mapping[str, Any],
    images: Mapping[str, str | os.PathLike[str]],
    base: Path,
    heading: str,
) -> list[str]:
    """Markdown lines: the metrics table, then each image under a `heading` caption, linked
    relative to `base` (the folder of the report that embeds them)."""
    lines = ["", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_fmt(value)} |" for name, value in _metric_rows(summary)]
    for caption, image in images.items():
        rel = Path(os.path.relpath(Path(image).resolve(), base.resolve())).as_posix()
        lines += ["", f"{heading} {caption}", "", f"![{caption}]({rel})"]
    return lines
