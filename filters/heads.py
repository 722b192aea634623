"""Small MLP heads on CLIP image embeddings: LAION's aesthetic predictor layout, and an NSFW head.

The layer layout matches LAION's improved aesthetic predictor (`layers.0` … `layers.7`:
1024-128-64-16-1 with dropout and no activations), so a LAION `.pth` state dict for the
matching embedding width loads as is. A head is saved as `<name>.pt` (a state dict, read with
`weights_only=True`) plus `<name>.json` describing it; loading checks both before any scoring.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from pipeline.atomic import write_json, write_with

if TYPE_CHECKING:  # torch is imported where a head is built or read: the CLI and recipe checks stay quick
    from filters.head_net import EmbeddingHead

HeadKind = Literal["regression", "binary"]  # aesthetic rating, or probability of a class (nsfw)
LAION_HIDDEN = (1024, 128, 64, 16)
LAION_DROPOUT = (0.2, 0.2, 0.1)


class HeadError(ValueError):
    """A head file is missing, malformed or does not fit the embeddings; one line."""


@dataclass(frozen=True)
class HeadInfo:
    kind: HeadKind
    input_dim: int
    hidden: tuple[int, ...] = LAION_HIDDEN
    activation: bool = False  # LAION's predictor has none; heads fitted here use ReLU between layers
    target: str = ""
    embedding_model: str = ""
    metrics: dict | None = None

    @property
    def is_laion_l14(self) -> bool:
        """LAION's improved aesthetic predictor: no activations, 768 -> 1024-128-64-16 -> 1, trained on
        OpenAI CLIP ViT-L/14 image embeddings (christophschuhmann/improved-aesthetic-predictor)."""
        return self.input_dim == 768 and self.hidden == LAION_HIDDEN and not self.activation


def save_head(head: EmbeddingHead, info: HeadInfo, path: Path) -> Path:
    path = Path(path).with_suffix(".pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    info = replace(info, activation=head.activation)  # the file must describe the head it holds
    import torch

    write_with(path, lambda tmp: torch.save(head.state_dict(), tmp))
    write_json(path.with_suffix(".json"), asdict(info))
    return path


def _infer_info(state: dict, kind: HeadKind) -> HeadInfo:
    """A bare state dict (e.g. LAION's .pth): read the layer widths from the weight shapes."""
    weights = [v for k, v in sorted(state.items(), key=lambda kv: _layer_index(kv[0])) if k.endswith(".weight")]
    if not weights or any(w.ndim != 2 for w in weights) or weights[-1].shape[0] != 1:
        raise HeadError("not an MLP head state dict (expected Linear weights ending in one output)")
    return HeadInfo(kind=kind, input_dim=int(weights[0].shape[1]), hidden=tuple(int(w.shape[0]) for w in weights[:-1]))


def _layer_index(key: str) -> int:
    parts = key.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else 0


def load_head(path: str | Path, kind: HeadKind = "regression") -> tuple[EmbeddingHead, HeadInfo]:
    """Load a head file; `kind` is used only for bare state dicts without a `.json` beside them.

    A file is read once per process while it is unchanged: recipe checks, every filter of a
    strategy and every strategy of a sweep share the loaded head.
    """
    path = Path(path)
    if not path.is_file():
        raise HeadError(f"head weights not found: {path}")
    meta = path.with_suffix(".json")
    stamps = tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.exists() else None for p in (path, meta))
    return _read_head(path.resolve(), kind, stamps)


@functools.lru_cache(maxsize=32)
def _read_head(path: Path, kind: HeadKind, stamps: tuple) -> tuple[EmbeddingHead, HeadInfo]:
    import torch

    from filters.head_net import EmbeddingHead

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise HeadError(f"{path}: not a readable weights file ({type(err).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HeadError(f"{path}: expected a state dict of tensors")
    try:
        info = _infer_info(state, kind)
    except HeadError as err:
        raise HeadError(f"{path}: {err}") from None
    meta = path.with_suffix(".json")
    if meta.exists():
        saved = json.loads(meta.read_text())
        info = HeadInfo(**{**saved, "hidden": info.hidden, "input_dim": info.input_dim})
    head = EmbeddingHead(info.input_dim, info.hidden, info.activation)
    try:
        head.load_state_dict(state)
    except RuntimeError:
        raise HeadError(f"{path}: layer names/shapes do not match the LAION MLP layout") from None
    return head.eval(), info


def score_head(head: EmbeddingHead, info: HeadInfo, embeddings: np.ndarray, batch: int = 65536) -> np.ndarray:
    """Head output per row: a rating (regression) or a probability (binary)."""
    if embeddings.ndim != 2 or embeddings.shape[1] != info.input_dim:
        raise HeadError(
            f"head expects {info.input_dim}-dim embeddings but the pool's are {embeddings.shape[-1]}-dim "
            "(fit the head on this embedding model's outputs)"
        )
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(embeddings), batch):
            x = torch.from_numpy(np.ascontiguousarray(embeddings[start : start + batch], np.float32))
            y = head(x)
            out.append((torch.sigmoid(y) if info.kind == "binary" else y).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def fit_head(
    embeddings: np.ndarray,
    targets: np.ndarray,
    kind: HeadKind,
    *,
    epochs: int = 200,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    validation_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[EmbeddingHead, dict[str, float]]:
    """Full-batch Adam on (embedding, target) pairs; returns the head and held-out metrics."""
    import torch
    from torch import nn

    from filters.head_net import EmbeddingHead

    if len(embeddings) != len(targets) or len(targets) < 4:
        raise HeadError(f"need at least 4 labelled embeddings to fit a head, got {len(targets)}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(targets))
    n_val = max(1, int(round(len(targets) * validation_fraction)))
    val, train = order[:n_val], order[n_val:]
    torch.manual_seed(seed)
    head = EmbeddingHead(embeddings.shape[1], activation=True)
    x = torch.from_numpy(np.asarray(embeddings, np.float32))
    y = torch.from_numpy(np.asarray(targets, np.float32))
    loss_fn = nn.BCEWithLogitsLoss() if kind == "binary" else nn.MSELoss()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        head.train()
        optimizer.zero_grad()
        loss = loss_fn(head(x[train]), y[train])
        loss.backward()
        optimizer.step()
    head.eval()
    with torch.inference_mode():
        pred = head(x[val])
        metrics = {"train_loss": float(loss), "val_loss": float(loss_fn(pred, y[val])), "n_train": float(len(train))}
        if kind == "binary":
            metrics["val_accuracy"] = float(((pred > 0).float() == y[val]).float().mean())
        else:
            metrics["val_mae"] = float((pred - y[val]).abs().mean())
    return head, metrics
