"""Every filter by name: its parameter model, the columns it reads, and its apply function.

A recipe names filters as `{name: <filter>, ...params}`; pydantic picks the parameter model by
`name`, so an unknown filter or a bad parameter is rejected when the recipe loads. Adding a
filter = one module in `filters/` + one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import pyarrow as pa
from pydantic import Field

from filters import aesthetic, basic, clip_score, dedupe, dfn, nsfw
from filters.base import FilterResult


@dataclass(frozen=True)
class FilterSpec:
    apply: Callable[[pa.Table, object], FilterResult]
    needs: Callable[[object], tuple[str, ...]]
    target: str | None = None  # what the filter is meant to catch, for ground-truth scoring on the demo


def _static(columns: tuple[str, ...]) -> Callable[[object], tuple[str, ...]]:
    return lambda params: columns


FILTERS: dict[str, FilterSpec] = {
    "dedupe": FilterSpec(dedupe.apply, _static(dedupe.NEEDS)),
    "basic": FilterSpec(basic.apply, _static(basic.NEEDS)),
    "clip_score": FilterSpec(clip_score.apply, _static(clip_score.NEEDS)),
    "dfn": FilterSpec(dfn.apply, _static(dfn.NEEDS)),
    "aesthetic": FilterSpec(aesthetic.apply, _static(aesthetic.NEEDS)),
    "nsfw": FilterSpec(nsfw.apply, nsfw.needs),
}

FilterParams = Annotated[
    dedupe.DedupeParams
    | basic.BasicParams
    | clip_score.ClipScoreParams
    | dfn.DfnParams
    | aesthetic.AestheticParams
    | nsfw.NsfwParams,
    Field(discriminator="name"),
]
