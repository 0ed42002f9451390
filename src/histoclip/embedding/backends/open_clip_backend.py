"""The ``open_clip`` backend (the default): every model open_clip itself can build and load.

A model entry names an open_clip model in one of the ways open_clip understands, plus optional overrides:

- a built-in architecture (``ViT-B-16``) with ``pretrained`` = a tag (``openai``, from the local cache) or a
  checkpoint file (``.safetensors``, or a ``.pt``/``.bin`` loaded with ``weights_only``);
- ``hf-hub:org/repo`` (QuiltNet, BiomedCLIP): read from the Hugging Face cache, offline by default;
- ``local-dir:/path``: ``open_clip_config.json`` + weights (what ``train_clip`` writes);
- a JSON model config file (``config/models/*.json``), with or without ``pretrained``; without weights the
  model is randomly initialised from ``seed`` — only meant for tests and benchmarks, and recorded as such.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histoclip.embedding.backends import Finding
from histoclip.embedding.backends.checkpoints import (
    WEIGHT_SUFFIXES,
    mismatch_error,
    read_checkpoint_shapes,
    shape_differences,
    unsafe_checkpoint_error,
)
from histoclip.errors import InputError
from histoclip.store import sha256_file

if TYPE_CHECKING:
    import torch

    from histoclip.embedding.models import LoadedModel, ModelSpec

__all__ = [
    "BACKEND",
    "architecture_shapes",
    "fit_problems",
    "hub_weights_file",
    "local_weights",
    "register_json_config",
]

#: Where train_clip writes the models it trains (a rule output: it may not exist yet when the run is planned).
TRAINED_PREFIX = "local-dir:results/models/"


def missing_weights(spec: ModelSpec, detail: str, key: str = "") -> InputError:
    """``key``: the entry's key at fault (``pretrained`` for a missing checkpoint file), named in ``where``."""
    return InputError(
        f"weights for model {spec.name!r} ({spec.model}"
        + (f", pretrained={spec.pretrained}" if spec.pretrained else "")
        + f") are not available offline: {detail}",
        where=f"config models.{spec.name}{'.' + key if key else ''}",
        fix=(
            "supply the weights locally: set `pretrained` to a checkpoint file (.safetensors or .pt), or `model` to "
            "local-dir:/path (open_clip_config.json + open_clip_model.safetensors), or put the hub files in the "
            "Hugging Face cache (HF_HOME, e.g. `huggingface-cli download ORG/REPO` on a machine with internet); "
            "or set allow_download: true for this model where downloads are allowed"
        ),
    )


def register_json_config(path: Path, spec: ModelSpec) -> str:
    """Register a JSON model config with open_clip under a name unique to its content; return the name."""
    import open_clip

    if not path.is_file():
        raise InputError(
            f"model config file {str(path)!r} does not exist",
            where=f"config models.{spec.name}.model",
            fix="give the path of an open_clip model config JSON (see config/models/)",
        )
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc})", where=f"config models.{spec.name}.model") from exc
    cfg = cfg.get("model_cfg", cfg)
    if not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
        raise InputError(
            f"{path} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)",
            where=f"config models.{spec.name}.model",
            fix="use the format of open_clip's model_configs/*.json",
        )
    name = f"histoclip-{path.stem}-{hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]}"
    if name not in open_clip.list_models():
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="histoclip-model-config-"))
        (folder / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(folder / f"{name}.json")
    return name


def hub_weights_file(spec: ModelSpec) -> str:
    """The cached weights file of an hf-hub model (for its sha256); raises :class:`InputError` when it is not in
    the Hugging Face cache. Call it under :func:`~histoclip.embedding.models.hub_offline` to keep it from
    downloading."""
    try:
        from open_clip.pretrained import download_pretrained_from_hf

        found = download_pretrained_from_hf(spec.model[len("hf-hub:") :])
    except Exception:  # not cached (offline), or no hub client: either way not available
        found = None
    if not found:
        raise missing_weights(spec, "not in the Hugging Face cache")
    return found


def local_weights(spec: ModelSpec) -> tuple[str, str | None]:
    """(the name open_clip builds the model by, the local weights file or None) of ``spec``, as the run loads
    it: a JSON model config is registered, a ``local-dir:`` folder must hold ``open_clip_config.json`` and a
    weights file (safetensors first), a ``pretrained`` checkpoint file must exist. Raises :class:`InputError`
    saying what is missing. hf-hub weights: :func:`hub_weights_file`."""
    model_name, pretrained = spec.model, spec.pretrained
    if model_name.endswith(".json"):
        model_name = register_json_config(Path(model_name), spec)
    if model_name.startswith("local-dir:"):
        folder = Path(model_name[len("local-dir:") :])
        if not (folder / "open_clip_config.json").is_file():
            raise missing_weights(spec, f"{folder}/open_clip_config.json does not exist")
        candidates = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        if not candidates:
            raise missing_weights(spec, f"no weights file ({', '.join(WEIGHT_SUFFIXES)}) in {folder}")
        return model_name, str(next((p for p in candidates if p.suffix == ".safetensors"), candidates[0]))
    if pretrained and Path(pretrained).suffix in WEIGHT_SUFFIXES:
        if not Path(pretrained).is_file():
            raise missing_weights(spec, f"checkpoint {pretrained} does not exist", key="pretrained")
        return model_name, pretrained
    return model_name, None


def embedding_dim(model: torch.nn.Module, image_size: int, device: torch.device) -> int:
    """Width of the projected image embedding (what is stored), asking the model if it doesn't say."""
    import torch

    dim = getattr(model.visual, "output_dim", None)
    if dim:
        return int(dim)
    with torch.inference_mode():
        return int(model.encode_image(torch.zeros(1, 3, image_size, image_size, device=device)).shape[-1])


def _create(spec: ModelSpec, model_name: str, weights_file: str | None, device: torch.device) -> torch.nn.Module:
    """open_clip's model with its weights (strict; ``weights_only``), errors said in the user's terms."""
    import open_clip

    force_preprocess = {}
    if spec.mean:
        force_preprocess["mean"] = spec.mean
    if spec.std:
        force_preprocess["std"] = spec.std
    try:
        return open_clip.create_model(
            model_name,
            pretrained=spec.pretrained,
            device=device,
            force_image_size=spec.image_size,
            force_preprocess_cfg=force_preprocess or None,
            pretrained_text=False,
            weights_only=True,
        )
    except pickle.UnpicklingError as exc:
        raise unsafe_checkpoint_error(spec, weights_file or spec.pretrained, exc) from exc
    except RuntimeError as exc:
        text = str(exc)
        if "size mismatch" in text or "Missing key" in text or "Unexpected key" in text:
            first = "; ".join(line.strip() for line in text.splitlines()[:4])
            raise mismatch_error(spec, str(weights_file or spec.pretrained), [first]) from exc
        if "download" in text.lower() or "not found" in text.lower() or "offline" in text.lower():
            raise missing_weights(spec, text.splitlines()[0]) from exc
        raise


class OpenClipBackend:
    name = "open_clip"
    default_model = None

    def has_text(self, entry: Mapping[str, Any]) -> bool:
        return True

    def files(self, entry: Mapping[str, Any]) -> list[str]:
        model, pretrained = str(entry["model"]), entry.get("pretrained")
        if model.startswith(TRAINED_PREFIX):
            return [f"{model[len('local-dir:') :]}/open_clip_model.safetensors"]
        files = [model] if model.endswith(".json") and Path(model).exists() else []
        if pretrained and Path(pretrained).exists():
            files.append(pretrained)
        return files

    def load(self, spec: ModelSpec, device: torch.device) -> LoadedModel:
        import open_clip
        import torch

        from histoclip.embedding.models import LoadedModel, hub_offline, sha256_state_dict

        model_name, weights_file = local_weights(spec)
        with hub_offline(not spec.allow_download):
            if model_name.startswith("hf-hub:"):
                weights_file = hub_weights_file(spec)
            if weights_file is None and not spec.pretrained:
                torch.manual_seed(spec.seed)
            model = _create(spec, model_name, weights_file, device)
            tokenizer = open_clip.get_tokenizer(model_name)
        model.eval()
        preprocess = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = preprocess.get("size", model.visual.image_size)
        size = size[0] if isinstance(size, list | tuple) else size
        if weights_file:
            weights, digest = weights_file, sha256_file(weights_file)
        elif spec.pretrained:
            weights, digest = f"tag:{spec.pretrained}", sha256_state_dict(model)
        else:
            weights, digest = f"random-init(seed={spec.seed})", sha256_state_dict(model)

        def encode_texts(texts: list[str]) -> torch.Tensor:
            return model.encode_text(tokenizer(texts).to(device))

        return LoadedModel(
            spec=spec,
            model=model,
            tokenizer=tokenizer,
            device=device,
            architecture=model_name if not model_name.startswith("histoclip-") else Path(spec.model).stem,
            dim=embedding_dim(model, size, device),
            image_size=int(size),
            mean=tuple(float(v) for v in preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            std=tuple(float(v) for v in preprocess.get("std", open_clip.OPENAI_DATASET_STD)),
            interpolation=str(preprocess.get("interpolation", "bicubic")),
            weights=weights,
            weights_sha256=digest,
            image_features=model.encode_image,
            text_features=encode_texts,
            logit_scale_of=lambda: float(model.logit_scale.exp().item()),
        )

    def check(self, spec: ModelSpec) -> list[Finding]:
        """Weights present (offline) and fitting the architecture; nothing is loaded onto any device."""
        from histoclip.embedding.models import hub_offline

        model_name, weights = local_weights(spec)  # what the run loads, or the InputError it would raise
        if spec.model.startswith("local-dir:"):
            model_config = Path(spec.model[len("local-dir:") :]) / "open_clip_config.json"
            return _check_weights_fit(spec, register_json_config(model_config, spec), Path(weights))
        if spec.model.startswith("hf-hub:"):
            with hub_offline(True):
                hub_weights_file(spec)
            return []
        if weights is not None:
            return _check_weights_fit(spec, model_name, Path(weights))
        if spec.pretrained:
            return _check_pretrained_tag(spec, model_name, spec.pretrained)
        if spec.model.endswith(".json"):
            return [
                (
                    "warning",
                    InputError(
                        f"no weights: {spec.model} is randomly initialised (seed {spec.seed}), meant for tests only",
                        where=f"config models.{spec.name}",
                        fix="set `pretrained` to a checkpoint, or use a trained model",
                    ),
                )
            ]
        return [
            (
                "error",
                InputError(
                    f"{spec.model} has no `pretrained` weights: it would be randomly initialised",
                    where=f"config models.{spec.name}",
                    fix="set `pretrained` to a tag or checkpoint file",
                ),
            )
        ]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """open_clip warns on the root logger about random init when it builds the architecture for the check."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def architecture_shapes(model_name: str, image_size: int | None = None) -> tuple[dict[str, tuple[int, ...]], bool]:
    """Parameter names and shapes of an open_clip architecture, built on the ``meta`` device (no memory, no
    weights), and whether it has a custom text tower (whose checkpoints open_clip renames)."""
    import open_clip
    import torch

    with _quiet(), torch.device("meta"):
        model = open_clip.create_model(
            model_name, pretrained=None, device="meta", force_image_size=image_size, weights_only=True
        )
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, not hasattr(model, "positional_embedding")


def _ignored(key: str) -> bool:
    """Keys open_clip derives or resizes itself on load: positional embeddings (resized to the image size and
    context length), logit_bias (SigLIP only), a text position_ids buffer."""
    return key.endswith("positional_embedding") or key in ("logit_bias", "text.transformer.embeddings.position_ids")


def fit_problems(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Differences between an open_clip architecture and a checkpoint that open_clip's strict load would refuse
    (positional embeddings are left out: open_clip resizes them to the model's image size and context length)."""
    return shape_differences(expected, found, _ignored)


def _check_weights_fit(spec: ModelSpec, model_name: str, weights: Path) -> list[Finding]:
    """Read the checkpoint's names and shapes and compare them with the architecture's."""
    try:
        found = read_checkpoint_shapes(spec, weights)
    except InputError as exc:
        return [("error", exc)]
    if any(k.startswith("image_encoder.model.") for k in found):  # MobileCLIP: open_clip converts it on load
        return []
    try:
        expected, custom_text = architecture_shapes(model_name, spec.image_size)
    except Exception as exc:
        return [
            (
                "error",
                InputError(
                    f"open_clip cannot build architecture {model_name!r}: {exc}",
                    where=f"config models.{spec.name}",
                    fix="check `model` (see README)",
                ),
            )
        ]
    if custom_text and "positional_embedding" in found:
        from open_clip.model import convert_to_custom_text_state_dict

        found = convert_to_custom_text_state_dict(dict(found))
    differences = fit_problems(expected, found)
    return [("error", mismatch_error(spec, str(weights), differences))] if differences else []


_SUPPLY = (
    "supply the weights locally: `pretrained` = a checkpoint file (.safetensors or .pt), or `model` = "
    "local-dir:/path (open_clip_config.json + open_clip_model.safetensors), or the hub files in the Hugging Face "
    "cache (HF_HOME; `huggingface-cli download ORG/REPO` where there is internet)"
)


def _check_pretrained_tag(spec: ModelSpec, model_name: str, tag: str) -> list[Finding]:
    """A built-in pretrained tag (e.g. ``openai``): is its file in the local cache?"""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    def problem(text: str, fix: str, key: str = "") -> list[Finding]:
        return [("error", InputError(text, where=f"config models.{spec.name}{'.' + key if key else ''}", fix=fix))]

    if model_name not in open_clip.list_models():
        return problem(f"{model_name!r} is not an open_clip architecture", "check `model`", key="model")
    cfg = get_pretrained_cfg(model_name, tag)
    if not cfg:
        tags = [t for m, t in open_clip.list_pretrained() if m == model_name]
        return problem(f"no pretrained tag {tag!r} for {model_name} (has {tags})", _SUPPLY, key="pretrained")
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        parts = hub.strip("/").split("/")
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or "open_clip_pytorch_model.bin"
        for candidate in (filename, "open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(repo, candidate), str):
                return []
        return problem(f"pretrained {tag!r} ({hub}) is not in the Hugging Face cache", _SUPPLY)
    url = cfg.get("url", "")
    cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url) if url else None
    if cached is None or not cached.exists():
        return problem(f"pretrained {tag!r} ({url or 'no url'}) is not in the local cache", _SUPPLY)
    return []


BACKEND = OpenClipBackend()
