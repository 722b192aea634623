"""open_clip models from names or local checkpoints; never from a hub.

Our own model configs (e.g. `demo-tiny`) live in `stages/model_configs/` and are registered
with open_clip on first use. A saved model is a folder with `weights.pt` (a state dict, read
with `weights_only=True`) and `model.json` (the open_clip model name).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
WEIGHTS = "weights.pt"
MODEL_INFO = "model.json"


@cache
def register_model_configs() -> None:
    import open_clip

    open_clip.add_model_config(MODEL_CONFIG_DIR)


def create(model_name: str):
    """(model, train transform, eval transform, tokenizer) with random weights."""
    import open_clip

    register_model_configs()
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model '{model_name}' (e.g. demo-tiny, RN50, ViT-B-32, ViT-L-14)")
    model, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(model_name, pretrained=None)
    return model, preprocess_train, preprocess_eval, open_clip.get_tokenizer(model_name)


def save(model: torch.nn.Module, model_name: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / WEIGHTS)
    (folder / MODEL_INFO).write_text(json.dumps({"model": model_name}))
    return folder


def load(folder: Path, device: str = "cpu"):
    """(model, eval transform, tokenizer) from a folder written by `save`."""
    folder = Path(folder)
    info_path, weights_path = folder / MODEL_INFO, folder / WEIGHTS
    if not info_path.exists() or not weights_path.exists():
        raise FileNotFoundError(f"{folder}: not a saved model (needs {MODEL_INFO} and {WEIGHTS})")
    model_name = json.loads(info_path.read_text())["model"]
    model, _, preprocess_eval, tokenizer = create(model_name)
    state = torch.load(weights_path, map_location=device, weights_only=True)  # never unpickles code
    model.load_state_dict(state)
    return model.to(device).eval(), preprocess_eval, tokenizer
