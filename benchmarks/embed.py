"""Embed benchmark: the embed stage on Ray Data actor pools vs a single-process torch loop.

    .venv/bin/python benchmarks/embed.py --images 3000 --model demo-tiny --size 64
    .venv/bin/python benchmarks/embed.py --images 1000 --model ViT-B-32 --size 224

Both sides embed the same webdataset shards (rendered scenes with captions) with the same
randomly initialised open_clip model: decode, preprocess, encode image and text, cosine. The
baseline is what one writes by hand: one process, torch's default threads, a Python loop over
the shards in batches (the model on the GPU when there is one). The stage runs Ray Data read
tasks, then decoding tasks (on a GPU; on CPU each replica decodes), feeding an actor pool (one model
per actor). Prints samples/s and the ratio, measured in the same run. Run by hand, not in CI.
`--json PATH` writes the result in the benchmarks' format (benchmark_result.py): the stage's
steady state against the loop's (the loop is warmed on one shard first), end to end beside it.

The floor is the model alone, measured in the same run: both towers and the cosine on tensors
already decoded and preprocessed, at the same batch size, in one process with every core's
threads (on a GPU: the GPU, with the stage's bf16 autocast). A stage cannot beat it; the
fractions of it say what decoding, preprocessing, Ray and start-up cost.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from benchmark_result import result, write_results  # noqa: E402 (benchmarks run as scripts)
from scene_shards import write_scene_shards  # noqa: E402


def single_process_loop(shards: list[Path], model_dir: str, batch_size: int) -> int:
    """The hand-written baseline: decode, preprocess and embed in one process (the model on the GPU,
    with the stage's bf16 autocast, when there is one)."""
    import contextlib

    import torch
    from PIL import Image

    from stages import clip_models
    from stages.shards import read_tar_samples

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, preprocess, tokenizer = clip_models.load(Path(model_dir), device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    done = 0

    def flush(images, captions):
        with torch.inference_mode(), autocast:
            pixels = torch.stack([preprocess(im) for im in images]).to(device)
            image = model.encode_image(pixels, normalize=True)
            text = model.encode_text(tokenizer(captions).to(device), normalize=True)
            (image * text).sum(dim=1).float().cpu().numpy()

    images, captions = [], []
    for tar in shards:
        for _, sample in read_tar_samples(tar):
            images.append(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
            captions.append(sample["txt"].decode())
            if len(images) == batch_size:
                flush(images, captions)
                done += len(images)
                images, captions = [], []
    if images:
        flush(images, captions)
        done += len(images)
    return done


def preprocess_alone(shard: Path, model_dir: str, batch_size: int) -> float:
    """Samples/s of one core decoding, resizing and tokenising (the stage's own CPU step), no model:
    with the replicas on GPUs, the CPUs left to these tasks set a second floor."""
    import numpy as np

    from stages.embed import read_shard
    from stages.embed_inputs import InputSpec, Preparer

    rows = list(read_shard({"tar": str(shard)}))
    prepare = Preparer(InputSpec(model_dir, threads=1))
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    columns = [{k: np.array([r[k] for r in b], dtype=object) for k in b[0]} for b in batches]
    prepare(columns[0])  # warm-up
    started = time.perf_counter()
    for batch in columns:
        prepare(batch)
    return len(rows) / (time.perf_counter() - started)


def model_alone(model_dir: str, batch_size: int, batches: int = 6) -> float:
    """Samples/s of the forward passes alone (image and text towers, cosine) on ready tensors."""
    import contextlib

    import torch

    from stages import clip_models

    model, _, tokenizer = clip_models.load(Path(model_dir))
    side = model.visual.image_size
    side = side[0] if isinstance(side, tuple | list) else side
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    images = torch.randn(batch_size, 3, side, side, device=device)
    tokens = tokenizer(["a photo of a red cube on a table"] * batch_size).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def one_batch() -> None:
        with torch.inference_mode(), autocast:
            image = model.encode_image(images, normalize=True)
            text = model.encode_text(tokens, normalize=True)
            (image * text).sum(dim=1).float().cpu()

    one_batch()  # warm-up
    started = time.perf_counter()
    for _ in range(batches):
        one_batch()
    return batches * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--size", type=int, default=64, help="rendered image side, px")
    parser.add_argument("--model", default="demo-tiny")
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--actors", type=int, default=None, help="default: one per CPU (or GPU)")
    parser.add_argument("--threads-per-actor", type=int, default=1)
    parser.add_argument("--unique", type=int, default=None, help="render this many scenes and repeat them")
    parser.add_argument("--loop-images", type=int, default=None, help="the loop on this many (default: all)")
    parser.add_argument("--preprocess-in", default="auto", choices=["auto", "tasks", "actor"])
    parser.add_argument("--json", default=None, help="write the result here (benchmark_result.py's format)")
    args = parser.parse_args()

    import ray
    import torch

    from pipeline.runtime import local_worker_env
    from stages import clip_models
    from stages.embed import EmbedConfig, prepare_in_tasks, run_embed

    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    try:
        shards = write_scene_shards(work / "shards", args.images, args.size, args.per_shard, args.unique)
        torch.manual_seed(0)
        model, *_ = clip_models.create(args.model)
        model_dir = str(clip_models.save(model, args.model, work / "model"))
        del model
        print(
            f"{args.images} images of {args.size}px in {len(shards)} shards, model {args.model}, {os.cpu_count()} CPUs"
        )

        single_process_loop(shards[:1], model_dir, args.batch_size)  # warm caches, as the stage's actors warm up
        loop_shards = shards[: -(-args.loop_images // args.per_shard)] if args.loop_images else shards
        started = time.perf_counter()
        n = single_process_loop(loop_shards, model_dir, args.batch_size)
        baseline = n / (time.perf_counter() - started)
        print(f"single-process torch loop ({torch.get_num_threads()} threads): {baseline:8.1f} samples/s")
        floor = model_alone(model_dir, args.batch_size)
        print(f"floor, the model alone on ready tensors: {floor:8.1f} samples/s")
        per_core = preprocess_alone(shards[0], model_dir, args.batch_size)
        gpus = torch.cuda.device_count()
        free_cores = (os.cpu_count() or 1) - gpus  # each GPU replica holds one core
        print(f"decode+resize+tokenise alone, one core:  {per_core:8.1f} samples/s")
        if gpus:
            print(f"  x {free_cores} cores the replicas leave: {per_core * free_cores:8.1f} samples/s (the CPU floor)")

        ray.init(
            include_dashboard=False,
            _temp_dir=ray_tmp,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": local_worker_env()},
        )
        ray.data.DataContext.get_current().enable_progress_bars = False
        config = EmbedConfig(
            batch_size=args.batch_size,
            actors=args.actors,
            threads_per_actor=args.threads_per_actor,
            preprocess_in=args.preprocess_in,
        )
        in_tasks = prepare_in_tasks(config)
        print(f"decoding and resizing {'in CPU tasks before the replicas' if in_tasks else 'inside each replica'}")
        run_embed(work / "shards", config.model_copy(update={"shard_glob": "00000.tar"}), work / "warm", model_dir)
        manifest = run_embed(work / "shards", config, work / "stage", model_dir)
        stage = manifest.kept / manifest.seconds
        steady = manifest.metrics["steady_samples_per_second"]
        print(f"embed stage, Ray Data actor pool:        {stage:8.1f} samples/s end to end (incl. replica start-up)")
        print(f"                                          {steady:8.1f} samples/s steady state (after first batch)")
        print(f"ratio: {stage / baseline:.2f}x end to end, {steady / baseline:.2f}x steady state")
        print(f"of the floor: {stage / floor:.2f}x end to end, {steady / floor:.2f}x steady state")
        if gpus:
            print(f"of the CPU floor: {steady / (per_core * free_cores):.2f}x steady state")
        if len(shards) < 8:
            print("note: under 8 shards the first batch arrives late and the steady-state figure overstates")
        names = ("images", "size", "model", "per_shard", "batch_size", "actors", "unique")
        params = {k: getattr(args, k) for k in names} | {"preprocess_in": "tasks" if in_tasks else "actor"}
        extra = {"end_to_end": stage, "shards": len(shards), "preprocess_per_core": per_core}
        if gpus:
            extra["cpu_floor"] = per_core * free_cores
        row = result("embed", steady, baseline, "samples/s", params, floor=floor, **extra)
        write_results(args.json, [row])
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
