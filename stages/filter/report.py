"""Pictures of what a strategy did: a score histogram per filter with its threshold, and a grid of
kept and dropped example images, so a threshold can be judged by eye before a long training run.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.atomic import write_with
from stages.shards import image_bytes, read_tar_samples

MAX_TARS_SCANNED = 4  # examples come from the first shards: enough variety, bounded cost


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on workers or CI
    import matplotlib.pyplot as plt

    return plt


def histogram(scores: np.ndarray, keep: np.ndarray, threshold: float | None, title: str, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    finite = ~np.isnan(scores)
    bins = np.histogram_bin_edges(scores[finite], bins=40) if finite.any() else 10
    ax.hist(scores[finite & keep], bins=bins, alpha=0.7, label=f"kept ({int((finite & keep).sum())})")
    ax.hist(scores[finite & ~keep], bins=bins, alpha=0.7, label=f"dropped ({int((finite & ~keep).sum())})")
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set_title(title)
    ax.set_xlabel("score")
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path


def _collect_examples(tars: list[Path], wanted: dict[str, list[str]], n: int) -> dict[str, list[tuple[str, bytes]]]:
    """For each group, up to n (uid, image bytes) among its candidate uids, scanning a few tars."""
    lookup: dict[str, list[str]] = {}
    for group, uids in wanted.items():
        for uid in uids:
            lookup.setdefault(uid, []).append(group)
    found: dict[str, list[tuple[str, bytes]]] = {group: [] for group in wanted}
    for tar in tars[:MAX_TARS_SCANNED]:
        for key, sample in read_tar_samples(tar):
            payload = image_bytes(sample)
            for group in lookup.get(key, []):
                if payload is not None and len(found[group]) < n:
                    found[group].append((key, payload))
        if all(len(v) >= n for v in found.values()):
            break
    return found


def example_grid(
    kept: list[tuple[str, bytes]], dropped: list[tuple[str, bytes]], captions: dict, title: str, path: Path
):
    from PIL import Image

    plt = _pyplot()
    columns = max(len(kept), len(dropped), 1)
    fig, axes = plt.subplots(2, columns, figsize=(2.2 * columns, 5), squeeze=False)
    for row, (label, items) in enumerate((("kept", kept), ("dropped", dropped))):
        for col in range(columns):
            ax = axes[row][col]
            ax.axis("off")
            if col < len(items):
                uid, payload = items[col]
                ax.imshow(Image.open(io.BytesIO(payload)).convert("RGB"))
                ax.set_title(f"{label}: {captions.get(uid, '')[:28]}", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path


@dataclass
class StepPicture:
    """What the report shows of one step: scores and verdicts of a sample of rows (every row on a
    small pool), the threshold, and candidate example uids from the first shards."""

    label: str
    threshold: float | None = None
    scores: list[np.ndarray] = field(default_factory=list)
    keep: list[np.ndarray] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def write_report(
    pictures: list[StepPicture], captions: dict[str, str], tars: list[Path], n_examples: int, out: Path
) -> Path:
    """Histograms and example grids for every step into `out`; returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    wanted: dict[str, list[str]] = {}
    for picture in pictures:
        label = picture.label
        if picture.scores:
            scores, keep = np.concatenate(picture.scores), np.concatenate(picture.keep)
            histogram(scores, keep, picture.threshold, f"{label}: score distribution", out / f"{label}_hist.png")
        wanted[f"{label}:kept"] = picture.kept
        wanted[f"{label}:dropped"] = picture.dropped
    if n_examples and tars:
        examples = _collect_examples(tars, wanted, n_examples)
        for picture in pictures:
            label = picture.label
            example_grid(
                examples[f"{label}:kept"], examples[f"{label}:dropped"], captions, label, out / f"{label}_examples.png"
            )
    return out
