"""The stage contract: every stage returns a Manifest that accounts for each input sample.

A manifest is the one thing the orchestrator trusts about a stage: it checks the balance
`in == kept + sum(dropped) + sum(failed)`, writes it next to the stage's outputs, and reads it
back to decide what `--resume` may skip.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from pipeline.atomic import write_text

MANIFEST_NAME = "manifest.json"


class AccountingError(RuntimeError):
    """A stage's counts do not balance: some samples were lost or counted twice."""


class Manifest(BaseModel):
    """Counts, outputs and timings of one finished stage."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    stage: str
    in_count: int = Field(alias="in", ge=0)
    kept: int = Field(ge=0)
    dropped: dict[str, int] = Field(default_factory=dict)
    failed: dict[str, int] = Field(default_factory=dict)
    outputs: dict[str, str] = Field(default_factory=dict)
    seconds: float = 0.0
    metrics: dict[str, float] = Field(default_factory=dict)

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def n_failed(self) -> int:
        return sum(self.failed.values())

    def check_balance(self) -> None:
        """Raise AccountingError unless every input sample is kept, dropped or failed once."""
        accounted = self.kept + self.n_dropped + self.n_failed
        if accounted != self.in_count:
            gap = self.in_count - accounted
            what = f"{gap} samples lost" if gap > 0 else f"{-gap} samples counted twice"
            raise AccountingError(
                f"stage '{self.stage}' does not balance: in={self.in_count} but kept={self.kept} "
                f"+ dropped={self.n_dropped} + failed={self.n_failed} = {accounted} ({what})"
            )

    def summary(self) -> str:
        """One line for the terminal."""
        parts = [f"in={self.in_count}", f"kept={self.kept}"]
        if self.dropped:
            parts.append("dropped=" + _format_reasons(self.dropped))
        if self.failed:
            parts.append("failed=" + _format_reasons(self.failed))
        rate = self.in_count / self.seconds if self.seconds > 0 else 0.0
        parts.append(f"{self.seconds:.1f}s ({rate:.0f} samples/s)")
        return " ".join(parts)

    def write(self, stage_dir: Path) -> Path:
        # atomic: a half-written manifest never marks a stage finished
        return write_text(stage_dir / MANIFEST_NAME, self.model_dump_json(by_alias=True, indent=2))

    @classmethod
    def read(cls, stage_dir: Path) -> Manifest | None:
        path = stage_dir / MANIFEST_NAME
        if not path.exists():
            return None
        return cls.model_validate(json.loads(path.read_text()))


def count_reasons(reasons: list[str] | Mapping[str, int]) -> dict[str, int]:
    """Tally reason strings into a sorted {reason: count} mapping."""
    counter = Counter(reasons) if not isinstance(reasons, Mapping) else Counter(dict(reasons))
    return dict(sorted(counter.items()))


def merge_reasons(*tallies: Mapping[str, int]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for tally in tallies:
        total.update(tally)
    return dict(sorted(total.items()))


def _format_reasons(reasons: Mapping[str, int]) -> str:
    total = sum(reasons.values())
    detail = ", ".join(f"{k}:{v}" for k, v in reasons.items())
    return f"{total}({detail})"
