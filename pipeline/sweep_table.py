"""A sweep's results: one row per trial (strategy, seed), summarised per strategy as mean ± std.

Why the spread: on a small pool two strategies often differ by less than one strategy differs
from itself under another training seed. A difference is marked only when it exceeds the two
strategies' standard deviations added together (with one seed there is no spread, and no mark).
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from pipeline.atomic import atomic_path, write_text, write_with

METRICS = ("zeroshot_top1", "zeroshot_top5", "image_to_text_r1", "text_to_image_r1")


@dataclass
class StrategyRow:
    """One trial's outcome."""

    strategy: str
    kept: int
    pool: int
    zeroshot_top1: float
    zeroshot_top5: float
    image_to_text_r1: float
    text_to_image_r1: float
    seed: int = 0
    started: float = 0.0  # the trial's wall-clock interval (time.time())
    ended: float = 0.0
    stopped_at_step: int = 0  # stopped early by the sweep's early stopping (0: trained to the end)

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.pool if self.pool else 0.0


@dataclass
class Spread:
    mean: float
    std: float  # sample standard deviation; 0 with one seed

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f}"


@dataclass
class StrategySummary:
    strategy: str
    seeds: int  # trials trained to the end: the figures are theirs
    kept_fraction: float
    metrics: dict[str, Spread]
    stopped: int = 0  # trials stopped early; when no trial went to the end, the figures are theirs

    def differs(self, other: StrategySummary, metric: str) -> bool:
        """Whether the means differ by more than the two spreads together (never with one seed)."""
        a, b = self.metrics[metric], other.metrics[metric]
        return self.seeds > 1 and other.seeds > 1 and abs(a.mean - b.mean) > a.std + b.std


def summarise(rows: list[StrategyRow]) -> list[StrategySummary]:
    """Per strategy, in the order strategies first appear. Trials stopped early are counted apart and
    left out of the means (they had less compute), unless no trial of the strategy went to the end."""
    by_strategy: dict[str, list[StrategyRow]] = {}
    for row in rows:
        by_strategy.setdefault(row.strategy, []).append(row)
    summaries = []
    for strategy, runs in by_strategy.items():
        full = [r for r in runs if not r.stopped_at_step]
        counted = full or runs
        spreads = {}
        for metric in METRICS:
            values = [getattr(r, metric) for r in counted]
            spreads[metric] = Spread(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        kept = statistics.fmean(r.kept_fraction for r in runs)
        summaries.append(StrategySummary(strategy, len(full), kept, spreads, stopped=len(runs) - len(full)))
    return summaries


def markdown(summaries: list[StrategySummary]) -> str:
    """The per-strategy table; `*` marks a mean that differs from the first strategy's by more than the spread."""
    stops = any(s.stopped for s in summaries)
    header = ["strategy", "seeds", "kept_fraction", *METRICS, *(["stopped_early"] if stops else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    baseline = summaries[0]
    for s in summaries:
        cells = [f"{s.metrics[m]}{'*' if s is not baseline and s.differs(baseline, m) else ''}" for m in METRICS]
        cells += [str(s.stopped)] if stops else []
        lines.append(f"| {s.strategy} | {s.seeds} | {s.kept_fraction:.3f} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"mean ± std over seeds; * differs from '{baseline.strategy}' by more than both spreads together")
    if stops:
        lines.append("stopped_early: trials the sweep's early stopping ended (left out of the means unless all were)")
    return "\n".join(lines) + "\n"


def write_table(rows: list[StrategyRow], summaries: list[StrategySummary], folder: Path) -> list[Path]:
    """results.csv (a row per trial), results.md (`summaries`, per strategy) and accuracy_vs_kept.png in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f.name for f in fields(StrategyRow)]
    with atomic_path(folder / "results.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, [*names, "kept_fraction"])
        writer.writeheader()
        writer.writerows({**asdict(r), "kept_fraction": r.kept_fraction} for r in rows)
    write_text(folder / "results.md", markdown(summaries))
    return [folder / "results.csv", folder / "results.md", _plot(summaries, folder / "accuracy_vs_kept.png")]


def _plot(summaries: list[StrategySummary], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in summaries:
        top1 = s.metrics["zeroshot_top1"]
        ax.errorbar(s.kept_fraction, top1.mean, yerr=top1.std, fmt="o", capsize=3)
        ax.annotate(s.strategy, (s.kept_fraction, top1.mean), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("kept fraction of the pool")
    ax.set_ylabel("zero-shot top-1 (mean ± std over seeds)")
    ax.set_title("same compute, different data")
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path
