"""Filter strategies inside recipes: bad strategies fail on load, LAION-A runs on the demo pool."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from filters.heads import EmbeddingHead, HeadInfo, save_head
from pipeline.config import ConfigError, load_recipe
from pipeline.orchestrator import plan, run_pipeline
from tests.conftest import fast_filter_overrides, small_demo_overrides

FILTER_STAGES = "stages=[demo_pool, download, phash, dedupe, seed_models, embed, heads, filter, subset]"


def _demo(tmp_path, *extra: str):
    return load_recipe("demo", [*small_demo_overrides(tmp_path / "runs"), FILTER_STAGES, *extra])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("filter.strategy=[{name: sharpness}]", "filter.strategy.0: Input tag 'sharpness' found using 'name'"),
        ("filter.strategy=[{name: clip_score, top_fraction: 2}]", "less than or equal to 1"),
        ("filter.strategy=[{name: clip_score}]", "set exactly one of threshold or top_fraction"),
        ("filter.strategy=[{name: aesthetic, threshold: 11}]", "less than or equal to 10"),
        ("filter.strategy=[{name: aesthetic, head: /nope/head.pt}]", "head weights not found: /nope/head.pt"),
        ("filter.strategy=[{name: nsfw}]", "filter 'nsfw' needs 'nsfw_onnx': set embed.nsfw_onnx=true"),
        ("seed_models.dfn=false", "filter 'dfn' needs 'dfn_score': set embed.dfn_model"),
        ("embed.model=/nope/model", "embed.model: not found: /nope/model"),
    ],
)
def test_bad_strategies_and_models_fail_before_any_work(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")) as err:
        plan(_demo(tmp_path, override))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "runs").exists()


def test_a_head_for_other_embeddings_is_refused_before_any_work(tmp_path):
    path = save_head(EmbeddingHead(768), HeadInfo(kind="regression", input_dim=768), tmp_path / "laion_l14")
    with pytest.raises(ConfigError, match="head takes 768-dim embeddings but the embed model gives 64"):
        plan(_demo(tmp_path, f"filter.strategy.3.head={path}"))


def test_filters_without_their_stage_are_refused(tmp_path):
    stages = "stages=[demo_pool, download, phash, dedupe, filter, subset]"
    with pytest.raises(ConfigError, match="filter 'dfn' needs 'dfn_score'"):
        plan(_demo(tmp_path, stages))
    with pytest.raises(ConfigError, match="embed.model is needed"):
        plan(_demo(tmp_path, "stages=[demo_pool, download, embed]"))
    torch.save(EmbeddingHead(64).state_dict(), tmp_path / "head.pt")
    head = tmp_path / "head.pt"
    ok = _demo(tmp_path, stages, f"filter.strategy=[{{name: dedupe}}, {{name: aesthetic, head: {head}}}]")
    with pytest.raises(ConfigError, match="filter 'aesthetic' needs 'image_emb'"):
        plan(ok)


def test_laion_a_on_the_demo_pool_gives_a_deduplicated_aesthetic_subset(ray_cluster, tmp_path):
    """The command in the README: the laion_a recipe pointed at the demo pool."""
    overrides = [
        *small_demo_overrides(tmp_path / "runs"),
        *fast_filter_overrides(),
        "source.kind=demo",
        FILTER_STAGES,
        "download.image_size=64",
        "download.samples_per_shard=50",
        "download.min_image_size=16",
        "subset.samples_per_shard=60",
        "seed_models.train.model=demo-tiny",
        "seed_models.dfn=false",
    ]
    recipe = load_recipe("laion_a", overrides)
    assert [p.name for p in recipe.filter.strategy] == ["dedupe", "aesthetic"]
    result = run_pipeline(recipe, run_name="laion", log=lambda m: None)
    m = result.manifests
    for manifest in m.values():
        manifest.check_balance()
    assert set(m["filter"].dropped) <= {"duplicate_of", "eval_duplicate_of", "aesthetic"}
    assert m["filter"].dropped["duplicate_of"] == m["dedupe"].dropped["duplicate_of"]
    assert m["subset"].kept == m["filter"].kept > 0
    decisions = pq.read_table(m["filter"].outputs["decisions"]).to_pydict()
    kept = {u for u, k in zip(decisions["uid"], decisions["keep"], strict=True) if k}
    scores = np.array(decisions["score_1_aesthetic"])
    assert (scores[np.array(decisions["keep"])] >= recipe.filter.strategy[1].threshold).all()
    subset_uids = set()
    for table in (result.run_dir / "subset" / "shards").glob("*.parquet"):
        subset_uids |= set(pq.read_table(table).column("uid").to_pylist())
    assert subset_uids == kept
