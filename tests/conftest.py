"""Shared fixtures: one local Ray cluster and one served demo pool per test session."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)

from pipeline.config import Recipe, load_recipe  # noqa: E402
from pipeline.runtime import export_local_worker_env  # noqa: E402
from pipeline.serve import serve_directory  # noqa: E402
from stages.demo_pool import DemoPoolConfig, generate_pool  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster; its session files stay in a short temp dir (socket paths are length-limited)."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    export_local_worker_env()  # as a run that starts its own Ray does
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        logging_level=logging.WARNING,
    )
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def served_pool(tmp_path_factory):
    """A small demo pool served on loopback for the whole session: (pool_dir, base_url)."""
    pool_dir = tmp_path_factory.mktemp("pool")
    (pool_dir / "files").mkdir()
    with serve_directory(pool_dir / "files") as base_url:
        generate_pool(DemoPoolConfig(n_samples=300, n_eval=40, seed=3), pool_dir, base_url)
        yield pool_dir, base_url


@pytest.fixture(scope="session")
def pool_shards(served_pool, tmp_path_factory):
    """The served pool downloaded once into 64 px shards: (shards_dir, download manifest). Read-only."""
    from stages.download import DownloadConfig, run_download

    pool_dir, _ = served_pool
    stage_dir = tmp_path_factory.mktemp("pool-download")
    config = DownloadConfig(image_size=64, samples_per_shard=100, min_image_size=16, thread_count=16)
    manifest = run_download(str(pool_dir / "source.parquet"), config, stage_dir)
    return stage_dir / "shards", manifest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A saved, randomly initialised demo-tiny CLIP (seeded)."""
    import torch

    from stages import clip_models

    torch.manual_seed(0)
    model, *_ = clip_models.create("demo-tiny")
    return str(clip_models.save(model, "demo-tiny", tmp_path_factory.mktemp("model") / "demo-tiny"))


def small_demo_overrides(output_dir: Path) -> list[str]:
    return [
        f"output_dir={output_dir}",
        "source.demo.n_samples=160",
        "source.demo.n_eval=30",
        "download.samples_per_shard=50",
        "ray.dashboard=false",
        "stages=[demo_pool, download, phash, dedupe]",
    ]


def fast_filter_overrides() -> list[str]:
    """Seed models trained for a handful of steps: enough to exercise the chain, not to filter well."""
    return [
        "seed_models.train.samples_seen=128",
        "seed_models.train.batch_size=32",
        "seed_models.train.checkpoint_every_samples=128",
        "heads.epochs=50",
        "embed.batch_size=64",
    ]


@pytest.fixture
def small_demo(tmp_path) -> Recipe:
    return load_recipe("demo", small_demo_overrides(tmp_path / "runs"))
