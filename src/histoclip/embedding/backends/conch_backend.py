"""The ``conch`` backend: MahmoodLab's CONCH (a CoCa model) through its own package, loaded the safe way.

A model entry is ``{backend: conch, pretrained: /models/CONCH/pytorch_model.bin}``: the checkpoint as CONCH's hub
repository (MahmoodLab/CONCH) ships it, or ``hf-hub:MahmoodLab/CONCH`` from the Hugging Face cache. ``model`` is
optional: a CONCH model config JSON, or the name of a config shipped in the package (default ``conch_ViT-B-16``).

Why the package and not a re-implementation: the architecture (a timm ViT trunk with attentional poolers, a text
tower with a class token) and the tokenizer are CONCH's code, and parity with it is what users need. Why not its
loader: ``create_model`` unpickles with plain ``torch.load`` and loads with ``strict=False``, so a truncated or
foreign checkpoint would silently leave random weights. Here the state dict is read with
:func:`~histoclip.embedding.backends.checkpoints.load_state_dict` and fitted with
:func:`~histoclip.embedding.backends.checkpoints.load_strict`; the package only builds ``CoCa(**cfg)``.

The ``conch`` distribution (``conch-fork``) is an optional extra (``pip install -e '.[conch]'``) under CC BY-NC-ND
4.0, like CONCH's weights, so it is imported only when a conch model is checked or loaded.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from histoclip.embedding.backends import Finding
from histoclip.embedding.backends.checkpoints import (
    WEIGHT_SUFFIXES,
    load_state_dict,
    load_strict,
    mismatch_error,
    read_checkpoint_shapes,
    shape_differences,
)
from histoclip.errors import InputError

if TYPE_CHECKING:
    import torch

    from histoclip.embedding.models import LoadedModel, ModelSpec

__all__ = ["BACKEND", "DEFAULT_MODEL", "architecture_shapes", "read_config", "tokenize"]

#: The config a conch entry without ``model`` builds (CONCH's released model, 448 px input).
DEFAULT_MODEL = "conch_ViT-B-16"
#: The checkpoint file CONCH's hub repository ships.
HUB_WEIGHTS = "pytorch_model.bin"
#: The vision trunk's position embedding: resized on load when ``image_size`` overrides the config (as the
#: package's ``force_image_size`` does), so the preflight does not compare its shape.
POS_EMBED = "visual.trunk.pos_embed"
_CONFIG_KEYS = {"embed_dim", "embed_dim_caption", "vision_cfg", "text_cfg", "multimodal_cfg"}
_HUB_PREFIXES = ("hf-hub:", "hf_hub:")  # ours, and the spelling of CONCH's own README


def conch_package(spec: ModelSpec) -> ModuleType:
    """``conch.open_clip_custom``, or an :class:`InputError` saying how to install the optional extra."""
    try:
        import conch.open_clip_custom as package
    except ImportError as exc:
        raise InputError(
            f"model {spec.name!r} uses the conch backend, but the `conch` package is not installed ({exc})",
            where=f"config models.{spec.name}.backend",
            fix="pip install -e '.[conch]' (conch-fork: MahmoodLab's CONCH code, CC BY-NC-ND 4.0; make test installs "
            "it); with --sdm conda, add conch-fork==0.1.0 to envs/torch.yaml's pip list",
        ) from exc
    return package


def config_path(spec: ModelSpec) -> Path:
    """The model config JSON: ``model`` as a file, or a config shipped in the package by name."""
    from conch.open_clip_custom.factory import CFG_DIR

    if spec.model.endswith(".json"):
        return Path(spec.model)
    return CFG_DIR / f"{spec.model}.json"


def read_config(spec: ModelSpec) -> dict[str, Any]:
    """The keyword arguments of ``CoCa`` as the package's ``create_model`` makes them (``custom_text`` dropped,
    ``image_size`` overridden when the entry sets it). Needs the package (:func:`conch_package` first)."""
    from conch.open_clip_custom.factory import CFG_DIR

    path = config_path(spec)
    where = f"config models.{spec.name}.model"
    if not path.is_file():
        shipped = sorted(p.stem for p in CFG_DIR.glob("*.json"))
        raise InputError(
            f"CONCH model config {spec.model!r} does not exist ({path})",
            where=where,
            fix=f"leave `model` out (default {DEFAULT_MODEL}), name a config the conch package ships ({shipped}), "
            "or give the path of a CONCH model config JSON",
        )
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc})", where=where) from exc
    if not isinstance(cfg, dict) or not set(cfg) >= _CONFIG_KEYS:
        raise InputError(
            f"{path} is not a CONCH model config (needs {', '.join(sorted(_CONFIG_KEYS))})",
            where=where,
            fix="use the format of the conch package's model_configs/conch_ViT-B-16.json",
        )
    cfg.pop("custom_text", None)
    if spec.image_size:
        cfg["vision_cfg"] = {**cfg["vision_cfg"], "image_size": spec.image_size}
    return cfg


def build(cfg: Mapping[str, Any], spec: ModelSpec) -> torch.nn.Module:
    """``CoCa(**cfg)`` on the current default device (``meta`` for the preflight); a config the class does not
    take is an :class:`InputError`."""
    from conch.open_clip_custom.coca_model import CoCa

    try:
        return CoCa(**copy.deepcopy(dict(cfg)))
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise InputError(
            f"the conch package cannot build model {spec.name!r} from {spec.model}: {exc}",
            where=f"config models.{spec.name}.model",
            fix="use a CONCH model config (the format of model_configs/conch_ViT-B-16.json)",
        ) from exc


def architecture_shapes(cfg: Mapping[str, Any], spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the architecture, built on the ``meta`` device (no memory, no weights)."""
    import torch

    with torch.device("meta"):
        model = build(cfg, spec)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _ignored(spec: ModelSpec) -> Callable[[str], bool]:
    return (lambda key: key == POS_EMBED) if spec.image_size else (lambda key: False)


def _missing(spec: ModelSpec, detail: str) -> InputError:
    return InputError(
        f"weights for model {spec.name!r} (conch, pretrained={spec.pretrained}) are not available offline: {detail}",
        where=f"config models.{spec.name}.pretrained",
        fix="set `pretrained` to CONCH's pytorch_model.bin (from https://huggingface.co/MahmoodLab/CONCH, gated: "
        "`huggingface-cli download MahmoodLab/CONCH pytorch_model.bin --local-dir /models/CONCH` where there is "
        "internet), or put it in the Hugging Face cache and use pretrained: hf-hub:MahmoodLab/CONCH",
    )


def weights_file(spec: ModelSpec) -> Path | None:
    """The checkpoint the run loads: ``pretrained`` as a file, or ``pytorch_model.bin`` of an ``hf-hub:`` repo in
    the Hugging Face cache (never downloaded here); None without ``pretrained`` (random init)."""
    if not spec.pretrained:
        return None
    hub = next((p for p in _HUB_PREFIXES if spec.pretrained.startswith(p)), None)
    if hub:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(spec.pretrained[len(hub) :], HUB_WEIGHTS)
        if not isinstance(found, str):
            raise _missing(spec, f"{HUB_WEIGHTS} of {spec.pretrained[len(hub) :]} is not in the Hugging Face cache")
        return Path(found)
    path = Path(spec.pretrained)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise _missing(
            spec, f"{spec.pretrained} is neither a checkpoint file ({', '.join(WEIGHT_SUFFIXES)}) nor hf-hub:"
        )
    if not path.is_file():
        raise _missing(spec, f"checkpoint {path} does not exist")
    return path


def tokenize(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """Token ids exactly as ``conch.open_clip_custom.tokenize`` makes them: 127 tokens (<start>, text, <end>,
    truncated and padded), then one <pad> slot the text tower replaces by its class token.

    The package calls ``tokenizer.batch_encode_plus``, which transformers 5 removed; calling the tokenizer with
    the same arguments is what ``batch_encode_plus`` did for a batch of texts."""
    import torch.nn.functional as F  # noqa: N812

    tokens = tokenizer(
        texts,
        max_length=127,
        add_special_tokens=True,
        return_token_type_ids=False,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    )
    return F.pad(tokens["input_ids"], (0, 1), value=tokenizer.pad_token_id)


def _fit(model: torch.nn.Module, spec: ModelSpec, path: Path) -> None:
    """Load the checkpoint at ``path`` into ``model``, strictly; the position embedding resized first when the
    entry overrides the image size (the package's own ``resize_pos_embed``, as ``force_image_size`` does)."""
    state = load_state_dict(path, spec)
    if spec.image_size and POS_EMBED in state:
        from conch.open_clip_custom.coca_model import resize_pos_embed

        resize_pos_embed(state, model)
    load_strict(model, state, spec, str(path))


class ConchBackend:
    name = "conch"
    default_model = DEFAULT_MODEL

    def has_text(self, entry: Mapping[str, Any]) -> bool:
        return True

    def files(self, entry: Mapping[str, Any]) -> list[str]:
        model, pretrained = str(entry.get("model") or ""), entry.get("pretrained")
        files = [model] if model.endswith(".json") and Path(model).exists() else []
        if pretrained and Path(pretrained).suffix in WEIGHT_SUFFIXES and Path(pretrained).exists():
            files.append(str(pretrained))
        return files

    def load(self, spec: ModelSpec, device: torch.device) -> LoadedModel:
        import torch

        from histoclip.embedding.models import LoadedModel, sha256_state_dict
        from histoclip.store import sha256_file

        package = conch_package(spec)
        cfg = read_config(spec)
        path = weights_file(spec)
        if path is None:
            torch.manual_seed(spec.seed)
        model = build(cfg, spec)
        if path is not None:
            _fit(model, spec, path)
            weights, digest = str(path), sha256_file(path)
        else:
            weights, digest = f"random-init(seed={spec.seed})", sha256_state_dict(model)
        model = model.to(device).eval()
        tokenizer = package.get_tokenizer()
        size = model.visual.image_size[0]

        def image_features(images: torch.Tensor) -> torch.Tensor:
            return model.encode_image(images, proj_contrast=True, normalize=False)

        def text_features(texts: list[str]) -> torch.Tensor:
            return model.encode_text(tokenize(tokenizer, texts).to(device), normalize=False)

        return LoadedModel(
            spec=spec,
            model=model,
            tokenizer=tokenizer,
            device=device,
            architecture=config_path(spec).stem,
            dim=int(cfg["embed_dim"]),
            image_size=int(size),
            mean=tuple(float(v) for v in (spec.mean or package.OPENAI_DATASET_MEAN)),
            std=tuple(float(v) for v in (spec.std or package.OPENAI_DATASET_STD)),
            interpolation="bicubic",  # the package's transform: Resize(BICUBIC) then CenterCrop
            weights=weights,
            weights_sha256=digest,
            image_features=image_features,
            text_features=text_features,
            logit_scale_of=lambda: float(model.logit_scale.exp().item()),
            space="CONCH contrastive image embedding (encode_image, proj_contrast=True), the zero-shot space",
        )

    def check(self, spec: ModelSpec) -> list[Finding]:
        """The package installed, the config readable, the checkpoint present, safe and fitting the architecture
        (names and shapes; the architecture built on the ``meta`` device); nothing is loaded."""
        conch_package(spec)  # the InputError saying how to install it, before anything else
        cfg = read_config(spec)
        path = weights_file(spec)
        if path is None:
            text = f"model {spec.name!r} has no `pretrained` CONCH checkpoint: it would be randomly initialised"
            fix, where = "set `pretrained` to CONCH's pytorch_model.bin", f"config models.{spec.name}.pretrained"
            if spec.model.endswith(".json"):
                warning = InputError(f"{text} (seed {spec.seed}), meant for tests only", where=where, fix=fix)
                return [("warning", warning)]
            return [("error", InputError(text, where=where, fix=fix))]
        try:
            found = read_checkpoint_shapes(spec, path, where=f"config models.{spec.name}.pretrained")
        except InputError as exc:
            return [("error", exc)]
        differences = shape_differences(architecture_shapes(cfg, spec), found, _ignored(spec))
        return [("error", mismatch_error(spec, str(path), differences))] if differences else []


BACKEND = ConchBackend()
