"""The stage contract as the README teaches it: the README's example stage, added by one list entry,
is wired, checked, planned, run, accounted and tracked like any built-in stage."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest

from pipeline import graph
from pipeline.config import ConfigError, load_recipe
from pipeline.orchestrator import plan, run_pipeline
from pipeline.stage import Stage, input_slots
from stages.registry import STAGES
from tests.conftest import small_demo_overrides

README = Path(__file__).parents[1] / "README.md"


def readme_stage_module(tmp_path: Path):
    """The python block of the README's architecture section, imported as a module."""
    section = README.read_text().split("## Architecture", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    path = tmp_path / "caption_words.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("caption_words", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["caption_words"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_the_layout_rules_hold():
    """What the self-describing-stages issue asked of the tree: orchestration files stay short, stage
    outputs are typed (never looked up by string), no source is special-cased in `pipeline/`, and
    filters stay pure (nothing from `stages/`)."""
    root = Path(__file__).parents[1]
    long = [p.name for p in (root / "pipeline").glob("*.py") if len(p.read_text().splitlines()) > 300]
    assert not long, f"pipeline/ files over 300 lines: {long}"
    code = [*(root / "pipeline").rglob("*.py"), *(root / "stages").rglob("*.py")]
    assert not [p.name for p in code if 'outputs["' in p.read_text()]
    assert not [p.name for p in (root / "pipeline").glob("*.py") if p.name != "cli.py" and '"demo' in p.read_text()]
    impure = re.compile(r"^\s*(from stages\b|import stages\b)", re.M)
    assert not [p.name for p in (root / "filters").rglob("*.py") if impure.search(p.read_text())]


@pytest.fixture
def caption_words(tmp_path, monkeypatch):
    """The README stage registered the way the README says: one entry in the list."""
    stage = readme_stage_module(tmp_path).CaptionWords
    monkeypatch.setitem(graph.STAGE_BY_NAME, stage.name, stage)
    monkeypatch.setattr(graph, "STAGES", [*STAGES, stage])
    yield stage
    sys.modules.pop("caption_words", None)


def test_every_registered_stage_declares_its_edges_and_outputs():
    names = [stage.name for stage in STAGES]
    assert len(set(names)) == len(names)
    for stage in STAGES:
        assert issubclass(stage, Stage) and stage.summary
        slots = {slot.field for slot in input_slots(stage)}
        assert stage.counts_from is None or stage.counts_from in slots, stage.name
        assert stage.__module__.split(".")[1] == stage.name, f"{stage.name} lives in {stage.__module__}"


def test_readme_stage_is_wired_from_its_declarations(caption_words, tmp_path):
    recipe = load_recipe("demo", [f"output_dir={tmp_path}", "stages=[demo_pool, download, caption_words]"])
    _, rows = plan(recipe)
    assert rows[-1].stage == "caption_words" and rows[-1].estimated_in == recipe.source.demo.n_samples
    with pytest.raises(ConfigError, match="'caption_words' needs 'download' before it"):
        graph.build_stages(load_recipe("demo", ["stages=[demo_pool, caption_words]"]))


@pytest.mark.slow
def test_readme_stage_runs_resumes_and_is_tracked(ray_cluster, caption_words, tmp_path):
    overrides = [*small_demo_overrides(tmp_path / "runs"), "stages=[demo_pool, download, caption_words]"]
    recipe = load_recipe("demo", overrides)
    result = run_pipeline(recipe, run_name="words", log=lambda m: None)
    download, words = result.manifests["download"], result.manifests["caption_words"]
    assert words.in_count == download.kept == words.kept  # the accounting edge, checked by the orchestrator
    table = pq.read_table(result.output(caption_words.Outputs).words)
    assert table.num_rows == download.kept and min(table.column("words").to_pylist()) >= 1
    again = run_pipeline(recipe, run_name="words", resume=True, log=lambda m: None)
    assert again.skipped == ["demo_pool", "download", "caption_words"]
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert "caption_words" in {run.info.run_name for run in runs}


def test_runs_made_before_the_stage_contract_still_read():
    """Older run folders: `dedupe.keep: first`, demo_pool's `source`/`eval` and heads' `*_head` outputs."""
    from stages.demo_pool import DemoPoolOutputs
    from stages.heads import HeadsOutputs

    assert load_recipe("demo", ["dedupe.keep=first"]).dedupe.keep == "lowest_uid"
    old = {"source": "s.parquet", "eval": "eval", "labels": "l", "ground_truth": "g", "files": "f"}
    pool = DemoPoolOutputs.model_validate(old)
    assert (pool.table, pool.eval_dir) == ("s.parquet", "eval")
    assert pool.as_dict()["table"] == "s.parquet"  # written back under today's names
    heads = HeadsOutputs.model_validate({"aesthetic_head": "a.pt", "nsfw_head": "n.pt"})
    assert (heads.aesthetic, heads.nsfw) == ("a.pt", "n.pt")
