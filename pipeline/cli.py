"""`python -m pipeline`: run, plan, list and show recipes."""

from __future__ import annotations

import errno
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from pipeline.config import ConfigError, Recipe, available_recipes, load_recipe

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Ray-native pipeline from image-text pairs to a trained, evaluated CLIP model.",
)
console = Console(width=None if sys.stdout.isatty() else 140)
error_console = Console(stderr=True)

SetOption = Annotated[list[str] | None, typer.Option("--set", help="override a recipe key: key.sub=value")]
VerboseOption = Annotated[bool, typer.Option("--verbose", help="show Ray's, img2dataset's and MLflow's output live")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    error_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _load(recipe: str, overrides: list[str] | None) -> Recipe:
    try:
        return load_recipe(recipe, overrides or [])
    except ConfigError as err:
        raise _fail(str(err)) from None


def _print_plan(recipe: Recipe, run_name: str | None) -> None:
    from pipeline.views import plan_view

    console.print(plan_view(recipe, run_name))


@app.command()
def run(
    recipe: Annotated[str, typer.Argument(help="recipe name (see `list`) or path to a YAML file")],
    overrides: SetOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the stage plan and exit")] = False,
    address: Annotated[
        str | None, typer.Option("--address", help="join Ray at HOST:PORT, or submit a job to http://HEAD:8265")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the latest (or --run-name) run")] = False,
    run_name: Annotated[str | None, typer.Option("--run-name", help="run folder name under output_dir")] = None,
    verbose: VerboseOption = False,
) -> None:
    """Run a recipe end to end (or print its plan with --dry-run); `--address http://HEAD:8265`
    submits it to that cluster as a Ray Job instead."""
    from pipeline.jobs import is_job_address

    submit = is_job_address(address) and not dry_run
    extra = [f"ray.address={address}"] if address and not submit else []
    config = _load(recipe, (overrides or []) + extra)
    if submit:
        _submit(address, recipe, overrides or [], config)
        return
    if dry_run:
        try:
            _print_plan(config, run_name)
        except ConfigError as err:
            raise _fail(str(err)) from None
        return
    _execute(config, run_name=run_name, resume=resume, verbose=verbose)


def _submit(address: str, recipe: str, overrides: list[str], config: Recipe) -> None:
    from pipeline.jobs import submit_run

    try:
        status = submit_run(address, recipe, overrides, config.output_dir, log=lambda m: console.print(m, markup=False))
    except (ValueError, RuntimeError, ConnectionError) as err:
        raise _fail(str(err).strip().splitlines()[0], 1) from None
    if status != "SUCCEEDED":
        raise _fail(f"the job ended {status}", 1)


def _execute(config: Recipe, run_name: str | None, resume: bool, verbose: bool = False) -> None:
    from pipeline.orchestrator import run_pipeline

    try:
        result = run_pipeline(
            config,
            run_name=run_name,
            resume=resume,
            log=lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True),
            consoles=None if verbose else (console, error_console),
        )
    except KeyboardInterrupt:
        raise _fail("interrupted: continue with `python -m pipeline resume RUN`", 130) from None
    except OSError as err:
        raise _fail(_os_error_line(err, config), 1) from None
    except (ConfigError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _fail(first, 1) from None
    from pipeline.views import summary_view

    console.print(summary_view(result))


def _os_error_line(err: OSError, config: Recipe) -> str:
    if err.errno == errno.ENOSPC:
        return (
            f"no space left on the device holding {config.output_dir}: free some (or set output_dir elsewhere), "
            "then continue with `python -m pipeline resume RUN`"
        )
    where = f": {err.filename}" if err.filename else ""
    return f"{err.strerror or err}{where}"


@app.command()
def sweep(
    name: Annotated[str, typer.Argument(help="sweep name (pipeline/sweeps/) or path to a sweep YAML file")],
    overrides: SetOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the latest run of this sweep")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the trial plan and exit")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Run several filter strategies on one pool at equal training compute; print the results table."""
    from pipeline.sweep import run_sweep, sweep_plan
    from pipeline.sweep_config import load_sweep

    try:
        config = load_sweep(name)
        if dry_run:
            for line in sweep_plan(config, overrides or []):
                console.print(line, markup=False, highlight=False, soft_wrap=True)
            return
        sweep_dir, rows = run_sweep(
            config,
            overrides or [],
            resume=resume,
            log=lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True),
            consoles=None if verbose else (console, error_console),
        )
    except KeyboardInterrupt:
        again = shlex.join(["python", "-m", "pipeline", "sweep", name, "--resume", *_set_flags(overrides)])
        raise _fail(f"interrupted: continue with `{again}`", 130) from None
    except (ConfigError, ValueError, RuntimeError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _fail(first, 1) from None
    from pipeline.sweep_table import METRICS, summarise

    summaries = summarise(rows)
    stops = any(s.stopped for s in summaries)
    columns = ["strategy", "seeds", "kept fraction", "zero-shot top-1", "top-5", "image→text R@1", "text→image R@1"]
    table = Table(*columns, *(["stopped early"] if stops else []))
    for s in summaries:
        cells = [s.strategy, str(s.seeds), f"{s.kept_fraction:.3f}", *(str(s.metrics[m]) for m in METRICS)]
        table.add_row(*cells, *([str(s.stopped)] if stops else []))
    console.print(table)
    console.print(f"done: {sweep_dir} (table and plot in {sweep_dir / 'results'})", highlight=False)


def _set_flags(overrides: list[str] | None) -> list[str]:
    return [part for override in overrides or [] for part in ("--set", override)]


RunArgument = Annotated[str, typer.Argument(help="run folder, or run name under --output-dir")]
OutputDirOption = Annotated[str, typer.Option("--output-dir", help="where runs live")]


def _find_run(run: str, output_dir: str) -> Path:
    from pipeline.status import find_run

    try:
        return find_run(run, output_dir)
    except FileNotFoundError as err:
        raise _fail(str(err)) from None


@app.command()
def resume(run: RunArgument, output_dir: OutputDirOption = "runs", verbose: VerboseOption = False) -> None:
    """Continue a run with the recipe it was started with (its --set overrides included)."""
    from pipeline.status import load_run_recipe

    run_dir = _find_run(run, output_dir)
    _execute(load_run_recipe(run_dir), run_name=run_dir.name, resume=True, verbose=verbose)


@app.command("list")
def list_() -> None:
    """List recipes and stages."""
    from stages.registry import STAGES

    table = Table("recipe", "description")
    for name in available_recipes():
        table.add_row(name, load_recipe(name).description.strip().splitlines()[0])
    console.print(table)
    from pipeline.sweep_config import available_sweeps, load_sweep

    sweeps = Table("sweep", "strategies")
    for name in available_sweeps():
        sweeps.add_row(name, ", ".join(load_sweep(name).strategies))
    console.print(sweeps)
    stages = Table("stage", "what it does")
    for stage in STAGES:
        stages.add_row(stage.name, stage.summary)
    console.print(stages)


@app.command()
def show(
    recipe: Annotated[str, typer.Argument(help="recipe name or YAML path")],
    overrides: SetOption = None,
) -> None:
    """Print the resolved recipe (defaults and overrides applied) as YAML."""
    config = _load(recipe, overrides)
    console.print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), highlight=False)


@app.command()
def status(
    run: RunArgument,
    output_dir: OutputDirOption = "runs",
    watch: Annotated[bool, typer.Option("--watch", help="refresh every 2 s while the run is going")] = False,
) -> None:
    """Show each stage of a run: finished (with counts), running (with live progress), interrupted or pending."""
    from pipeline.progress import driver_alive
    from pipeline.views import status_view

    run_dir = _find_run(run, output_dir)
    if not watch:
        console.print(status_view(run_dir))
        return
    from rich.live import Live

    with Live(status_view(run_dir), console=console, refresh_per_second=1) as live:
        while driver_alive(run_dir):
            time.sleep(2)
            live.update(status_view(run_dir))
        live.update(status_view(run_dir))


@app.command()
def sync(
    run: RunArgument,
    output_dir: OutputDirOption = "runs",
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help="log here instead")] = None,
) -> None:
    """Log a run's folder (manifests, metrics, reports, training curve, model) to MLflow, e.g. after an outage."""
    from pipeline.sync import sync_run

    run_dir = _find_run(run, output_dir)
    try:
        sync_run(run_dir, tracking_uri, log=lambda m: console.print(m, markup=False, highlight=False))
    except ConnectionError as err:
        raise _fail(str(err), 1) from None


@app.command("convert-checkpoint")
def convert_checkpoint(
    checkpoint: Annotated[Path, typer.Argument(help="OpenAI's TorchScript CLIP .pt (e.g. ViT-L-14.pt)")],
    folder: Annotated[Path, typer.Argument(help="where to write the model folder (weights.pt + model.json)")],
    model: Annotated[str, typer.Option("--model", help="open_clip architecture, e.g. ViT-L-14-quickgelu")],
) -> None:
    """Turn OpenAI's TorchScript checkpoint into a model folder that runs load with weights_only=True."""
    from stages.clip_models import convert_torchscript, is_torchscript

    if not checkpoint.is_file():
        raise _fail(f"{checkpoint}: file not found")
    if not is_torchscript(checkpoint):
        raise _fail(f"{checkpoint}: not a TorchScript archive; a state dict loads as is (embed.model + model_name)")
    try:
        saved = convert_torchscript(checkpoint, model, folder)
    except ValueError as err:
        raise _fail(str(err)) from None
    console.print(f"wrote {saved}: use it as embed.model={saved}", markup=False, highlight=False)


def main() -> None:
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        app()
    except SystemExit as exit_:
        sys.exit(exit_.code)
