"""Tiny random-init models of each backend's architecture, saved offline in their hub layout (for benchmarks).

Each builder writes the files a real model's hub repository ships (made by the reference package itself, as
tests/test_backend_*.py make them) into ``folder`` and returns a :class:`TinyModel`: the histoclip config entry
that loads them, and the reference package's own module holding the same weights with its image forward (the
call the backend's ``image_features`` makes).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]

#: H-optimus-0's normalisation (its own, not ImageNet's), as tests/test_backend_timm.py ships it.
H_OPTIMUS_MEAN = [0.707223, 0.578729, 0.703617]
H_OPTIMUS_STD = [0.211883, 0.230117, 0.177517]


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


def conch_tiny_config() -> dict:
    """CONCH's own conch_ViT-B-16 config with every width, depth and query count shrunk (vocabulary, 128-token
    context and 448 px input kept), as tests/test_backend_conch.py reduces it."""
    from conch.open_clip_custom.factory import CFG_DIR

    cfg = json.loads((CFG_DIR / "conch_ViT-B-16.json").read_text())
    cfg.pop("custom_text")
    cfg.update(embed_dim=32, embed_dim_caption=32)
    cfg["vision_cfg"].update(layers=1, width=32, num_heads=2, n_queries_caption=4)
    cfg["text_cfg"].update(width=32, heads=2, layers=1)
    cfg["multimodal_cfg"].update(width=32, heads=2, layers=1)
    return cfg


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
    import open_clip
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**small, "max_position_embeddings": 77, "vocab_size": 49408},
        vision_config={**small, "image_size": image_size, "patch_size": 16},
        projection_dim=24,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    bpe = open_clip.tokenizer.SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(token, token): index for token, index in bpe.encoder.items()}
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n")
    CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77).save_pretrained(folder)
    size = {"shortest_edge": image_size}
    CLIPImageProcessor(size=size, crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)

    reference = CLIPModel.from_pretrained(folder).eval()

    def forward(images: torch.Tensor) -> torch.Tensor:
        output = reference.get_image_features(pixel_values=images)
        return output if isinstance(output, torch.Tensor) else output.pooler_output  # transformers 5: an output

    return TinyModel("hf-clip", {"backend": "hf-clip", "model": str(folder)}, reference, forward)


def tiny_timm(folder: Path, architecture: str = "vit_tiny_patch16_224") -> TinyModel:
    """A random-init timm model saved as its hub repository ships it (config.json + model.safetensors), as
    tests/test_backend_timm.py makes it; the reference is the timm module whose weights were saved (the parity with
    timm's own local-dir: load is the test's job; a benchmark loads nothing it doesn't have to)."""
    import timm
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = timm.create_model(architecture, pretrained=False, num_classes=0)
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    config = {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": model.num_features,
        "model_args": {"num_classes": 0},
        "pretrained_cfg": {
            "input_size": [3, 224, 224],
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "mean": H_OPTIMUS_MEAN,
            "std": H_OPTIMUS_STD,
            "num_classes": 0,
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    reference = model.eval()
    return TinyModel("timm", {"backend": "timm", "model": str(folder)}, reference, reference)


BUILDERS: dict[str, Callable[[Path], TinyModel]] = {
    "open_clip": tiny_open_clip,
    "conch": tiny_conch,
    "hf-clip": tiny_hf_clip,
    "timm": tiny_timm,
}
