"""What the CLI shows, as rich renderables: a run's plan, its summary, its live status."""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from pipeline.config import Recipe
from pipeline.status import run_status


def plan_view(recipe: Recipe, run_name: str | None) -> Group:
    """`--dry-run`: the stage table, the budget, and what a run would still need (never an error)."""
    from pipeline.graph import budget_lines
    from pipeline.orchestrator import plan

    missing: list = []
    run_dir, rows = plan(recipe, run_name, missing)
    table = Table("stage", "input", "output", "est. samples in", "resources", "notes")
    for row in rows:
        estimate = f"{row.estimated_in:,}" if row.estimated_in is not None else "unknown"
        table.add_row(row.stage, row.input, row.output, estimate, row.resources, row.note)
    parts = [
        Text.assemble((recipe.name, "bold"), f": {recipe.description.strip()}"),
        Text(f"run directory: {run_dir}   Ray: {recipe.ray.address or 'local (started by the run)'}"),
        table,
        *(Text(line) for line in budget_lines(recipe)),
        *(Text.assemble(("missing:", "yellow"), f" {problem} (--set {problem.setting}=...)") for problem in missing),
    ]
    if missing:
        parts.append(Text(f"dry run: nothing was started or written; a run needs the {len(missing)} input(s) above."))
    else:
        parts.append(Text("dry run: nothing was started or written."))
    return Group(*parts)


def summary_view(result) -> Group:
    """The table a finished run ends with, and where it is (folder, MLflow run)."""
    table = Table("stage", "in", "kept", "dropped", "failed", "seconds", box=box.SIMPLE_HEAD, show_edge=False)
    for name, m in result.manifests.items():
        note = " (skipped)" if name in result.skipped else ""
        table.add_row(name + note, str(m.in_count), str(m.kept), str(m.n_dropped), str(m.n_failed), f"{m.seconds:.1f}")
    mlflow_run = result.mlflow_run_id or "not logged: see `pipeline sync`"
    return Group(table, Text(f"done: {result.run_dir} (MLflow run {mlflow_run})"))


def status_view(run_dir: Path):
    """The run's header, a row per stage (counts when finished, live progress while running) and,
    if it stopped unfinished, how to continue: one rich renderable."""
    from pipeline.progress import describe, driver_alive

    record, stages = run_status(run_dir)
    alive = driver_alive(run_dir)
    header = f"run {run_dir} (recipe {record['recipe']['name']}, MLflow run {record['mlflow_run_id']})"
    table = Table("stage", "state", "in", "kept", "dropped", "failed", "seconds", "progress")
    for item in stages:
        m = item.manifest
        counts = [str(m.in_count), str(m.kept), str(m.n_dropped), str(m.n_failed), f"{m.seconds:.1f}"] if m else []
        state = item.state
        if state == "incomplete":
            state = "running" if alive else "interrupted"
        table.add_row(item.stage, state, *(counts or [""] * 5), "" if m else describe(run_dir / item.stage))
    parts = [Text(header), table]
    if not alive and any(item.state != "finished" for item in stages):
        parts.append(Text(f"continue with: python -m pipeline resume {run_dir}"))
    return Group(*parts)
