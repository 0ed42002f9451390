"""The MIL models: gated-attention MIL and the mean-pooling linear baseline.

A slide is a bag of tile embeddings ``[N, D]`` with one label. **abmil** (Ilse, Tomczak & Welling 2018, the
gated variant; the aggregator CLAM, STAMP and slideflow build on) encodes each tile, gives it an attention weight
``softmax_n(w · (tanh(V h_n) ⊙ sigmoid(U h_n)))`` and classifies the attention-weighted mean; the weights say
which tiles made the call. **mean** classifies the plain mean of the tile embeddings with one linear layer (the
linear probe on the slide embedding, trained the same way): what attention has to beat. Both return the class
logits and each tile's weight (uniform for mean), so the rest of the stage treats them alike.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GatedAttentionMIL", "MeanPoolLinear", "build_model"]


class GatedAttentionMIL(nn.Module):
    """Gated-attention MIL: tile encoder → gated attention → weighted mean → linear classifier."""

    def __init__(self, dim: int, n_classes: int, hidden_dim: int = 128, dropout: float = 0.25) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden_dim, hidden_dim)
        self.attention_u = nn.Linear(hidden_dim, hidden_dim)
        self.attention_w = nn.Linear(hidden_dim, 1)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``bag`` [N, D] → (logits [C], attention [N] summing to 1)."""
        h = self.encoder(bag)
        gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        attention = torch.softmax(self.attention_w(gate).squeeze(-1), dim=0)
        return self.classifier(attention @ h), attention


class MeanPoolLinear(nn.Module):
    """Mean of the tile embeddings → dropout → linear classifier; every tile weighs 1/N."""

    def __init__(self, dim: int, n_classes: int, hidden_dim: int = 128, dropout: float = 0.25) -> None:
        super().__init__()
        del hidden_dim  # one linear layer: nothing hidden
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, n_classes)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention = torch.full((bag.shape[0],), 1.0 / bag.shape[0], dtype=bag.dtype, device=bag.device)
        return self.classifier(self.dropout(bag.mean(dim=0))), attention


def build_model(name: str, dim: int, n_classes: int, hidden_dim: int, dropout: float) -> nn.Module:
    """A fresh model by its config name (``mil.models``)."""
    classes = {"abmil": GatedAttentionMIL, "mean": MeanPoolLinear}
    if name not in classes:
        raise ValueError(f"unknown MIL model {name!r}; choose from {sorted(classes)}")
    return classes[name](dim, n_classes, hidden_dim=hidden_dim, dropout=dropout)
