"""Training throughput: the train stage (Ray Train) against open_clip_train's own loop.

    .venv/bin/python benchmarks/train.py --steps 60                    # CPU: demo-tiny, batch 64
    .venv/bin/python benchmarks/train.py --model ViT-B-32 --batch 256 --image-size 224 \\
        --steps 100 --warmup-steps 20 --peak-tflops 989                # one GPU: bf16, MFU

The anchor is open_clip_train itself: its `train_one_epoch` fed by its `get_wds_dataset`
(resampled shards, as our loader samples them), with open_clip's loss, cosine schedule and
gradient clipping. Ours is the train stage: `run_train` (TorchTrainer; on CPU one worker per
core with one thread each and DDP over gloo, on a GPU one worker). Same model, global batch,
optimiser settings and shards.

Both are measured the same way: wall-clock over the same steps after the same warm-up steps
(the anchor's step starts are taken from its scheduler calls, ours from the per-step times in
`train_log.jsonl`), so the ratio is steady state against steady state. Start-up (model, loader,
and for ours Ray Train's controller and workers) is reported on its own. On a GPU the achieved
TFLOP/s come from the counted forward MACs (x3 for forward and backward); `--peak-tflops` turns
them into MFU. `--json PATH` writes the result in the benchmarks' format (benchmark_result.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from benchmark_result import result, write_results  # noqa: E402 (benchmarks run as scripts)
from scene_shards import write_scene_shards  # noqa: E402


@dataclass(frozen=True)
class Timing:
    steady: float  # samples/s over the steps after the warm-up
    startup: float  # seconds from the call to the first step
    total: float  # seconds from the call to its return


def train_config(args: argparse.Namespace, gpu: bool):
    from stages.train import TrainConfig

    workers = 1 if gpu else (args.workers or os.cpu_count() or 1)
    return TrainConfig(
        model=args.model,
        samples_seen=args.steps * args.batch,
        batch_size=args.batch,
        lr=1e-3,
        warmup=5,
        workers=workers,
        threads_per_worker=1 if not gpu else max(1, (os.cpu_count() or 1) // 2),
        use_gpu=gpu,
        precision="bf16" if gpu else "fp32",
        force_image_size=args.image_size,
        checkpoint_every_samples=args.steps * args.batch,
        log_every_steps=1,
    )


def anchor(shards: list[Path], args: argparse.Namespace, config, gpu: bool) -> Timing:
    """open_clip_train's `train_one_epoch` over `args.steps` steps of its own webdataset loader."""
    import torch
    from open_clip import create_loss
    from open_clip_train.data import get_wds_dataset
    from open_clip_train.params import parse_args
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    from stages import clip_models
    from stages.train import parameter_groups

    started = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    pattern = f"{shards[0].parent}/{{00000..{len(shards) - 1:05d}}}.tar"
    oc = parse_args(
        [
            *("--train-data", pattern, "--dataset-resampled", "--train-num-samples", str(config.samples_seen)),
            *("--batch-size", str(args.batch), "--workers", "0", "--lr", str(config.lr)),
            *("--warmup", str(config.warmup), "--grad-clip-norm", str(config.grad_clip)),
            *("--precision", "amp_bf16" if gpu else "fp32", "--log-every-n-steps", "1"),
        ]
    )
    oc.device, oc.world_size, oc.rank, oc.local_rank = ("cuda:0" if gpu else "cpu"), 1, 0, 0
    oc.distributed, oc.distill, oc.wandb = False, False, False
    model, preprocess, _, tokenizer = clip_models.create(args.model, force_image_size=args.image_size)
    model.output_dict = True  # as open_clip_train's main creates it: train_one_epoch reads a dict
    model.to(oc.device)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.weight_decay),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
    )
    schedule = cosine_lr(optimizer, config.lr, config.warmup, config.total_steps)
    step_started: list[float] = []

    def timed_schedule(step: int):  # train_one_epoch calls it first thing in every step
        step_started.append(time.perf_counter())
        return schedule(step)

    data = {"train": get_wds_dataset(oc, preprocess, True, epoch=0, tokenizer=tokenizer)}
    train_one_epoch(model, data, create_loss(oc), 0, optimizer, None, timed_schedule, None, oc)
    if gpu:
        torch.cuda.synchronize()
    ended = time.perf_counter()
    if len(step_started) != args.steps:
        raise RuntimeError(f"open_clip_train ran {len(step_started)} steps, expected {args.steps}")
    steady = (args.steps - args.warmup_steps) * args.batch / (ended - step_started[args.warmup_steps])
    return Timing(steady=steady, startup=step_started[0] - started, total=ended - started)


def ours(shards: list[Path], args: argparse.Namespace, config, work: Path) -> Timing:
    """The train stage; step end times from its train_log.jsonl (one line per step)."""
    from stages.train import run_train

    started_wall, started = time.time(), time.perf_counter()
    run_train([str(s) for s in shards], 0, config, work / "ours", log=lambda m: None)
    total = time.perf_counter() - started
    log = [json.loads(line) for line in (work / "ours" / "train_log.jsonl").read_text().splitlines()]
    ends = {entry["step"]: entry["time"] for entry in log}
    if sorted(ends) != list(range(1, args.steps + 1)):
        raise RuntimeError(f"the train stage logged steps {sorted(ends)}, expected 1..{args.steps}")
    # the end of step W is the start of step W+1: the same steps as the anchor's after its warm-up
    steady = (args.steps - args.warmup_steps) * args.batch / (ends[args.steps] - ends[args.warmup_steps])
    first_step = ends[2] - ends[1]  # about one step: the first one's start is not logged
    return Timing(steady=steady, startup=ends[1] - first_step - started_wall, total=total)


def achieved_tflops(model: str, image_size: int | None, samples_per_second: float) -> float:
    """Counted forward MACs x 2 FLOPs x 3 (forward and backward), per second."""
    from pipeline.budget import counted_macs_per_sample

    return counted_macs_per_sample(model, image_size) * 2 * 3 * samples_per_second / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-tiny")
    parser.add_argument("--image-size", type=int, default=None, help="default: the model's")
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup-steps", type=int, default=10, help="steps left out of the steady-state clock")
    parser.add_argument("--workers", type=int, default=None, help="ours on CPU; default one per core")
    parser.add_argument("--samples", type=int, default=2000, help="samples in the generated shards")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--cpu", action="store_true", help="stay on CPU even when a GPU is present")
    parser.add_argument("--json", default=None, help="write the result here (benchmark_result.py's format)")
    args = parser.parse_args()
    if args.warmup_steps < 1 or args.steps < args.warmup_steps + 2:
        parser.error("--warmup-steps must be at least 1 and --steps at least 2 more")

    import ray
    import torch

    from pipeline.runtime import local_worker_env

    gpu = torch.cuda.is_available() and not args.cpu
    config = train_config(args, gpu)  # both sides' model, batch, steps and optimiser settings
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    size = args.image_size or 64
    try:
        shards = write_scene_shards(work / "shards", args.samples, size, 250)
        base = anchor(shards, args, config, gpu)
        ray.init(
            num_cpus=os.cpu_count(),
            num_gpus=1 if gpu else 0,
            include_dashboard=False,
            _temp_dir=ray_tmp,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": local_worker_env()},
        )
        mine = ours(shards, args, config, work)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    where = "1 GPU, bf16" if gpu else f"CPU, {os.cpu_count()} cores, fp32"
    print(f"model {args.model}, global batch {args.batch}, {args.steps} steps ({args.warmup_steps} warm-up), {where}")
    anchor_how = "1 process" if gpu else f"1 process x {os.cpu_count()} threads"
    ours_how = "1 worker" if gpu else f"{config.workers} workers x 1 thread, DDP over gloo"
    print(f"open_clip_train train_one_epoch ({anchor_how}): {base.steady:8.1f} samples/s steady")
    ratio = mine.steady / base.steady
    print(f"train stage, Ray Train ({ours_how}): {mine.steady:8.1f} samples/s steady   ratio {ratio:.2f}x")
    print(f"start-up to the first step: open_clip_train {base.startup:.1f} s, train stage {mine.startup:.1f} s")
    print(f"end to end: open_clip_train {base.total:.1f} s, train stage {mine.total:.1f} s")
    extra = {"startup_s": {"ours": mine.startup, "anchor": base.startup}}
    extra["total_s"] = {"ours": mine.total, "anchor": base.total}
    if gpu:
        tflops = {"ours": achieved_tflops(args.model, args.image_size, mine.steady)}
        tflops["anchor"] = achieved_tflops(args.model, args.image_size, base.steady)
        extra["tflops"] = tflops
        mfu = f", MFU {tflops['ours'] / args.peak_tflops:.1%}" if args.peak_tflops else ""
        print(f"achieved: ours {tflops['ours']:.1f} TFLOP/s, open_clip_train {tflops['anchor']:.1f} TFLOP/s{mfu}")
    params = {k: v for k, v in vars(args).items() if k != "json"} | {"gpu": gpu, "ours_workers": config.workers}
    write_results(args.json, [result("train", mine.steady, base.steady, "samples/s", params, **extra)])


if __name__ == "__main__":
    main()
