"""Training throughput: our Ray Train loop vs a plain single-process open_clip loop.

    .venv/bin/python benchmarks/train.py --steps 60

Same model, global batch and shards. The baseline is the obvious loop a user writes: one
process, torch using every core, open_clip's ClipLoss and AdamW. Ours is the train stage
(TorchTrainer, one worker per core, DDP over gloo). Steady-state samples/s of both (first steps
skipped), their ratio, the stage's end-to-end time with Ray Train start-up, and the data
loader's own throughput against what one training worker consumes. Run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def write_shards(root: Path, n: int, per_shard: int = 250) -> list[str]:
    from stages import demo_scenes as world

    rng = np.random.default_rng(0)
    shards = []
    for start in range(0, n, per_shard):
        path = root / f"{len(shards):05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(start + per_shard, n)):
                scene = world.random_scene(rng)
                for ext, data in (
                    ("jpg", world.encode_jpeg(world.render_scene(scene, 64, rng))),
                    ("txt", scene.caption.encode()),
                ):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(str(path))
    return shards


def baseline(shards: list[str], args: argparse.Namespace) -> float:
    """Steady-state samples/s of a plain open_clip loop in this process.

    It does per step what open_clip's own trainer does: cosine lr, clip loss, AdamW with the
    no-decay groups, gradient clipping and the temperature clamp.
    """
    import math

    import torch
    from open_clip import ClipLoss
    from open_clip_train.scheduler import cosine_lr

    from stages import clip_models
    from stages.train import parameter_groups
    from stages.train_data import batches

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model, preprocess, _, tokenizer = clip_models.create(args.model)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.2), lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    schedule = cosine_lr(optimizer, 1e-3, 5, args.steps)
    loss_fn = ClipLoss()
    loader = iter(batches(shards, preprocess, tokenizer, args.batch, seed=0, rank=0, segment=0))
    started = None
    for step in range(args.steps):
        if step == args.warmup_steps:
            started = time.perf_counter()
        images, texts = next(loader)
        schedule(step)
        optimizer.zero_grad(set_to_none=True)
        image_features, text_features, scale = model(images, texts)
        loss = loss_fn(image_features, text_features, scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    return (args.steps - args.warmup_steps) * args.batch / (time.perf_counter() - started)


def loader_only(shards: list[str], args: argparse.Namespace, per_worker: int) -> float:
    import torch

    from stages import clip_models
    from stages.train_data import batches

    torch.set_num_threads(1)
    _, preprocess, _, tokenizer = clip_models.create(args.model)
    loader = iter(batches(shards, preprocess, tokenizer, per_worker, seed=0, rank=0, segment=0))
    next(loader)
    started = time.perf_counter()
    for _ in range(args.steps):
        next(loader)
    return args.steps * per_worker / (time.perf_counter() - started)


def ours(shards: list[str], args: argparse.Namespace, work: Path) -> tuple[float, float, float]:
    from stages.train import TrainConfig, run_train

    workers = os.cpu_count() or 1
    config = TrainConfig(
        model=args.model,
        samples_seen=args.steps * args.batch,
        batch_size=args.batch,
        lr=1e-3,
        warmup=5,
        workers=workers,
        checkpoint_every_samples=args.steps * args.batch,
        log_every_steps=1,
    )
    started = time.perf_counter()
    run_train(shards, 0, config, work / "ours")
    total = time.perf_counter() - started
    log = [json.loads(line) for line in (work / "ours" / "train_log.jsonl").read_text().splitlines()]
    steady = [r for r in log if r["step"] > args.warmup_steps]
    per_step = np.median([args.batch / r["samples_per_second"] for r in steady])
    per_worker = np.median([r["samples_per_second_per_worker"] for r in steady])
    return args.batch / per_step, per_worker, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup-steps", type=int, default=5)
    args = parser.parse_args()

    import ray

    from pipeline.runtime import WORKER_ENV

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    try:
        shards = write_shards(work, 2000)
        base = baseline(shards, args)
        workers = os.cpu_count() or 1
        loader = loader_only(shards, args, args.batch // workers)
        ray.init(
            num_cpus=workers,
            include_dashboard=False,
            _temp_dir=ray_tmp,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": WORKER_ENV},
        )
        rate, per_worker, total = ours(shards, args, work)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"model {args.model}, global batch {args.batch}, {args.steps} steps, {workers} cores")
    print(f"plain open_clip loop (1 process, {workers} threads): {base:8.1f} samples/s")
    print(f"train stage (Ray Train, {workers} workers x 1 thread): {rate:8.1f} samples/s   ratio {rate / base:.2f}x")
    print(f"  end to end incl. Ray Train start-up: {args.steps * args.batch / total:.1f} samples/s ({total:.1f}s)")
    print(
        f"data loader alone (1 thread): {loader:8.1f} samples/s vs {per_worker:.1f} samples/s consumed per worker "
        f"({loader / per_worker:.1f}x headroom)"
    )


if __name__ == "__main__":
    main()
