"""The head network itself (torch): kept apart so that reading a recipe does not import torch."""

from __future__ import annotations

import torch
from torch import nn

from filters.heads import LAION_DROPOUT, LAION_HIDDEN


class EmbeddingHead(nn.Module):
    """LAION's aesthetic MLP: Linear/Dropout stack; binary heads apply a sigmoid when scoring.

    `activation` adds ReLU after each hidden Linear in `forward` without adding modules, so the
    state dict keeps LAION's key names either way.
    """

    def __init__(self, input_dim: int, hidden: tuple[int, ...] = LAION_HIDDEN, activation: bool = False):
        super().__init__()
        self.activation = activation
        layers: list[nn.Module] = []
        width = input_dim
        for i, size in enumerate(hidden):
            layers.append(nn.Linear(width, size))
            if i < len(LAION_DROPOUT):
                layers.append(nn.Dropout(LAION_DROPOUT[i]))
            width = size
        layers.append(nn.Linear(width, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linears = [i for i, layer in enumerate(self.layers) if isinstance(layer, nn.Linear)]
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.activation and isinstance(layer, nn.Linear) and i != linears[-1]:
                x = torch.relu(x)
        return x.squeeze(-1)
