"""Augmentation on the device, with random numbers from a seeded CPU generator.

Histology has no orientation, so the 8 flips/90° rotations are free extra data; the colour jitter is mild
(stain colour, brightness, contrast, saturation). Random numbers come from a CPU generator so that a run's
augmentations do not depend on the device or on the number of DataLoader workers.
"""

from __future__ import annotations

import torch

_LUMA = (0.299, 0.587, 0.114)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 or float NHWC (0-255) → float NHWC: random dihedral transform + mild colour jitter per image."""
    n = images.shape[0]
    device = images.device
    x = images.float()
    rotation = torch.randint(0, 4, (n,), generator=generator)
    flip = torch.randint(0, 2, (n,), generator=generator)
    out = torch.empty_like(x)
    for k in range(4):
        for f in (0, 1):
            index = torch.nonzero((rotation == k) & (flip == f)).flatten()
            if index.numel() == 0:
                continue
            index = index.to(device)
            part = x.index_select(0, index)
            if f:
                part = part.flip(2)
            if k:
                part = torch.rot90(part, k, dims=(1, 2))
            out.index_copy_(0, index, part)

    def uniform(shape: tuple[int, ...], amount: float) -> torch.Tensor:
        return (1 + amount * (2 * torch.rand(shape, generator=generator) - 1)).to(device)

    out = out * uniform((n, 1, 1, 3), 0.05) * uniform((n, 1, 1, 1), 0.1)  # stain colour, brightness
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * uniform((n, 1, 1, 1), 0.1) + mean  # contrast
    gray = (out * torch.tensor(_LUMA, device=device)).sum(-1, keepdim=True)
    out = gray + (out - gray) * uniform((n, 1, 1, 1), 0.15)  # saturation
    return out.clamp_(0, 255)
