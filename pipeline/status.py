"""What a run directory says about its stages: finished, interrupted, or not started."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.manifest import Manifest

RUN_FILE = "run.json"


@dataclass(frozen=True)
class StageStatus:
    stage: str
    state: str  # finished | incomplete | pending
    manifest: Manifest | None


def find_run(name_or_path: str, output_dir: str = "runs") -> Path:
    """A run folder given as a path, or as a run name under `output_dir`."""
    for candidate in (Path(name_or_path), Path(output_dir) / name_or_path):
        if (candidate / RUN_FILE).exists():
            return candidate
    raise FileNotFoundError(f"no run at '{name_or_path}' (nor under '{output_dir}/')")


def load_run_recipe(run_dir: Path):
    """The resolved recipe a run was started with, placed where the run now is."""
    from pydantic import ValidationError

    from pipeline.config import ConfigError, Recipe, format_validation_error

    record = json.loads((run_dir / RUN_FILE).read_text())
    try:
        return Recipe.model_validate({**record["recipe"], "output_dir": str(run_dir.parent)})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(run_dir / RUN_FILE))) from None


def run_status(run_dir: Path) -> tuple[dict, list[StageStatus]]:
    record = json.loads((run_dir / RUN_FILE).read_text())
    statuses = []
    for stage in record["recipe"]["stages"]:
        stage_dir = run_dir / stage
        manifest = Manifest.read(stage_dir)
        state = "finished" if manifest else ("incomplete" if stage_dir.exists() else "pending")
        statuses.append(StageStatus(stage, state, manifest))
    return record, statuses
