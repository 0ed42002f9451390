"""Model checks: weights on disk (or in the Hugging Face cache) and fitting the architecture, nothing loaded.

Where the weights are and what is missing is decided by :mod:`histoclip.embedding.models`, as for the run
(:func:`~histoclip.embedding.models.local_weights`, :func:`~histoclip.embedding.models.hub_weights_file`); what is
added here is the cheap part: the checkpoint's tensor names and shapes from its header, compared with the
architecture built on PyTorch's ``meta`` device.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from histoclip.errors import InputError
from histoclip.preflight.problems import Problem, problems_from


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """open_clip warns on the root logger about random init when it builds the architecture for the check."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a checkpoint, without loading its values where the format allows.

    safetensors: the header only. ``.pt``/``.bin``: ``torch.load(weights_only=True, mmap=True)``, which refuses
    any pickled object that is not a tensor or a container of tensors (:class:`pickle.UnpicklingError`).
    open_clip's unwrapping is mirrored: a ``state_dict`` entry, a ``module.`` prefix.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip checkpoint (legacy format): no mmap, still weights_only
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"holds a {type(checkpoint).__name__}, not a state dict")
    shapes = {str(k): tuple(v.shape) for k, v in checkpoint.items() if hasattr(v, "shape")}
    if shapes and next(iter(shapes)).startswith("module"):
        shapes = {k[7:]: v for k, v in shapes.items()}
    return shapes


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


def fit_problems(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Differences between an architecture and a checkpoint that open_clip's strict load would refuse.

    Positional embeddings are left out: open_clip resizes them to the model's image size and context length.
    """
    ignored_missing = {"logit_bias"}
    ignored_unexpected = {"text.transformer.embeddings.position_ids"}
    missing = [k for k in expected if k not in found and k not in ignored_missing]
    unexpected = [k for k in found if k not in expected and k not in ignored_unexpected]
    shapes = [
        f"{k}: {list(found[k])} in the file, {list(expected[k])} in the model"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k]) and not k.endswith("positional_embedding")
    ]
    out = []
    if missing:
        out.append(f"{len(missing)} tensor(s) missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        out.append(f"{len(unexpected)} unexpected tensor(s) (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        out.append(f"{len(shapes)} shape mismatch(es) (e.g. {'; '.join(shapes[:3])})")
    return out


def _model_problem(name: str, problem: str, fix: str, severity: str = "error", key: str = "") -> Problem:
    return Problem(severity, "model", f"config models.{name}{'.' + key if key else ''}", problem, fix)


def _check_weights_fit(spec: Any, model_name: str, weights: Path) -> list[Problem]:
    """Read the checkpoint's names and shapes and compare them with the architecture's."""
    import pickle

    from histoclip.embedding.models import unsafe_checkpoint_error

    try:
        found = checkpoint_shapes(weights)
    except pickle.UnpicklingError as exc:
        return problems_from(unsafe_checkpoint_error(spec, str(weights), exc), "model")
    except Exception as exc:  # damaged, empty, or not a checkpoint at all
        return [
            _model_problem(
                spec.name,
                f"the weights file {weights} cannot be read as a checkpoint: {exc}",
                "copy the file again (it may be truncated) or point the model at the right file",
            )
        ]
    if any(k.startswith("image_encoder.model.") for k in found):  # MobileCLIP: open_clip converts it on load
        return []
    try:
        expected, custom_text = architecture_shapes(model_name, spec.image_size)
    except Exception as exc:
        return [
            _model_problem(
                spec.name, f"open_clip cannot build architecture {model_name!r}: {exc}", "check `model` (see README)"
            )
        ]
    if custom_text and "positional_embedding" in found:
        from open_clip.model import convert_to_custom_text_state_dict

        found = convert_to_custom_text_state_dict(dict(found))
    differences = fit_problems(expected, found)
    if not differences:
        return []
    return [
        _model_problem(
            spec.name,
            f"the weights {weights} do not fit the architecture of model {spec.name!r} ({spec.model}): "
            + "; ".join(differences),
            "pair the checkpoint with the model config it was trained with",
        )
    ]


def check_model(
    name: str, entry: Mapping[str, Any], config: Mapping[str, Any], search_dirs: Sequence[str | Path] = (".",)
) -> list[Problem]:
    """Weights present (offline) and fitting the architecture; nothing is loaded onto any device."""
    from histoclip.embedding.models import (
        ModelSpec,
        hub_offline,
        hub_weights_file,
        local_weights,
        register_json_config,
    )

    spec = ModelSpec.from_config(name, entry, search_dirs)
    raw = str(entry["model"])
    trained = {f"local-dir:results/models/{t}" for t in config.get("training", {})}
    if raw in trained:
        folder = Path(spec.model[len("local-dir:") :])
        if not (folder / "open_clip_model.safetensors").exists():
            return check_training(raw[len("local-dir:results/models/") :], config, search_dirs)
    try:
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
        pretrained = spec.pretrained
        if pretrained:
            return _check_pretrained_tag(name, model_name, pretrained)
        if spec.model.endswith(".json"):
            return [
                _model_problem(
                    name,
                    f"no weights: {spec.model} is randomly initialised (seed {spec.seed}), meant for tests only",
                    "set `pretrained` to a checkpoint, or use a trained model",
                    severity="warning",
                )
            ]
        return [
            _model_problem(
                name,
                f"{spec.model} has no `pretrained` weights: it would be randomly initialised",
                "set `pretrained` to a tag or checkpoint file",
            )
        ]
    except InputError as exc:
        return problems_from(exc, "model")


_SUPPLY = (
    "supply the weights locally: `pretrained` = a checkpoint file (.safetensors or .pt), or `model` = "
    "local-dir:/path (open_clip_config.json + open_clip_model.safetensors), or the hub files in the Hugging Face "
    "cache (HF_HOME; `huggingface-cli download ORG/REPO` where there is internet)"
)


def _check_pretrained_tag(name: str, model_name: str, tag: str) -> list[Problem]:
    """A built-in pretrained tag (e.g. ``openai``): is its file in the local cache?"""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    if model_name not in open_clip.list_models():
        return [_model_problem(name, f"{model_name!r} is not an open_clip architecture", "check `model`", key="model")]
    cfg = get_pretrained_cfg(model_name, tag)
    if not cfg:
        tags = [t for m, t in open_clip.list_pretrained() if m == model_name]
        return [
            _model_problem(name, f"no pretrained tag {tag!r} for {model_name} (has {tags})", _SUPPLY, key="pretrained")
        ]
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        parts = hub.strip("/").split("/")
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or "open_clip_pytorch_model.bin"
        for candidate in (filename, "open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(repo, candidate), str):
                return []
        return [_model_problem(name, f"pretrained {tag!r} ({hub}) is not in the Hugging Face cache", _SUPPLY)]
    url = cfg.get("url", "")
    cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url) if url else None
    if cached is None or not cached.exists():
        return [_model_problem(name, f"pretrained {tag!r} ({url or 'no url'}) is not in the local cache", _SUPPLY)]
    return []


def check_training(trained: str, config: Mapping[str, Any], search_dirs: Sequence[str | Path]) -> list[Problem]:
    """A model the workflow trains itself (``training.<name>``): its base and pairs must be there or be made."""
    entry = config["training"][trained]
    problems = []
    base = str(entry["base"])
    base_file = Path(base).is_file() or any((Path(folder) / base).is_file() for folder in search_dirs)
    if base not in config.get("models", {}) and not base_file:
        problems.append(
            Problem(
                "error",
                "model",
                f"config training.{trained}.base",
                f"base {base!r} is neither a name under `models` nor an existing JSON model config",
                "give a `models` name (fine-tuning) or the path of an open_clip model config JSON",
            )
        )
    pairs = str(entry["pairs"])
    if not Path(pairs).exists() and not pairs.startswith("results/"):
        problems.append(
            Problem(
                "error",
                "model",
                f"config training.{trained}.pairs",
                f"pair table {pairs} does not exist",
                "give the TSV of image–caption pairs (see README, Training a CLIP)",
            )
        )
    return problems
