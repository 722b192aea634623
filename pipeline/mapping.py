"""How a stage fans work out, without knowing who executes it.

Stages take a `map_fn` so that the same code runs in a plain loop (tests, debugging) or as Ray
tasks (the orchestrator passes `pipeline.executor.ray_map`). Keeping the executor out of the stage
is what lets a stage stay a plain function.
"""

import sys
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MapFn(Protocol):
    def __call__(
        self, fn: Callable[[T], R], items: Sequence[T], *, desc: str = "", weight: Callable[[R], int] | None = None
    ) -> list[R]: ...


def local_map(
    fn: Callable[[T], R], items: Sequence[T], *, desc: str = "", weight: Callable[[R], int] | None = None
) -> list[R]:
    """Run `fn` over `items` in this process, in order."""
    return [fn(item) for item in items]


def shared(value: T) -> T:
    """`value` put once in Ray's object store when this process runs Ray, so tasks that all need it
    (a pool's centroids) read one copy per node instead of each carrying it in its arguments;
    `value` itself otherwise. Tasks take it back with `resolved`."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray.put(value)
    return value


def resolved(value):
    """The value behind `shared`'s reference (anything else as it is)."""
    ray = sys.modules.get("ray")
    if ray is not None and isinstance(value, ray.ObjectRef):
        return ray.get(value)
    return value
