"""What a strategy needs before it runs: defaults the run fills in, and checks done at recipe load.

Kept apart from the filters themselves (which are pure: table in, mask and reasons out) because
these read the run: heads the heads stage fitted, the eval set's class names, class embeddings.
"""

from __future__ import annotations

from pathlib import Path

from filters.heads import HeadError, load_head
from filters.strategy import missing_columns
from pipeline.stage import MissingInput

VOCABULARY_FILTERS = ("text_based", "metaclip_balance")  # default vocabulary: the eval set's class names
UNSET = "unset"


def resolve_strategy(
    steps: list,
    heads: dict[str, str | None],
    classnames: list[str] | None,
    class_embeddings: str | None,
) -> list:
    """The steps with run-made defaults filled in where the recipe left them empty: a filter's
    head from `heads[filter name]`, vocabulary filters' words from the eval class names,
    image_based's targets from the class embeddings. What the recipe set is never replaced."""
    resolved = []
    for params in steps:
        update: dict[str, object] = {}
        if getattr(params, "head", UNSET) is None:
            update["head"] = heads.get(params.name)
        if params.name in VOCABULARY_FILTERS and not (params.words or params.vocabulary):
            update["words"] = classnames
        if params.name == "image_based" and not params.targets:
            update["targets"] = class_embeddings
        resolved.append(params.model_copy(update={k: v for k, v in update.items() if v is not None}))
    return resolved


def check_columns(steps: list, columns: list[str], hints: dict[str, str]) -> None:
    """Every filter's columns will be in the per-uid table; else one line saying how to get it."""
    for name, column in missing_columns(columns, steps):
        raise ValueError(f"filter '{name}' needs '{column}': {hints.get(column, 'no stage gives it')}")


def check_files(steps: list, has_classes: bool, has_embeddings: bool, key: str = "filter.strategy") -> None:
    """Vocabulary, target and uid-list files exist, and run-made defaults (eval class names) will exist."""
    for index, params in enumerate(steps):
        for field in ("vocabulary", "targets", "path"):
            path = getattr(params, field, None)
            if path and not Path(path).is_file():
                raise MissingInput(f"filter '{params.name}': file not found: {path}", f"{key}.{index}.{field}")
        if params.name in VOCABULARY_FILTERS and not (params.words or params.vocabulary) and not has_classes:
            raise ValueError(f"filter '{params.name}' needs words or vocabulary (no eval class names to default to)")
        if params.name == "image_based" and not params.targets and not (has_classes and has_embeddings):
            raise ValueError("filter 'image_based' needs targets=<.npy> (or eval class names and the embed stage)")


def check_heads(
    steps: list, heads_fitted: bool, width: int | None, model_name: str | None = None, key: str = "filter.strategy"
) -> None:
    """Every head a filter uses loads, and takes the embedding width the embed model gives; LAION's
    L/14 predictor is refused on a GELU ViT-L-14 (OpenAI's weights run as open_clip's -quickgelu)."""
    for index, params in enumerate(steps):
        head = getattr(params, "head", UNSET)
        if head == UNSET or (params.name == "nsfw" and params.backend != "head"):
            continue
        if head is None:
            if not heads_fitted:
                raise MissingInput(
                    f"filter '{params.name}' needs head=<path> or the heads stage before filter", f"{key}.{index}.head"
                )
            continue
        if not Path(head).is_file():
            raise MissingInput(f"filter '{params.name}': head weights not found: {head}", f"{key}.{index}.head")
        try:
            _, info = load_head(head, "binary" if params.name == "nsfw" else "regression")
        except HeadError as err:
            raise ValueError(f"filter '{params.name}': {err}") from None
        if width is not None and info.input_dim != width:
            raise ValueError(
                f"filter '{params.name}': head takes {info.input_dim}-dim embeddings but the embed model gives {width}"
            )
        if info.is_laion_l14 and model_name and model_name.startswith("ViT-L-14") and "quickgelu" not in model_name:
            raise ValueError(
                f"filter '{params.name}': LAION's predictor takes OpenAI ViT-L/14 embeddings, which open_clip builds "
                f"as ViT-L-14-quickgelu; embed.model_name {model_name} uses GELU and gives other embeddings"
            )
