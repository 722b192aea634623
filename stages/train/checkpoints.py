"""Checkpoints of the train stage: which one a rerun resumes from (never a torn one), attempts and
their cleanup, and the final model exported on its own."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.atomic import PARTIAL_SUFFIX, is_partial, write_text
from stages.train.config import ATTEMPT_PREFIX, STATE_FILE, STEP_FILE


@dataclass(frozen=True)
class CheckpointChoice:
    """The newest complete checkpoint under a storage path, and the newer ones that were not."""

    folder: Path | None
    step: int
    skipped: tuple[tuple[Path, str], ...] = ()

    def fallback_lines(self) -> list[str]:
        target = f"step {self.step} ({self.folder})" if self.folder else "the start (no complete checkpoint)"
        return [f"train: checkpoint {path} is incomplete ({why}); resuming from {target}" for path, why in self.skipped]


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from; None when it is complete and loads.

    A kill can land while a checkpoint is being written or copied into Ray's storage, leaving the
    step file beside a truncated state file: its recorded size must match, and the state must load
    (`weights_only=True`, memory-mapped so that checking costs no RAM) and name the same step.
    """
    import torch

    try:
        info = json.loads((folder / STEP_FILE).read_text())
        expected = info.get("state_bytes")
        size = (folder / STATE_FILE).stat().st_size
        if expected is not None and size != expected:
            return f"{STATE_FILE} has {size:,} of {expected:,} bytes"
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
        if int(state["step"]) != int(info["step"]):
            return f"{STATE_FILE} holds step {state['step']}, {STEP_FILE} says {info['step']}"
    except FileNotFoundError as err:
        return f"{Path(err.filename).name if err.filename else 'a file'} is missing"
    except Exception as err:  # noqa: BLE001 - a torn JSON, zip or pickle: any of them means incomplete
        return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"
    return None


def recorded_step(folder: Path) -> int:
    try:
        return int(json.loads((folder / STEP_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1  # torn: sorts last, and is reported as incomplete if reached


def choose_checkpoint(storage: Path) -> CheckpointChoice:
    """The newest checkpoint under `storage` that is complete; newer incomplete ones are listed, not used."""
    folders = {f.parent for f in Path(storage).rglob(STEP_FILE) if not any(is_partial(Path(p)) for p in f.parts)}
    skipped: list[tuple[Path, str]] = []
    for folder in sorted(folders, key=lambda f: (recorded_step(f), str(f)), reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return CheckpointChoice(folder, recorded_step(folder), tuple(skipped))
        skipped.append((folder, problem))
    return CheckpointChoice(None, 0, tuple(skipped))


def latest_checkpoint(storage: Path) -> Path | None:
    """The newest complete checkpoint folder under a Ray Train storage path."""
    return choose_checkpoint(storage).folder


def checkpoint_artifact(step: int) -> str:
    return f"checkpoints/step_{step:08d}"


def new_attempt_name(storage: Path) -> str:
    taken = {p.name for p in storage.glob(f"{ATTEMPT_PREFIX}*")} if storage.exists() else set()
    index = 0
    while f"{ATTEMPT_PREFIX}{index:03d}" in taken:
        index += 1
    return f"{ATTEMPT_PREFIX}{index:03d}"


def remove_other_checkpoints(storage: Path, keep: Path, finished: bool) -> None:
    """Earlier attempts (and their torn checkpoints) once a later one has finished: renamed away,
    then deleted. Once training is `finished` (the final checkpoint verified whole, nothing left to
    resume), the older checkpoint Ray keeps as a fallback goes too: it is only disk."""
    try:
        kept_attempt = keep.relative_to(storage).parts[0]
    except (ValueError, IndexError):
        return
    for folder in storage.iterdir() if storage.exists() else []:
        if folder.is_dir() and folder.name != kept_attempt:
            _remove(folder)
    for folder in keep.parent.iterdir() if finished else []:
        if folder.is_dir() and folder != keep and folder.name.startswith("checkpoint_"):
            _remove(folder)


def _remove(folder: Path) -> None:
    if is_partial(folder):
        return
    doomed = folder.with_name(f".{folder.name}.removed{PARTIAL_SUFFIX}")
    folder.rename(doomed)  # one atomic step: a kill mid-delete leaves only a `.partial` to sweep
    shutil.rmtree(doomed, ignore_errors=True)


def trim_log(path: Path, step: int) -> None:
    """Drop log lines after the resumed step (and a torn last line), so each step is logged once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    write_text(path, "".join(f"{line}\n" for line in kept))


def export_model(checkpoint: Path, model_name: str, folder: Path) -> Path:
    """The final weights alone (no optimiser state), in the layout `clip_models.load` reads."""
    import torch

    from stages import clip_models

    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    return clip_models.save_state(state["model"], model_name, folder)
