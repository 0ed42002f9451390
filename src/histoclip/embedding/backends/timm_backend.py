"""The ``timm`` backend: image-only encoders as their hub repositories ship them (UNI, UNI2-h, Virchow2,
H-optimus-0/1, Prov-GigaPath).

A model entry names the model's folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``) or
``hf-hub:org/repo`` in the Hugging Face cache (read offline unless ``allow_download``). The folder's
``config.json`` gives the timm ``architecture``, its ``model_args`` and its ``pretrained_cfg`` (input size,
mean/std, interpolation); the entry's ``model_args`` add what the config file cannot say and the model card passes
in code (UNI: ``init_values``; Virchow2 and UNI2-h: ``mlp_layer: SwiGLUPacked``, ``act_layer: silu``), layers by
name from a fixed table, so a config never imports code.

The model is built with ``timm.create_model(architecture, pretrained=False, num_classes=0, **model_args)`` and its
weights are loaded here (:mod:`~histoclip.embedding.backends.checkpoints`: safetensors or ``weights_only``, strict),
not through timm's hub loader, which would download, and which accepts whatever a pickle holds.

Pooling — how one tile embedding is read from the tokens — is what the model cards prescribe and differs between
models, so it is a named choice (:data:`POOLINGS`), recorded in every embedding file's provenance.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histoclip.embedding.backends import Finding
from histoclip.embedding.backends.checkpoints import (
    load_state_dict,
    load_strict,
    mismatch_error,
    read_checkpoint_shapes,
    shape_differences,
)
from histoclip.errors import InputError
from histoclip.store import sha256_file

if TYPE_CHECKING:
    import torch

    from histoclip.embedding.models import LoadedModel, ModelSpec

__all__ = ["BACKEND", "POOLINGS", "TimmConfig", "build_kwargs", "pool_tokens", "pooling_of", "read_config"]

#: Pooling choices (a model entry's ``pooling``) → what the stored embedding is.
POOLINGS: dict[str, str] = {
    "cls": "class token",
    "mean": "mean of the patch tokens (class and register tokens excluded)",
    "cls+mean": "class token concatenated with the mean of the patch tokens (register tokens excluded)",
    "head": "timm's own head as the folder configures it (forward_head, pre-logits)",
}

#: timm's ``global_pool`` (the folder's model_args) → the pooling used when the entry names none. Virchow and
#: Virchow2 ship ``global_pool: ""`` (all tokens out) because their card pools by hand: class token + patch mean.
DEFAULT_POOLING = {"token": "cls", "avg": "mean", "": "cls+mean"}

#: Layer classes a config may name in ``model_args`` (what model cards pass as Python objects), from timm.layers.
MLP_LAYERS = ("Mlp", "GluMlp", "SwiGLU", "SwiGLUPacked")

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_SUPPLY = (
    "put the model's hub folder (config.json and model.safetensors or pytorch_model.bin) where `model` points, or "
    "the hub files in the Hugging Face cache (HF_HOME; `huggingface-cli download ORG/REPO` where there is internet)"
)


@dataclass(frozen=True)
class TimmConfig:
    """A timm hub ``config.json``: the architecture, its constructor arguments and its preprocessing."""

    architecture: str
    model_args: dict[str, Any]
    pretrained_cfg: dict[str, Any]


def _error(spec: ModelSpec, text: str, fix: str = _SUPPLY, key: str = "") -> InputError:
    return InputError(text, where=f"config models.{spec.name}{'.' + key if key else ''}", fix=fix)


def _hub_file(spec: ModelSpec, filename: str) -> Path | None:
    """A file of an ``hf-hub:`` model from the Hugging Face cache (downloaded only with ``allow_download``)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from histoclip.embedding.models import hub_offline

    repo = spec.model[len("hf-hub:") :]
    with hub_offline(not spec.allow_download):
        if spec.allow_download:
            try:
                return Path(hf_hub_download(repo, filename))
            except Exception:  # not in the repository, or no network: the caller says what is missing
                return None
        found = try_to_load_from_cache(repo, filename)
    return Path(found) if isinstance(found, str) else None


def locate(spec: ModelSpec) -> tuple[Path, Path]:
    """(config.json, weights file) of a model entry, or the :class:`InputError` saying which is missing.
    ``pretrained``, when given, names the weights file instead of the folder's."""
    if spec.model.startswith("hf-hub:"):
        config = _hub_file(spec, "config.json")
        weights = next((w for w in (_hub_file(spec, name) for name in WEIGHT_FILES) if w), None)
        where = f"the Hugging Face cache ({spec.model})"
    else:
        folder = Path(spec.model)
        if not folder.is_dir():
            raise _error(spec, f"model folder {folder} of model {spec.name!r} does not exist", key="model")
        config = folder / "config.json" if (folder / "config.json").is_file() else None
        weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
        where = str(folder)
    if spec.pretrained:
        weights = Path(spec.pretrained) if Path(spec.pretrained).is_file() else None
        if weights is None:
            raise _error(spec, f"weights file {spec.pretrained} does not exist", key="pretrained")
    if config is None:
        raise _error(spec, f"no config.json for model {spec.name!r} in {where}")
    if weights is None:
        raise _error(spec, f"no weights ({' or '.join(WEIGHT_FILES)}) for model {spec.name!r} in {where}")
    return config, weights


def read_config(path: Path, spec: ModelSpec) -> TimmConfig:
    """Parse a timm hub ``config.json`` as timm does, including the legacy single-dict form (UNI's), where the
    preprocessing keys sit at the top level."""
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _error(spec, f"{path} cannot be read as JSON ({exc})", fix="copy config.json again from the hub") from exc
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architecture"), str):
        raise _error(spec, f"{path} is not a timm model config (no `architecture`)", fix="use the hub's config.json")
    pretrained_cfg = cfg.get("pretrained_cfg")
    if not isinstance(pretrained_cfg, dict):  # legacy form: everything but the architecture is pretrained_cfg
        pretrained_cfg = {k: v for k, v in cfg.items() if k not in ("architecture", "model_args")}
    return TimmConfig(cfg["architecture"], dict(cfg.get("model_args") or {}), pretrained_cfg)


def _layer(spec: ModelSpec, key: str, value: Any) -> Any:
    """A layer named in model_args → the class timm expects (activations timm resolves by name itself)."""
    import timm.layers

    if key == "act_layer" and isinstance(value, str):
        return value.lower()  # timm's get_act_layer: silu, gelu, gelu_tanh, quick_gelu, ...
    if key == "mlp_layer" and isinstance(value, str):
        if value not in MLP_LAYERS:
            text = f"model_args.mlp_layer {value!r} is not one of {', '.join(MLP_LAYERS)}"
            raise _error(spec, text, fix="name a timm MLP layer from that list", key="model_args")
        return getattr(timm.layers, value)
    return value


def build_kwargs(spec: ModelSpec, cfg: TimmConfig) -> dict[str, Any]:
    """Constructor arguments: the folder's model_args, then the entry's (the model card's), no classifier."""
    merged = {**cfg.model_args, **dict(spec.model_args or {})}
    return {**{k: _layer(spec, k, v) for k, v in merged.items()}, "num_classes": 0}


def pooling_of(spec: ModelSpec, kwargs: Mapping[str, Any]) -> str:
    """The entry's ``pooling``, or the one the folder's ``global_pool`` implies (:data:`DEFAULT_POOLING`)."""
    if spec.pooling is not None:
        if spec.pooling not in POOLINGS:
            raise _error(spec, f"pooling {spec.pooling!r} is not one of {', '.join(POOLINGS)}", key="pooling")
        return spec.pooling
    return DEFAULT_POOLING.get(str(kwargs.get("global_pool", "token")), "head")


def create(spec: ModelSpec, cfg: TimmConfig, kwargs: Mapping[str, Any], meta: bool = False) -> torch.nn.Module:
    """The architecture without weights (on the ``meta`` device for the preflight: no memory, no init cost)."""
    import timm
    import torch

    if not timm.is_model(cfg.architecture):
        raise _error(
            spec,
            f"{cfg.architecture!r} (config.json of model {spec.name!r}) is not an architecture timm "
            f"{timm.__version__} knows",
            fix="check the folder's config.json, or update timm to a version that has this architecture",
        )
    try:
        if meta:
            with torch.device("meta"):
                return timm.create_model(cfg.architecture, pretrained=False, **kwargs)
        return timm.create_model(cfg.architecture, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        raise _error(
            spec,
            f"timm cannot build {cfg.architecture} with model_args {dict(kwargs)}: {exc}",
            fix="check model_args against the model card's timm_kwargs (README table)",
            key="model_args",
        ) from exc


def _check_tokens(spec: ModelSpec, model: torch.nn.Module, pooling: str) -> None:
    """Token poolings need a ViT-style model (a token sequence with prefix tokens); ``cls`` a class token."""
    if pooling == "head":
        return
    if not hasattr(model, "num_prefix_tokens"):
        raise _error(spec, f"pooling {pooling!r} needs a ViT-style model", fix="use pooling: head", key="pooling")
    if "cls" in pooling and getattr(model, "cls_token", None) is None:
        raise _error(spec, f"pooling {pooling!r} needs a class token; the model has none", key="pooling")


def pool_tokens(model: torch.nn.Module, tokens: torch.Tensor, pooling: str) -> torch.Tensor:
    """One embedding per image from ``forward_features`` output [B, N, D] (tokens: class, registers, patches).

    ``fc_norm`` is what timm applies after its own pooling (an identity for the token-pooled models here)."""
    import torch

    if pooling == "head":
        return model.forward_head(tokens, pre_logits=True)
    patches = tokens[:, model.num_prefix_tokens :].mean(dim=1)
    if pooling == "mean":
        return model.fc_norm(patches)
    cls = model.fc_norm(tokens[:, 0])
    return cls if pooling == "cls" else torch.cat([cls, model.fc_norm(patches)], dim=-1)


def embedding_width(model: torch.nn.Module, pooling: str) -> int:
    if pooling == "head":
        return int(getattr(model, "head_hidden_size", model.num_features))
    return int(model.num_features) * (2 if pooling == "cls+mean" else 1)


def _preprocessing(spec: ModelSpec, cfg: TimmConfig) -> tuple[int, tuple[float, ...], tuple[float, ...], str]:
    """(input size, mean, std, interpolation) from the folder's pretrained_cfg, the entry's overrides first;
    mean/std default to ImageNet's as timm's resolve_data_config does."""
    pre = cfg.pretrained_cfg
    size = spec.image_size or int((pre.get("input_size") or [3, 224, 224])[-1])
    mean = tuple(float(v) for v in (spec.mean or pre.get("mean") or IMAGENET_MEAN))
    std = tuple(float(v) for v in (spec.std or pre.get("std") or IMAGENET_STD))
    return int(size), mean, std, str(pre.get("interpolation") or "bicubic")


class TimmBackend:
    name = "timm"
    default_model = None

    def has_text(self, entry: Mapping[str, Any]) -> bool:
        return False

    def files(self, entry: Mapping[str, Any]) -> list[str]:
        """config.json and the weights of a folder entry (hf-hub entries live in the cache: none)."""
        model, pretrained = str(entry["model"]), entry.get("pretrained")
        if model.startswith("hf-hub:"):
            return [str(pretrained)] if pretrained and Path(pretrained).exists() else []
        folder = Path(model)
        files = [str(folder / "config.json")] if (folder / "config.json").exists() else []
        if pretrained:
            return files + ([str(pretrained)] if Path(pretrained).exists() else [])
        return files + [str(folder / name) for name in WEIGHT_FILES if (folder / name).exists()][:1]

    def check(self, spec: ModelSpec) -> list[Finding]:
        """Config readable, architecture known to timm and buildable with the entry's model_args, weights safe
        and fitting it tensor by tensor (from the header; nothing loaded), pooling possible."""
        try:
            config_path, weights = locate(spec)
            cfg = read_config(config_path, spec)
            kwargs = build_kwargs(spec, cfg)
            pooling = pooling_of(spec, kwargs)
            model = create(spec, cfg, kwargs, meta=True)
            _check_tokens(spec, model, pooling)
        except InputError as exc:
            return [("error", exc)]
        try:
            found = read_checkpoint_shapes(spec, weights)
        except InputError as exc:
            return [("error", exc)]
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        differences = shape_differences(expected, found)
        return [("error", _mismatch(spec, str(weights), differences))] if differences else []

    def load(self, spec: ModelSpec, device: torch.device) -> LoadedModel:
        from histoclip.embedding.models import LoadedModel

        config_path, weights = locate(spec)
        cfg = read_config(config_path, spec)
        kwargs = build_kwargs(spec, cfg)
        pooling = pooling_of(spec, kwargs)
        model = create(spec, cfg, kwargs)
        _check_tokens(spec, model, pooling)
        state = load_state_dict(weights, spec)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        differences = shape_differences(expected, {k: tuple(v.shape) for k, v in state.items()})
        if differences:  # said with the fix timm folders need; load_strict would name the same keys
            raise _mismatch(spec, str(weights), differences)
        load_strict(model, state, spec, str(weights))
        model = model.to(device).eval()
        size, mean, std, interpolation = _preprocessing(spec, cfg)

        def image_features(images: torch.Tensor) -> torch.Tensor:
            return pool_tokens(model, model.forward_features(images), pooling)

        return LoadedModel(
            spec=spec,
            model=model,
            tokenizer=None,
            device=device,
            architecture=cfg.architecture,
            dim=embedding_width(model, pooling),
            image_size=size,
            mean=mean,
            std=std,
            interpolation=interpolation,
            weights=str(weights),
            weights_sha256=sha256_file(weights),
            image_features=image_features,
            text_features=None,
            logit_scale_of=None,
            space=f"timm image features, pooling {pooling}: {POOLINGS[pooling]}; no text space",
            extra={"pooling": pooling},
        )


def _mismatch(spec: ModelSpec, weights: str, differences: list[str]) -> InputError:
    """A strict-fit failure, with the usual cause for timm hub folders in the fix: constructor arguments the
    model card passes in code and config.json does not carry."""
    return InputError(
        mismatch_error(spec, weights, differences).problem,
        where=f"config models.{spec.name}",
        fix="set the entry's model_args to the model card's timm_kwargs (README table: e.g. UNI needs init_values, "
        "Virchow2 mlp_layer: SwiGLUPacked and act_layer: silu), or pair the weights with their config.json",
    )


BACKEND = TimmBackend()
