"""What a recipe will cost before it runs: training compute and storage, for `--dry-run`.

Compute follows DataComp's convention: multiply-accumulates of one forward pass of both towers,
times samples seen (their Table 2: 9.5e16 MACs for `small`, ViT-B-32 x 12.8M). ViTs are counted
analytically from the open_clip config; any other model (ConvNeXt, ResNet) or image size by one
forward pass on the meta device under torch's FLOP counter (ViT-B-32 that way: 7.39e9 per sample,
DataComp's 7.42e9). Training
FLOPs are taken as 6 x MACs (forward + backward, 2 FLOPs per MAC). Storage scales DataComp's
published pool sizes (450 GB for 12.8M samples at 512 px, keep_ratio_largest) by pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

from stages import clip_models

DATACOMP_BYTES_PER_SAMPLE_AT_512 = 450e9 / 12.8e6
METADATA_BYTES_PER_SAMPLE = 250  # parquet row: uid, url, caption, sizes, status (compressed)
REFERENCE_GPU_FLOPS = 312e12 * 0.4  # A100 bf16 peak at 40% utilisation, for a rough GPU-hour figure


def _transformer_macs(tokens: int, width: int, layers: int, mlp_ratio: float) -> float:
    """Per forward pass: QKV + output projections (4 d^2), MLP (2 r d^2) per token; attention 2 n d per token."""
    per_token = (4 + 2 * mlp_ratio) * width**2 + 2 * tokens * width
    return layers * tokens * per_token


def forward_macs_per_sample(model_name: str) -> float | None:
    """MACs of one image + one caption through a ViT CLIP; None for configs this does not model (ResNets)."""
    config = clip_models.model_config(model_name)
    if config is None:
        raise ValueError(f"unknown open_clip model '{model_name}'")
    vision, text = config["vision_cfg"], config["text_cfg"]
    if not all(isinstance(cfg.get(k), int) for cfg in (vision, text) for k in ("layers", "width")):
        return None
    if not isinstance(vision.get("patch_size"), int) or not isinstance(vision.get("image_size"), int):
        return None
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    patch_embed = patches * 3 * vision["patch_size"] ** 2 * vision["width"]
    image = patch_embed + _transformer_macs(
        patches + 1, vision["width"], vision["layers"], vision.get("mlp_ratio", 4.0)
    )
    text_macs = _transformer_macs(
        text.get("context_length", 77), text["width"], text["layers"], text.get("mlp_ratio", 4.0)
    )
    return float(image + text_macs)


def counted_macs_per_sample(model_name: str, image_size: int | None = None) -> float:
    """MACs of one image + one caption, counted by running the model once on the meta device (no
    memory, no arithmetic) under torch's FLOP counter: any open_clip model, ConvNeXt and ResNets too."""
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    clip_models.register_model_configs()
    with torch.device("meta"):
        model = open_clip.create_model(model_name, pretrained=None, device="meta", force_image_size=image_size)
    size = image_size or model.visual.image_size
    height, width = (size, size) if isinstance(size, int) else size
    image = torch.zeros(1, 3, height, width, device="meta")
    text = torch.zeros(1, model.context_length, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.encode_image(image)
        model.encode_text(text)
    return counter.get_total_flops() / 2


@dataclass(frozen=True)
class Budget:
    samples_seen: int
    macs: float | None
    train_flops: float | None
    reference_gpu_hours: float | None


def training_budget(model_name: str, samples_seen: int, image_size: int | None = None) -> Budget:
    """Analytic for ViTs at their own size (DataComp's figures), counted from the model otherwise."""
    per_sample = None if image_size else forward_macs_per_sample(model_name)
    if per_sample is None:
        per_sample = counted_macs_per_sample(model_name, image_size)
    macs = per_sample * samples_seen
    return Budget(samples_seen, macs, 6 * macs, 6 * macs / REFERENCE_GPU_FLOPS / 3600)


@dataclass(frozen=True)
class Storage:
    shards: float
    metadata: float
    embeddings: float

    @property
    def total(self) -> float:
        return self.shards + self.metadata + self.embeddings


def storage_estimate(rows: int, image_size: int, embed_dim: int | None) -> Storage:
    """Bytes for the downloaded shards, their parquet metadata and float16 image+text embeddings."""
    shards = rows * DATACOMP_BYTES_PER_SAMPLE_AT_512 * (image_size / 512) ** 2
    embeddings = rows * 2 * embed_dim * 2 if embed_dim else 0.0
    return Storage(shards, rows * METADATA_BYTES_PER_SAMPLE, embeddings)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"
