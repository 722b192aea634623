"""The embed stage on real shards with a real (tiny, randomly initialised) open_clip model."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from filters.base import embedding_matrix
from stages import clip_models
from stages.embed import EmbedConfig, read_embedding_tables, run_embed
from stages.nsfw_onnx import OpenNsfw


def test_ray_data_and_local_loop_agree_and_account_for_every_sample(ray_cluster, pool_shards, tiny_model, tmp_path):
    shards_dir, download = pool_shards
    on_ray = run_embed(shards_dir, EmbedConfig(batch_size=32), tmp_path / "ray", tiny_model)
    local = run_embed(shards_dir, EmbedConfig(engine="local", batch_size=50), tmp_path / "local", tiny_model)
    for manifest in (on_ray, local):
        manifest.check_balance()
        assert manifest.in_count == download.kept  # every downloaded sample: embedded or failed with a reason
    assert on_ray.kept == local.kept and on_ray.failed == local.failed
    a = read_embedding_tables(tmp_path / "ray" / "embeddings")
    b = read_embedding_tables(tmp_path / "local" / "embeddings")
    assert a.column("uid").to_pylist() == b.column("uid").to_pylist()
    ok = np.array([r is None for r in a.column("reason").to_pylist()])
    image_a, image_b = embedding_matrix(a, "image_emb")[ok], embedding_matrix(b, "image_emb")[ok]
    np.testing.assert_allclose(image_a, image_b, atol=2e-3)  # float16 storage
    np.testing.assert_allclose(np.linalg.norm(image_a, axis=1), 1, atol=2e-3)
    text = embedding_matrix(a, "text_emb")[ok]
    cosine = (image_a * text).sum(axis=1)
    np.testing.assert_allclose(a.column("clip_score").to_numpy()[ok], cosine, atol=2e-3)
    assert np.isnan(a.column("clip_score").to_numpy()[~ok]).all()


def test_rerun_skips_finished_shards_and_redoes_a_missing_one(pool_shards, tiny_model, tmp_path):
    shards_dir, _ = pool_shards
    config = EmbedConfig(engine="local", batch_size=64)
    first = run_embed(shards_dir, config, tmp_path, tiny_model)
    out = sorted((tmp_path / "embeddings").glob("*.parquet"))
    before = pq.read_table(out[1])
    out[1].unlink()
    again = run_embed(shards_dir, config, tmp_path, tiny_model)
    assert again.metrics["shards_skipped"] == len(out) - 1
    assert again.kept == first.kept and again.failed == first.failed
    assert pq.read_table(out[1]).column("uid").to_pylist() == before.column("uid").to_pylist()


def test_dfn_and_open_nsfw_scores_come_from_the_same_pass(pool_shards, tiny_model, tmp_path):
    shards_dir, _ = pool_shards
    config = EmbedConfig(engine="local", dfn_model=tiny_model, nsfw_onnx=True, shard_glob="00000.tar")
    run_embed(shards_dir, config, tmp_path, tiny_model)
    table = read_embedding_tables(tmp_path / "embeddings")
    ok = np.array([r is None for r in table.column("reason").to_pylist()])
    # the same weights as filtering network: its score equals the CLIP score
    np.testing.assert_allclose(
        table.column("dfn_score").to_numpy()[ok], table.column("clip_score").to_numpy()[ok], atol=1e-4
    )
    nsfw = table.column("nsfw_onnx").to_numpy()[ok]
    assert ((nsfw >= 0) & (nsfw <= 1)).all() and nsfw.max() < 0.5  # rendered shapes are safe


def test_open_nsfw_flags_nothing_in_plain_images():
    from PIL import Image

    scores = OpenNsfw().score([Image.new("RGB", (64, 64), c) for c in ("white", "blue")])
    assert scores.shape == (2,) and (scores < 0.2).all()


def test_checkpoint_files_load_with_architecture_and_fail_clearly_without(tiny_model, tmp_path):
    import torch

    state = torch.load(f"{tiny_model}/weights.pt", weights_only=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "epoch_3.pt")
    model, _, _ = clip_models.load_model(tmp_path / "epoch_3.pt", "demo-tiny")
    assert torch.equal(model.state_dict()["logit_scale"], state["logit_scale"])
    with pytest.raises(ValueError, match="needs its open_clip model name"):
        clip_models.load_model(tmp_path / "epoch_3.pt")
    with pytest.raises(ValueError, match="weights do not fit open_clip model 'RN50'"):
        clip_models.load_model(tmp_path / "epoch_3.pt", "RN50")
