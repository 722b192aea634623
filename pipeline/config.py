"""Recipes: typed, validated pipeline configuration loaded from YAML.

A recipe is a YAML file shipped in `pipeline/recipes/` (or any path). `--set a.b=value` overrides
are applied before validation, so a wrong key or type is reported the same way wherever it came
from: one line that names the key.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model, model_validator

from filters.presets import expand_presets
from pipeline.models import StrictModel
from pipeline.stage import SourceOutputs
from stages.metadata_schema import SchemaName
from stages.registry import DEFAULT_SOURCE, DEFAULT_STAGES, STAGES

RECIPES_PACKAGE = "pipeline.recipes"
TABLE_SOURCE = "table"  # a url/caption table on disk or behind fsspec; other kinds are source stages


class ConfigError(ValueError):
    """A recipe or override is invalid; the message is one line naming the key."""


class TableSourceFields(StrictModel):
    """Where the url/caption pairs come from: a table, or a source stage (`kind` names it)."""

    path: str | None = Field(None, description="parquet/csv/jsonl table, local path or fsspec URL")
    metadata: SchemaName = Field(
        "auto", description="auto recognises LAION and DataComp metadata by their columns; or laion/datacomp/plain"
    )
    url_col: str | None = Field(None, description="default: the schema's (URL for LAION, url otherwise)")
    caption_col: str | None = Field(None, description="default: the schema's (TEXT for LAION, text for DataComp)")
    pool_size: int | None = Field(None, gt=0, description="expected rows, for --dry-run estimates")

    @model_validator(mode="after")
    def _table_needs_path(self) -> TableSourceFields:
        if getattr(self, "kind", TABLE_SOURCE) == TABLE_SOURCE and not self.path:
            raise ValueError("source.kind 'table' needs source.path (e.g. --set source.path=urls.parquet)")
        return self


_SOURCE_STAGES = [stage for stage in STAGES if stage.source_kind]
SourceConfig = create_model(
    "SourceConfig",
    __base__=TableSourceFields,
    kind=(Literal[(TABLE_SOURCE, *(s.source_kind for s in _SOURCE_STAGES))], TABLE_SOURCE),
    **{s.source_kind: (s.config_model, s.config_model()) for s in _SOURCE_STAGES},
)


def source_outputs(recipe) -> SourceOutputs | None:
    """The source a table recipe reads without any stage making it (None: a source stage makes it)."""
    if recipe.source.kind != TABLE_SOURCE:
        return None
    return SourceOutputs(
        table=str(recipe.source.path),
        metadata=recipe.source.metadata,
        url_col=recipe.source.url_col,
        caption_col=recipe.source.caption_col,
    )


class RayConfig(StrictModel):
    address: str | None = Field(None, description="existing cluster; None starts Ray locally")
    num_cpus: int | None = Field(None, gt=0)
    dashboard: bool = True
    dashboard_port: int = Field(8265, gt=0, le=65535)
    temp_dir: str | None = Field(None, description="Ray session files; default is Ray's own")
    max_tasks_in_flight: int | None = Field(
        None, gt=0, description="per stage, tasks submitted and not yet finished; default: 2 per CPU slot"
    )


class TrackingConfig(StrictModel):
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite under output_dir")
    experiment: str | None = Field(None, description="default: the recipe name")


class RecipeBase(StrictModel):
    name: str
    description: str = ""
    output_dir: str = "runs"
    stages: list[str] = list(DEFAULT_STAGES)


# One section per stage with a config, named after the stage, in pipeline order.
Recipe = create_model(
    "Recipe",
    __base__=RecipeBase,
    source=(SourceConfig, SourceConfig(kind=DEFAULT_SOURCE)),
    **{s.name: (s.config_model, s.config_model()) for s in STAGES if s.config_model and not s.source_kind},
    ray=(RayConfig, RayConfig()),
    tracking=(TrackingConfig, TrackingConfig()),
)


def available_recipes() -> list[str]:
    return sorted(
        p.name[: -len(".yaml")] for p in resources.files(RECIPES_PACKAGE).iterdir() if p.name.endswith(".yaml")
    )


def read_yaml_mapping(name_or_path: str, package: str = RECIPES_PACKAGE, kind: str = "recipe") -> dict[str, Any]:
    """A YAML file by path, or by name from a package folder of them (recipes, sweeps)."""
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"}:
        if not path.exists():
            raise ConfigError(f"{kind} file not found: {path}")
        text = path.read_text()
    else:
        resource = resources.files(package) / f"{name_or_path}.yaml"
        if not resource.is_file():
            names = sorted(p.name[:-5] for p in resources.files(package).iterdir() if p.name.endswith(".yaml"))
            raise ConfigError(f"unknown {kind} '{name_or_path}' (available: {', '.join(names)})")
        text = resource.read_text()
    try:
        data = yaml.safe_load(text)  # safe_load: a recipe can never construct Python objects
    except yaml.YAMLError as err:
        raise ConfigError(f"{kind} '{name_or_path}' is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{kind} '{name_or_path}' must be a mapping of keys to values")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value`; the value is read as a YAML scalar/list (so 3, 1e-3, true, [a, b])."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. download.image_size=64)")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(parts):
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):  # filter.strategy.1.threshold=6: list items by index
                if any(isinstance(item, str) for item in node):  # index presets by the steps they expand to
                    try:
                        node[:] = expand_presets(node)
                    except ValueError as err:
                        raise ConfigError(f"override '{text}': {err}") from None
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override '{text}': '{where}' is not an item of a {len(node)}-item list")
                key: Any = int(part)
            elif isinstance(node, dict):
                key = part
            else:
                raise ConfigError(f"override '{text}': '{'.'.join(parts[:i])}' is not a section")
            if i == len(parts) - 1:
                node[key] = value
            else:
                if isinstance(node, dict) and node.get(key) is None:
                    node[key] = {}
                node = node[key]
    return data


def format_validation_error(err: ValidationError, recipe: str) -> str:
    """Turn pydantic's multi-line report into one line per problem, naming the key."""
    problems = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(recipe)"
        if item["type"] == "extra_forbidden":
            problems.append(f"{key}: unknown key")
        else:
            given = item.get("input")
            shown = f" (got {given!r})" if not isinstance(given, dict | list) and given is not None else ""
            problems.append(f"{key}: {item['msg']}{shown}")
    return f"invalid recipe '{recipe}': " + "; ".join(problems)


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` laid over it: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in changes.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


def read_recipe(name_or_path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A recipe's mapping, with `extends: <shipped recipe>` resolved (the base first, this file over it)."""
    data = read_yaml_mapping(name_or_path)
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str) or base in seen:
        raise ConfigError(f"recipe '{name_or_path}': extends must name another recipe (got {base!r})")
    return _merged(read_recipe(base, (*seen, name_or_path)), data)


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe by name or path, apply overrides, validate; raise ConfigError on problems."""
    data = apply_overrides(read_recipe(name_or_path), overrides or [])
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, name_or_path)) from None
