"""Tiny random-init models of each backend's architecture, for benchmarks/bench_backends.py.

Each builder writes the files a real model's hub repository ships into ``folder`` (with the builders the backend
tests use: tests/tiny_models.py) and returns a :class:`TinyModel`: the histoclip config entry that loads them, and
the reference package's own module holding the same weights with its image forward (the call the backend's
``image_features`` makes).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from tiny_models import conch_tiny_config, hf_clip_folder, timm_hub_folder  # noqa: E402


@dataclass
class TinyModel:
    backend: str
    #: the config ``models`` entry (for ``ModelSpec.from_config``)
    entry: dict[str, Any]
    #: the reference package's module, eval mode, same weights as the files
    reference: torch.nn.Module
    #: preprocessed float images [B, 3, S, S] → image features, as the reference package computes them
    forward: Callable[[torch.Tensor], torch.Tensor]


def tiny_open_clip(folder: Path, config: Path = REPO / "config/models/tiny-vit.json") -> TinyModel:
    """open_clip's model of a JSON config (the shipped tiny ViT), its state dict saved as a checkpoint."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    reference = open_clip.create_model(config.stem, pretrained=None).eval()
    weights = folder / "open_clip_model.pt"
    torch.save(reference.state_dict(), weights)
    entry = {"backend": "open_clip", "model": str(config), "pretrained": str(weights)}
    return TinyModel("open_clip", entry, reference, reference.encode_image)


def tiny_conch(folder: Path) -> TinyModel:
    """The conch package's CoCa of the reduced config, saved as CONCH's hub repository ships it (a torch.save'd
    state dict, pytorch_model.bin) next to its config JSON."""
    from conch.open_clip_custom import coca_model

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "conch_tiny.json"
    config.write_text(json.dumps({**conch_tiny_config(), "custom_text": True}))
    torch.manual_seed(7)
    reference = coca_model.CoCa(**conch_tiny_config()).eval()
    weights = folder / "pytorch_model.bin"
    torch.save(reference.state_dict(), weights)

    def forward(images: torch.Tensor) -> torch.Tensor:
        return reference.encode_image(images, proj_contrast=True, normalize=False)

    entry = {"backend": "conch", "model": str(config), "pretrained": str(weights)}
    return TinyModel("conch", entry, reference, forward)


def tiny_hf_clip(folder: Path, image_size: int = 224) -> TinyModel:
    """A transformers CLIPModel folder as PLIP's hub repository ships it (weights, config, tokenizer files from
    open_clip's CLIP BPE, image processor), made by transformers itself, as tests/test_backend_hf_clip.py does."""
    from transformers import CLIPModel

    hf_clip_folder(folder, image_size)
    reference = CLIPModel.from_pretrained(folder).eval()

    def forward(images: torch.Tensor) -> torch.Tensor:
        output = reference.get_image_features(pixel_values=images)
        return output if isinstance(output, torch.Tensor) else output.pooler_output  # transformers 5: an output

    return TinyModel("hf-clip", {"backend": "hf-clip", "model": str(folder)}, reference, forward)


def tiny_timm(folder: Path, architecture: str = "vit_tiny_patch16_224") -> TinyModel:
    """A random-init timm model saved as its hub repository ships it (config.json + model.safetensors), as
    tests/test_backend_timm.py makes it; the reference is the timm module whose weights were saved (the parity with
    timm's own local-dir: load is the test's job; a benchmark loads nothing it doesn't have to)."""
    model = timm_hub_folder(folder, architecture)
    reference = model.eval()
    return TinyModel("timm", {"backend": "timm", "model": str(folder)}, reference, reference)


BUILDERS: dict[str, Callable[[Path], TinyModel]] = {
    "open_clip": tiny_open_clip,
    "conch": tiny_conch,
    "hf-clip": tiny_hf_clip,
    "timm": tiny_timm,
}
