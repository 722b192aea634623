"""open_clip models from names or local checkpoints; never from a hub.

Our own model configs (e.g. `demo-tiny`) live in `stages/model_configs/` and are registered
with open_clip on first use. A saved model is a folder with `weights.pt` (a state dict, read
with `weights_only=True`) and `model.json` (the open_clip model name).
"""

from __future__ import annotations

import importlib.util
import json
import math
import zipfile
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.atomic import atomic_path

if TYPE_CHECKING:  # torch is imported where it is used: `pipeline --help` and recipe checks stay quick
    import torch

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
WEIGHTS = "weights.pt"
MODEL_INFO = "model.json"


def _open_clip_config_dir() -> Path | None:
    """open_clip's own `model_configs/`, found without importing open_clip (~5 s with torch)."""
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) / "model_configs" if locations else None


def model_config(model_name: str) -> dict | None:
    """A model's open_clip config as its JSON file has it (ours, then open_clip's), without importing
    open_clip: what plans and budgets read. None for a name neither folder has."""
    for folder in (MODEL_CONFIG_DIR, _open_clip_config_dir()):
        path = folder / f"{model_name}.json" if folder else None
        if path is not None and path.is_file():
            return json.loads(path.read_text())
    return None


@cache
def register_model_configs() -> None:
    import open_clip

    open_clip.add_model_config(MODEL_CONFIG_DIR)


def create(
    model_name: str,
    aug_cfg: dict | None = None,
    force_image_size: int | None = None,
    drop_path: float | None = None,
    siglip: bool = False,
):
    """(model, train transform, eval transform, tokenizer) with random weights; `aug_cfg` is open_clip's
    AugmentationCfg, `drop_path` the stochastic depth of a timm image tower (ConvNeXt)."""
    import open_clip

    register_model_configs()
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model '{model_name}' (e.g. demo-tiny, RN50, ViT-B-32, ViT-L-14)")
    extra = {} if drop_path is None else {"vision_cfg": _with_drop_path(model_name, drop_path, force_image_size)}
    if siglip:  # open_clip's --siglip: a learned bias, and the temperature starting at 1/10
        extra.update(init_logit_scale=math.log(10), init_logit_bias=-10.0)
    model, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(
        model_name, pretrained=None, aug_cfg=aug_cfg, force_image_size=force_image_size, **extra
    )
    return model, preprocess_train, preprocess_eval, open_clip.get_tokenizer(model_name)


def check_drop_path(model_name: str) -> None:
    """Stochastic depth is a setting of timm image towers; open_clip's own ViT has none."""
    config = model_config(model_name)
    if config is None:
        raise ValueError(f"unknown open_clip model '{model_name}'")
    if "timm_model_name" not in config["vision_cfg"]:
        raise ValueError(
            f"train.drop_path: {model_name}'s image tower is open_clip's own, which has no stochastic depth "
            "(timm towers such as convnext_base_w's have)"
        )


def _with_drop_path(model_name: str, drop_path: float, image_size: int | None) -> dict:
    """The model's image tower config with stochastic depth set (open_clip reads it for timm towers only)."""
    check_drop_path(model_name)
    vision = dict(model_config(model_name)["vision_cfg"])
    vision.update(timm_drop_path=drop_path, timm_model_pretrained=False)
    if image_size:
        vision["image_size"] = image_size
    return vision


def save(model: torch.nn.Module, model_name: str, folder: Path) -> Path:
    """Write a model folder (weights + architecture name); it appears complete or not at all."""
    return save_state(model.state_dict(), model_name, folder)


def save_state(state: dict, model_name: str, folder: Path) -> Path:
    import torch

    with atomic_path(folder, folder=True) as tmp:
        torch.save(state, tmp / WEIGHTS)
        (tmp / MODEL_INFO).write_text(json.dumps({"model": model_name}))
    return Path(folder)


def load(folder: Path, device: str = "cpu", image_size: int | None = None):
    """(model, eval transform, tokenizer) from a folder written by `save`; `image_size`: at another
    resolution than it was trained at (a ViT's position embedding is interpolated, as open_clip does)."""
    folder = Path(folder)
    info_path, weights_path = folder / MODEL_INFO, folder / WEIGHTS
    if not info_path.exists() or not weights_path.exists():
        raise FileNotFoundError(f"{folder}: not a saved model (needs {MODEL_INFO} and {WEIGHTS})")
    model_name = json.loads(info_path.read_text())["model"]
    return load_checkpoint(weights_path, model_name, device, image_size)


def load_checkpoint(path: Path, model_name: str, device: str = "cpu", image_size: int | None = None):
    """(model, eval transform, tokenizer) from an open_clip checkpoint file (.pt/.bin/.safetensors).

    Accepts a bare state dict or open_clip's training checkpoint (`state_dict`, `module.` prefixes).
    """
    model, _, preprocess_eval, tokenizer = create(model_name, force_image_size=image_size)
    load_weights(model, path, model_name, device)
    return model.to(device).eval(), preprocess_eval, tokenizer


def load_weights(
    model: torch.nn.Module, path: Path, model_name: str, device: str = "cpu", may_lack: tuple[str, ...] = ()
) -> None:
    """Put an open_clip checkpoint's weights (a file, or a folder written by `save`) into `model`;
    `may_lack`: parameters the checkpoint need not have (they keep their initial values)."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS
    if is_torchscript(path):
        raise ValueError(
            f"{path}: a TorchScript archive (OpenAI's own .pt), not a state dict; convert it once with "
            f"`python -m pipeline convert-checkpoint {path} <folder> --model {model_name}`"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device=device)
    else:
        import torch

        state = torch.load(path, map_location=device, weights_only=True)  # never unpickles code
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    from open_clip.model import resize_pos_embed

    resize_pos_embed(state, model)  # a ViT at another image size than its weights': interpolated
    try:
        model.load_state_dict({**{k: v for k, v in model.state_dict().items() if k in may_lack}, **state})
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise ValueError(f"{path}: weights do not fit open_clip model '{model_name}': {first}") from None


# what OpenAI's TorchScript state dicts carry beside the weights (open_clip drops them too)
OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (code + constants), as OpenAI ships its CLIP checkpoints."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def convert_torchscript(path: Path, model_name: str, folder: Path) -> Path:
    """OpenAI's TorchScript CLIP as a saved model folder (a plain state dict): loaded once here,
    by the user's explicit command on a file they chose, so that runs never deserialise TorchScript.

    The weights must fit `model_name` exactly; OpenAI's checkpoints are open_clip's `-quickgelu`
    architectures (e.g. ViT-L-14-quickgelu): their activations are QuickGELU, not GELU."""
    model, *_ = create(model_name)
    import torch

    scripted = torch.jit.load(str(path), map_location="cpu")
    transient = {name for name, _ in model.named_buffers()} - set(model.state_dict())  # e.g. attn_mask
    state = {k: v for k, v in scripted.state_dict().items() if k not in OPENAI_METADATA and k not in transient}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise ValueError(f"{path}: weights do not fit open_clip model '{model_name}': {first}") from None
    return save(model, model_name, folder)


def model_name_of(path: str | Path | None, model_name: str | None = None) -> str:
    """The open_clip architecture of a saved model folder, else the name given with a checkpoint file."""
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"model not found: {path}")
    if path is not None and Path(path).is_dir():
        info = Path(path) / MODEL_INFO
        if not info.is_file():
            raise FileNotFoundError(f"{path}: not a saved model (needs {MODEL_INFO} and {WEIGHTS})")
        return json.loads(info.read_text())["model"]
    if not model_name:
        raise ValueError(f"{path}: a checkpoint file needs its open_clip model name (e.g. ViT-B-32)")
    return model_name


@cache
def eval_transform_and_tokenizer(model_name: str):
    """A model's eval image transform and tokenizer without building its weights: the model is made
    on torch's meta device (0.1 s for ViT-L-14 instead of 4 s), for CPU tasks that only preprocess."""
    import open_clip
    import torch

    register_model_configs()
    with torch.device("meta"):
        _, _, transform = open_clip.create_model_and_transforms(model_name, pretrained=None, device="meta")
    return transform, open_clip.get_tokenizer(model_name)


def load_model(path: str | Path, model_name: str | None = None, device: str = "cpu"):
    """A saved model folder, or a checkpoint file plus its open_clip model name."""
    path = Path(path)
    if path.is_dir():
        return load(path, device)
    if not path.is_file():
        raise FileNotFoundError(f"model not found: {path}")
    if not model_name:
        raise ValueError(f"{path}: a checkpoint file needs its open_clip model name (e.g. ViT-B-32)")
    return load_checkpoint(path, model_name, device)


def embed_dim(path: str | Path | None, model_name: str | None = None) -> int:
    """The joint embedding width of a saved model or named architecture, without loading weights
    (or importing open_clip: recipe checks stay quick)."""
    if path and Path(path).is_dir():
        model_name = json.loads((Path(path) / MODEL_INFO).read_text())["model"]
    config = model_config(model_name or "")
    if config is None:
        raise ValueError(f"unknown open_clip model '{model_name}'")
    return int(config["embed_dim"])
