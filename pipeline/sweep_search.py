"""Parameters a sweep leaves open: each setting becomes a strategy of its own.

A filter parameter in a sweep's strategy may be written as `{grid: [4, 5, 6]}` (every value) or
`{search: [0.1, 0.9]}` (`search_points` values drawn at random, one in each equal slice of the
range, integers when both bounds are, seeded by `search_seed` so that a resumed or repeated sweep
draws the same ones). A strategy with several open parameters gets every combination. Each setting
is then an ordinary strategy named after its values (`clip_top-top_fraction=0.35`), so seeds, the
spread in the table, the plot and the best recipe treat it like any strategy written by hand:
DataComp's small-scale proxy, ranking filter settings cheaply before a large run.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError

OPEN = ("grid", "search")
# a strategy's name is a folder of the sweep (its trials' runs): letters, digits and a few marks only,
# and none of the sweep's own folders
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=,+-]*")
RESERVED = {"shared", "trials", "results", "early_stop"}


@dataclass(frozen=True)
class OpenParameter:
    step: int  # the filter's position in the strategy
    filter: str
    key: str
    values: tuple  # the settings to try, in order
    how: str  # for the dry run: "grid" or "search [lo, hi], n random points (seed s)"


def _is_open(value: Any) -> bool:
    return isinstance(value, dict) and bool(set(value) & set(OPEN))


def _drawn(bounds: Any, points: int, seed: int, where: str) -> tuple:
    """`points` values between two numeric bounds, one at random in each of `points` equal slices of
    the range (so a few draws still cover it), integers when both bounds are; sorted, repeats dropped."""
    numeric = isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, int | float) for b in bounds)
    if not numeric or isinstance(bounds[0], bool) or not bounds[0] < bounds[1]:
        raise ConfigError(f"{where}: search takes [low, high] with low < high (got {bounds!r})")
    rng = random.Random(f"{seed}:{where}")  # the same draws for the same parameter, whatever else changes
    low, high = bounds
    width = (high - low) / points
    drawn = [rng.uniform(low + k * width, low + (k + 1) * width) for k in range(points)]
    if isinstance(low, int) and isinstance(high, int):
        return tuple(sorted({min(high, round(x)) for x in drawn}))
    return tuple(sorted({float(f"{x:.3g}") for x in drawn}))


def open_parameters(strategy: str, steps: list, points: int, seed: int) -> list[OpenParameter]:
    """The parameters `steps` (a strategy as written) leaves open, with the settings to try."""
    found = []
    for index, step in enumerate(steps):
        if not isinstance(step, dict):
            continue  # a preset name: nothing open
        for key, value in step.items():
            if not _is_open(value):
                continue
            where = f"strategies.{strategy}.{index}.{key}"
            if len(value) != 1:
                raise ConfigError(
                    f"{where}: an open parameter takes one key, grid or search (got {sorted(map(str, value))})"
                )
            if "grid" in value:
                grid = value["grid"]
                if not isinstance(grid, list) or not grid or any(isinstance(v, dict | list) for v in grid):
                    raise ConfigError(f"{where}: grid takes a non-empty list of values (got {grid!r})")
                values, how = tuple(dict.fromkeys(grid)), f"grid of {len(grid)}"
            else:
                values = _drawn(value["search"], points, seed, where)
                how = f"search {value['search']}, {points} random point(s) (seed {seed})"
            found.append(OpenParameter(index, str(step.get("name", "?")), key, values, how))
    return found


def _label(parameter: OpenParameter, value: Any, keys: list[str]) -> str:
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    key = parameter.key if keys.count(parameter.key) == 1 else f"{parameter.filter}.{parameter.key}"
    return f"{key}={shown}"


def _check_name(name: str) -> None:
    if not SAFE_NAME.fullmatch(name) or name in RESERVED:
        raise ConfigError(
            f"strategy name {name!r}: use letters, digits and _ . = , + - (it names a folder), "
            f"and none of {', '.join(sorted(RESERVED))}"
        )


def settle(strategies: dict[str, list | str], points: int, seed: int) -> tuple[dict[str, list | str], list[str]]:
    """Every strategy with its open parameters set, one per combination, and a line per open parameter
    for the dry run. Names that would not make safe folder names are refused in one line."""
    settled: dict[str, list] = {}
    notes = []
    for name, steps in strategies.items():
        _check_name(name)
        found = open_parameters(name, steps, points, seed) if isinstance(steps, list) else []  # a preset name
        if not found:
            settled[name] = steps
            continue
        keys = [p.key for p in found]
        notes += [f"{name}: {p.filter}.{p.key}, {p.how}: {', '.join(map(str, p.values))}" for p in found]
        for combination in itertools.product(*(p.values for p in found)):
            concrete = [dict(step) if isinstance(step, dict) else step for step in steps]
            labels = []
            for parameter, value in zip(found, combination, strict=True):
                concrete[parameter.step][parameter.key] = value
                labels.append(_label(parameter, value, keys))
            setting = f"{name}-{'-'.join(labels)}"
            _check_name(setting)
            if setting in strategies or setting in settled:
                raise ConfigError(f"strategy {name!r}: the setting {setting!r} has the name of another strategy")
            settled[setting] = concrete
    return settled, notes
