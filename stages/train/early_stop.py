"""Early stopping across a sweep's trials: asynchronous successive halving (ASHA) on the zero-shot curve.

Each trial's training scores zero-shot at its checkpoints (the train stage's `zeroshot_frequency`).
The rungs are ASHA's: steps `min_step * rf**k` (rf the reduction factor). At the first scored step
at or past a rung, a trial records its score on a board, a folder the sweep's trials share, and
compares it with the scores the other trials recorded at that rung (the same step for trials with
the same schedule): below the top 1/rf of those (the (1 - 1/rf) quantile, Ray Tune's cutoff), it
stops there. A trial that reaches a rung first has nothing to compare with and goes on. No trial
waits for another, so trials that run at once and trials that run later are judged the same way.
A stopped trial keeps its checkpoint and its evaluation, and says why in `early_stop.json` beside
its log; the sweep reports it apart, since it did not get the compute the others did.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from pipeline.atomic import write_json
from pipeline.models import StrictModel

DECISION_FILE = "early_stop.json"


class EarlyStopConfig(StrictModel):
    board: str = Field(description="folder the trials share: one subfolder per rung, one file per trial")
    trial: str = Field(description="this trial's name on the board")
    metric: str = Field("zeroshot_top1", description="a zero-shot metric the train stage scores at checkpoints")
    reduction_factor: float = Field(3.0, ge=2, description="keep the top 1/rf of the trials at each rung")
    min_step: int = Field(1, ge=1, description="the first rung (grace period): rungs at min_step * rf**k")


def rung_of(config: EarlyStopConfig, step: int) -> int | None:
    """The highest rung k with min_step * rf**k <= step (None before the first)."""
    if step < config.min_step:
        return None
    k = 0
    while config.min_step * config.reduction_factor ** (k + 1) <= step:
        k += 1
    return k


def cutoff(others: list[float], reduction_factor: float) -> float | None:
    """The score a trial must reach at a rung: the (1 - 1/rf) quantile of the other trials' scores there."""
    import numpy as np

    return float(np.quantile(others, 1 - 1 / reduction_factor)) if others else None


def decide(config: EarlyStopConfig, step: int, score: float) -> str | None:
    """At the first scored step of a rung: record `score` and say why the trial stops here; None when
    it goes on (or `step` opens no new rung for this trial)."""
    k = rung_of(config, step)
    if k is None:
        return None
    rung = Path(config.board) / f"rung_{k}"
    mine = rung / f"{config.trial}.json"
    if mine.exists():  # judged at this rung already (an earlier scored step, or a restart)
        return None
    rung.mkdir(parents=True, exist_ok=True)
    others = [json.loads(path.read_text())["score"] for path in sorted(rung.glob("*.json"))]
    write_json(mine, {"trial": config.trial, "step": step, "score": score})
    limit = cutoff(others, config.reduction_factor)
    if limit is None or score >= limit:
        return None
    return (
        f"{config.metric} {score:.3f} at step {step} is below the cutoff {limit:.3f} "
        f"(top 1/{config.reduction_factor:g} of {len(others)} other trial(s) at rung {k})"
    )


def verdict(config: EarlyStopConfig, step: int, scores: dict) -> dict:
    """Rank 0's decision (`reason`: why it stops, or None), or the error it met instead: the other
    workers wait in a broadcast for one, so an error must reach them as an answer, not as silence."""
    try:
        return {"reason": decide(config, step, scores[config.metric]), "error": None}
    except (OSError, KeyError, ValueError) as err:
        return {"reason": None, "error": f"{type(err).__name__}: {err}"}


def record_stop(stage_dir: Path, step: int, reason: str) -> None:
    write_json(stage_dir / DECISION_FILE, {"step": step, "reason": reason})


def stopped_early(stage_dir: Path) -> dict | None:
    """{"step", "reason"} when this training was stopped early, else None."""
    path = stage_dir / DECISION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def last_step(stage_dir: Path, stop: int) -> int:
    """Where training ends: `stop`, or the step it was stopped early at (a restart, or a resume from
    an older checkpoint, must end there too)."""
    early = stopped_early(stage_dir)
    return min(stop, early["step"]) if early else stop
