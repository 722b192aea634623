"""Evaluate stage: zero-shot classification and image-text retrieval of a trained CLIP model.

The evaluation set is a folder in the CLIP_benchmark / webdataset layout: `*.tar` shards whose
samples carry an image, a caption (`txt`) and a class index (`cls`), plus `classnames.json`.
Zero-shot: class names x prompt templates -> text classifier (open_clip's builder), top-1/top-5.
Retrieval: each image's own caption among all captions and back, recall@1/5/10.
"""

from __future__ import annotations

import glob
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image
from pydantic import Field

from pipeline.atomic import write_json
from pipeline.manifest import Manifest, count_reasons
from pipeline.models import StrictModel
from pipeline.stage import (
    MissingInput,
    PlanRow,
    Resources,
    RunContext,
    SourceOutputs,
    Stage,
    StageOutputs,
    earlier_source,
)
from stages import clip_models
from stages.shards import image_bytes, read_tar_samples
from stages.train import TrainOutputs

if TYPE_CHECKING:  # imported where a model runs: reading a recipe does not need torch
    import torch

DEFAULT_TEMPLATES = ["a {}.", "a photo of a {}.", "a small {}.", "a large {}.", "a {} on a plain background."]


class EvaluateConfig(StrictModel):
    eval_dir: str | None = Field(None, description="folder with *.tar and classnames.json; demo: its held-out set")
    tasks: list[str] = Field(
        default_factory=list,
        description="more evaluation folders (CLIP_benchmark's webdataset layout, test/ subfolder included): "
        "each reported as task/<folder name>/<metric>, and their average as tasks_average/<metric>",
    )
    image_size: int | None = Field(None, gt=0, description="evaluate at this resolution instead of training's")
    use_gpu: bool = Field(False, description="run the evaluation task on a GPU of the cluster")
    cpus: float = Field(1, gt=0, description="CPUs of the evaluation task (decoding, and the model on CPU)")
    templates: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    batch_size: int = Field(256, gt=0)
    recall_at: list[int] = Field(default_factory=lambda: [1, 5, 10])


def eval_tars(eval_dir: Path) -> list[str]:
    """The set's shards: in the folder, or in its test/ split (CLIP_benchmark's webdataset layout)."""
    tars = sorted(glob.glob(str(eval_dir / "*.tar"))) or sorted(glob.glob(str(eval_dir / "test" / "*.tar")))
    if not tars:
        raise FileNotFoundError(f"evaluation set {eval_dir}: no .tar shards (in it or in its test/ folder)")
    return tars


@dataclass(frozen=True)
class EncodedSet:
    """An evaluation folder as one model sees it: image features (not images: a set the size of
    ImageNet's 50,000 would be 30 GB of decoded tensors), captions, labels, undecodable images."""

    folder: Path
    image_features: torch.Tensor
    captions: list[str]
    labels: list[int | None]
    failures: dict[str, int]


def encode_eval_set(model, preprocess, folder: Path, batch: int, device: str = "cpu") -> EncodedSet:
    """Decode and encode the set's images a batch at a time: memory is one batch, however large the set."""
    import torch

    features, pending, captions, labels, failures = [], [], [], [], []

    def encode_pending() -> None:
        if pending:
            with torch.no_grad():
                features.append(model.encode_image(torch.stack(pending).to(device), normalize=True).float().cpu())
            pending.clear()

    for tar in eval_tars(folder):
        for _, sample in read_tar_samples(tar):
            try:
                with Image.open(io.BytesIO(image_bytes(sample) or b"")) as image:
                    pending.append(preprocess(image.convert("RGB")))
            except Exception:  # noqa: BLE001 - an undecodable eval image is counted, not fatal
                failures.append("decode_error")
                continue
            captions.append(sample.get("txt", b"").decode("utf-8"))
            labels.append(int(sample["cls"]) if "cls" in sample else None)
            if len(pending) == batch:
                encode_pending()
    encode_pending()
    if not features:
        raise ValueError(f"evaluation set {folder}: no image could be decoded")
    return EncodedSet(folder, torch.cat(features), captions, labels, count_reasons(failures))


def _encode_texts(model, tokenizer, captions: list[str], batch: int, device: str) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return torch.cat(
            [
                model.encode_text(tokenizer(captions[i : i + batch]).to(device), normalize=True).float().cpu()
                for i in range(0, len(captions), batch)
            ]
        )


def read_classnames(eval_dir: Path) -> list[str] | None:
    """classnames.json (ours) or classnames.txt, one per line (CLIP_benchmark's)."""
    if (eval_dir / "classnames.json").exists():
        return json.loads((eval_dir / "classnames.json").read_text())
    if (eval_dir / "classnames.txt").exists():
        return [line.strip() for line in (eval_dir / "classnames.txt").read_text().splitlines() if line.strip()]
    return None


def read_templates(eval_dir: Path, default: list[str]) -> list[str]:
    """CLIP_benchmark's zeroshot_classification_templates.txt ({c} placeholders) when present."""
    path = eval_dir / "zeroshot_classification_templates.txt"
    if not path.exists():
        return default
    return [line.strip().replace("{c}", "{}") for line in path.read_text().splitlines() if line.strip()]


def zeroshot_accuracy(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Top-1/top-5 accuracy of (n images, n classes) logits against class indices, and chance."""
    n_classes = logits.shape[1]
    top5 = logits.topk(min(5, n_classes), dim=1).indices
    return {
        "zeroshot_top1": float((top5[:, 0] == target).float().mean()),
        "zeroshot_top5": float((top5 == target[:, None]).any(dim=1).float().mean()),
        "zeroshot_chance": 1 / n_classes,
    }


def recall_at_k(similarity: torch.Tensor, ks: list[int]) -> dict[int, float]:
    """Recall@k of a square (queries x candidates) similarity whose row i matches column i.

    A query's rank is the number of candidates strictly more similar than its match, so a tie with
    the match is resolved in the query's favour (exact float ties are rare with real embeddings)."""
    ranks = (similarity > similarity.diagonal()[:, None]).sum(dim=1)
    return {k: float((ranks < k).float().mean()) for k in ks}


def score_model(model, tokenizer, encoded: EncodedSet, config: EvaluateConfig, device: str = "cpu") -> dict[str, float]:
    """Zero-shot top-1/top-5 (when the set has class names and labels) and recall@k both ways."""
    import torch
    from open_clip import build_zero_shot_classifier

    image_features, captions, labels = encoded.image_features, encoded.captions, encoded.labels
    metrics: dict[str, float] = {}
    classnames = read_classnames(encoded.folder)
    templates = read_templates(encoded.folder, config.templates)
    if classnames and all(label is not None for label in labels):
        classifier = build_zero_shot_classifier(model, tokenizer, classnames, templates, device=device)
        metrics.update(zeroshot_accuracy(image_features @ classifier.float().cpu(), torch.tensor(labels)))
    if all(captions):  # a classification set (CLIP_benchmark's) has no captions: no retrieval
        text_features = _encode_texts(model, tokenizer, captions, config.batch_size, device)
        similarity = image_features @ text_features.T
        for k, value in recall_at_k(similarity, config.recall_at).items():
            metrics[f"image_to_text_recall_at_{k}"] = value
        for k, value in recall_at_k(similarity.T, config.recall_at).items():
            metrics[f"text_to_image_recall_at_{k}"] = value
        metrics["retrieval_chance_recall_at_1"] = 1 / len(captions)
    return metrics


def task_metrics(per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    """task/<name>/<metric> for each task, and tasks_average/<metric> over the tasks that have it
    (DataComp reports the average over its tasks the same way)."""
    out = {f"task/{name}/{k}": v for name, metrics in per_task.items() for k, v in metrics.items()}
    for key in sorted({k for metrics in per_task.values() for k in metrics}):
        values = [metrics[key] for metrics in per_task.values() if key in metrics]
        out[f"tasks_average/{key}"] = sum(values) / len(values)
    return out


def run_evaluate(model_dir: Path, eval_dir: Path, config: EvaluateConfig, stage_dir: Path) -> Manifest:
    """Score the model on the held-out set (the manifest counts its samples) and on `config.tasks`,
    in batches of `config.batch_size`, on the GPU when the process has one and `use_gpu` is set."""
    import torch

    started = time.perf_counter()
    device = "cuda" if config.use_gpu and torch.cuda.is_available() else "cpu"
    model, preprocess, tokenizer = clip_models.load(model_dir, device=device, image_size=config.image_size)

    def scored(folder: Path) -> tuple[dict[str, float], EncodedSet]:
        encoded = encode_eval_set(model, preprocess, folder, config.batch_size, device)
        return score_model(model, tokenizer, encoded, config, device), encoded

    metrics, held_out = scored(eval_dir)
    metrics.update(task_metrics({Path(task).name: scored(Path(task))[0] for task in config.tasks}))
    captions, failures = held_out.captions, held_out.failures
    stage_dir.mkdir(parents=True, exist_ok=True)
    results = stage_dir / "results.json"
    write_json(results, metrics)
    n = len(captions) + sum(failures.values())
    return Manifest(
        stage="evaluate",
        **{"in": n},
        kept=len(captions),
        failed=failures,
        outputs=EvaluateOutputs(results=str(results)).as_dict(),
        seconds=time.perf_counter() - started,
        metrics=metrics,
    )


def held_out_dir(configured: str | None, source: SourceOutputs | None) -> str | None:
    """The evaluation set: `evaluate.eval_dir` if set, else the source's own held-out set."""
    return configured or (source.eval_dir if source is not None else None)


def eval_classnames(configured: str | None, source: SourceOutputs | None) -> list[str] | None:
    """The evaluation set's class names (None when there is no set or it has none)."""
    where = held_out_dir(configured, source)
    return read_classnames(Path(where)) if where else None


class EvaluateOutputs(StageOutputs):
    results: str  # results.json: every metric of the manifest, for sweeps and reports


@dataclass
class EvaluateInputs:
    model: TrainOutputs
    source: SourceOutputs | None = None  # its held-out set, unless evaluate.eval_dir is set


class Evaluate(Stage):
    name = "evaluate"
    summary = "zero-shot classification and retrieval on the held-out set"
    config_model = EvaluateConfig
    Inputs = EvaluateInputs
    Outputs = EvaluateOutputs

    def check(self, before: list[Stage]) -> None:
        source = earlier_source(before)
        if not self.config.eval_dir and not (source and source.gives_eval_set):
            raise MissingInput("evaluate.eval_dir is needed: the source has no held-out set", "evaluate.eval_dir")
        for i, task in enumerate(self.config.tasks):
            if not Path(task).is_dir():
                raise MissingInput(f"evaluate.tasks.{i}: not found: {task}", f"evaluate.tasks.{i}")
        names = [Path(task).name for task in self.config.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluate.tasks: two folders share a name ({names}); their metrics would collide")

    def resources(self) -> Resources:
        return Resources(cpus=self.config.cpus, gpus=1 if self.config.use_gpu else 0)

    def plan(self, run_dir: Path, rows: int | None) -> PlanRow:
        where = self.config.eval_dir or "the source's held-out set"
        output = str(run_dir / self.name / "results.json")
        tasks = f", {len(self.config.tasks)} more task(s) and their average" if self.config.tasks else ""
        note = f"zero-shot top-1/top-5, retrieval R@1/5/10{tasks}"
        return PlanRow(self.name, where, output, None, note, f"one Ray task: {self.resources().describe()}")

    def run(self, ctx: RunContext, inputs: EvaluateInputs) -> tuple[EvaluateOutputs, Manifest]:
        """One Ray task on a worker with the resources asked (a GPU with `use_gpu`), not the driver."""
        from pipeline.executor import run_one

        # absolute: the task's worker may not share this process's working directory (a joined cluster)
        eval_dir, model = Path(held_out_dir(self.config.eval_dir, inputs.source)).absolute(), Path(inputs.model.model)
        need, args = self.resources(), (model.absolute(), eval_dir, self.config, self.stage_dir(ctx).absolute())
        manifest = run_one(run_evaluate, *args, name=f"{self.name}:0", num_cpus=need.cpus, num_gpus=need.gpus)
        return self.finished(manifest)
