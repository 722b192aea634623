"""Zero-shot text embeddings of the evaluation classes, made with the embed stage's model.

They are the default targets of the `image_based` filter: DataComp picks the clusters nearest to
ImageNet training images; without target images, the classes' prompt embeddings (the same
classifier zero-shot evaluation builds) stand in for them. Written once, next to the embeddings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_path
from stages import clip_models


def write_class_embeddings(
    model_path: str, model_name: str | None, classnames: list[str], templates: list[str], out_path: Path
) -> Path:
    """(n_classes, dim) float32 .npy of unit-norm class embeddings (prompt-averaged, as open_clip builds them)."""
    import torch
    from open_clip import build_zero_shot_classifier

    model, _, tokenizer = clip_models.load_model(model_path, model_name, "cpu")
    with torch.no_grad():
        classifier = build_zero_shot_classifier(model, tokenizer, classnames, templates, device="cpu")
    matrix = classifier.T.float().numpy()
    with atomic_path(out_path) as tmp, tmp.open("wb") as handle:  # np.save would append .npy to a bare path
        np.save(handle, matrix, allow_pickle=False)
    return out_path
