"""How a stage fans work out, without knowing who executes it.

Stages take a `map_fn` so that the same code runs in a plain loop (tests, debugging) or as Ray
tasks (the orchestrator passes `pipeline.executor.ray_map`). Keeping the executor out of the stage
is what lets a stage stay a plain function.
"""

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
