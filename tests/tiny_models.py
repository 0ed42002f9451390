"""Tiny random-init models of each backend's architecture, written offline in the layout their hub repositories
ship (by the reference package itself), for the backend tests and benchmarks/bench_backends.py.

The reference packages are imported inside each builder: a test module that needs one skips on its absence itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

#: The smallest open_clip config the embedding tests load (random init, 64-px input): one layer, width 32.
TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

#: H-optimus-0's normalisation (its own, not ImageNet's): the tiny timm model ships it to show it is used.
H_OPTIMUS_MEAN = [0.707223, 0.578729, 0.703617]
H_OPTIMUS_STD = [0.211883, 0.230117, 0.177517]


def conch_tiny_config() -> dict:
    """CONCH's own conch_ViT-B-16 config with every width, depth and query count shrunk (vocabulary and 128-token
    context kept: the tokenizer needs them; 448 px input kept: the released model's)."""
    from conch.open_clip_custom.factory import CFG_DIR

    cfg = json.loads((CFG_DIR / "conch_ViT-B-16.json").read_text())
    cfg.pop("custom_text")
    cfg.update(embed_dim=32, embed_dim_caption=32)
    cfg["vision_cfg"].update(layers=1, width=32, num_heads=2, n_queries_caption=4)
    cfg["text_cfg"].update(width=32, heads=2, layers=1)
    cfg["multimodal_cfg"].update(width=32, heads=2, layers=1)
    return cfg


def hf_clip_folder(folder: Path, image_size: int) -> Path:
    """A transformers CLIPModel folder as PLIP's hub repository ships it (weights, config, tokenizer files from
    open_clip's CLIP BPE as /work/shared/RECIPES.md describes, image processor)."""
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
    return folder


def timm_layers(args: dict) -> dict:
    """What a model card passes in code for the JSON-able names a histoclip entry uses."""
    import timm

    out = dict(args)
    if out.get("mlp_layer") == "SwiGLUPacked":
        out["mlp_layer"] = timm.layers.SwiGLUPacked
    return out


def timm_hub_folder(
    folder: Path, architecture: str = "vit_tiny_patch16_224", model_args: dict | None = None, seed: int = 0
) -> torch.nn.Module:
    """A random-init timm model saved as its hub repository ships it (config.json + model.safetensors) into
    ``folder``; returns the module holding those weights."""
    import timm
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = timm.create_model(architecture, pretrained=False, num_classes=0, **timm_layers(model_args or {}))
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    config = {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": model.num_features,
        "model_args": {"num_classes": 0, **(model_args or {})},
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
    return model
