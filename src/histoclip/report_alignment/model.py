"""The alignment model: gated attention pooling of a slide's tiles and residual projections of the CLIP space.

Why this shape: the tile and text embeddings already share the CLIP image–text space, so the model starts
*at* it: the attention's output layer is zero (every tile weighs the same: mean pooling) and each projection
is the identity plus a learnt correction that starts at zero and that weight decay pulls back towards zero.
Each side is also centred on its training cohort (offsets that start at minus the mean embedding). Untrained,
it is the centred CLIP space with mean pooling (the ``untrained`` baseline of the retrieval table); training
moves it only as far as the reports ask, which matters when a cohort has tens, not thousands, of training slides.
Attention is gated (Ilse et al. 2018): ``a_i ∝ exp(wᵀ(tanh(V h_i) ⊙ σ(U h_i)))``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SlideReportAligner"]


class SlideReportAligner(nn.Module):
    def __init__(self, dim: int, attention_hidden: int, logit_scale: float = 10.0) -> None:
        super().__init__()
        self.dim = dim
        self.attention_v = nn.Linear(dim, attention_hidden)
        self.attention_u = nn.Linear(dim, attention_hidden)
        self.attention_w = nn.Linear(attention_hidden, 1)
        nn.init.zeros_(self.attention_w.weight)
        nn.init.zeros_(self.attention_w.bias)
        self.image_delta = nn.Linear(dim, dim, bias=False)
        self.text_delta = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.image_delta.weight)
        nn.init.zeros_(self.text_delta.weight)
        # Offsets that centre each side on its training cohort (set by :meth:`centre`): the cosine of two
        # uncentred CLIP embeddings is dominated by what every slide and every report share (the modality gap),
        # not by what tells one slide from another.
        self.image_offset = nn.Parameter(torch.zeros(dim))
        self.text_offset = nn.Parameter(torch.zeros(dim))
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale)))

    @property
    def logit_scale(self) -> torch.Tensor:
        """The exponentiated contrastive temperature (as open_clip's ``logit_scale.exp()``), capped at 100."""
        return self.log_logit_scale.exp().clamp(max=100.0)

    @torch.no_grad()
    def centre(self, slide_means: torch.Tensor, reports: torch.Tensor) -> None:
        """Start the offsets at minus the mean of the training slides' (mean-pooled) and reports' embeddings."""
        self.image_offset.copy_(-slide_means.mean(dim=0))
        self.text_offset.copy_(-reports.mean(dim=0))

    def attention(self, bag: torch.Tensor) -> torch.Tensor:
        """Attention weights ``[N]`` (summing to 1) of a bag of tile embeddings ``[N, D]``."""
        gate = torch.tanh(self.attention_v(bag)) * torch.sigmoid(self.attention_u(bag))
        return torch.softmax(self.attention_w(gate).squeeze(-1), dim=0)

    def slide(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(unit-norm slide vector ``[D]`` in the aligned space, attention weights ``[N]``)."""
        weights = self.attention(bag)
        pooled = weights @ bag
        return _unit(pooled + self.image_delta(pooled) + self.image_offset), weights

    def text(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Unit-norm text vectors ``[R, D]`` in the aligned space from the text tower's ``[R, D]``."""
        return _unit(embeddings + self.text_delta(embeddings) + self.text_offset)


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
