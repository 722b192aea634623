"""Every filter by name: its parameter model, the columns it reads, and its apply function.

A recipe names filters as `{name: <filter>, ...params}`; pydantic picks the parameter model by
`name`, so an unknown filter or a bad parameter is rejected when the recipe loads. Adding a
filter = one module in `filters/` + one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from pydantic import BeforeValidator, Field

from filters import (
    aesthetic,
    basic,
    dedupe,
    image_based,
    metaclip_balance,
    nsfw,
    ranking,
    semantic_dedupe,
    text_based,
    uid_list,
)
from filters.base import FilterResult
from filters.presets import expand_presets


@dataclass(frozen=True)
class FilterSpec:
    apply: Callable[..., FilterResult]
    needs: Callable[[object], tuple[str, ...]]
    parallel: bool = False  # apply takes a map_fn too: its per-chunk work may fan out as Ray tasks
    # a row's verdict needs a figure of the whole pool (a rank cutoff, centroids, counts): a shard's
    # apply then takes it as `pool=` (see stages/filter/pool_figures.py for how each is found)
    pooled: Callable[[object], bool] = lambda params: False


def _always(params: object) -> bool:
    return True


def _static(columns: tuple[str, ...]) -> Callable[[object], tuple[str, ...]]:
    return lambda params: columns


FILTERS: dict[str, FilterSpec] = {
    "dedupe": FilterSpec(dedupe.apply, _static(dedupe.NEEDS)),
    "basic": FilterSpec(basic.apply, _static(basic.NEEDS)),
    **{
        name: FilterSpec(ranking.apply, ranking.needs, pooled=ranking.pooled)
        for name in ("rank", *ranking.NAMED_COLUMNS)
    },
    "aesthetic": FilterSpec(aesthetic.apply, _static(aesthetic.NEEDS)),
    "nsfw": FilterSpec(nsfw.apply, nsfw.needs),
    "text_based": FilterSpec(text_based.apply, _static(text_based.NEEDS)),
    "image_based": FilterSpec(image_based.apply, _static(image_based.NEEDS), parallel=True, pooled=_always),
    "semantic_dedupe": FilterSpec(semantic_dedupe.apply, _static(semantic_dedupe.NEEDS), parallel=True, pooled=_always),
    "metaclip_balance": FilterSpec(metaclip_balance.apply, _static(metaclip_balance.NEEDS), pooled=_always),
    "uid_list": FilterSpec(uid_list.apply, _static(uid_list.NEEDS)),
}

FilterParams = Annotated[
    dedupe.DedupeParams
    | basic.BasicParams
    | ranking.RankParams
    | aesthetic.AestheticParams
    | nsfw.NsfwParams
    | text_based.TextBasedParams
    | image_based.ImageBasedParams
    | semantic_dedupe.SemanticDedupeParams
    | metaclip_balance.MetaclipBalanceParams
    | uid_list.UidListParams,
    Field(discriminator="name"),
]

Strategy = Annotated[list[FilterParams], BeforeValidator(expand_presets)]
"""A strategy as recipes write it: filters and preset names (see `filters.presets`), in order."""
