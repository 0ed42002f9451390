"""The ``hf-clip`` backend: Hugging Face transformers ``CLIPModel`` folders (PLIP and other CLIPs shipped that way).

A model entry names the folder as the hub repository ships it (``{backend: hf-clip, model: /models/plip}``):
``config.json`` (a ``CLIPConfig``), the weights (``model.safetensors`` or ``pytorch_model.bin``, or shards with
their ``*.index.json``), the tokenizer files (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``) and
``preprocessor_config.json``; or ``hf-hub:org/repo``, read from the Hugging Face cache offline.

Why not ``CLIPModel.from_pretrained``: it loads leniently (missing weights are randomly initialised with a log
line, unexpected ones dropped), so a truncated or mismatched checkpoint would embed a cohort with noise. Here the
architecture is built from ``config.json`` on the ``meta`` device, the weights are read with
:func:`~histoclip.embedding.backends.checkpoints.load_state_dict` (safetensors, or ``weights_only``) and fitted
with :func:`~histoclip.embedding.backends.checkpoints.load_strict`; only the ``position_ids`` buffers, which
transformers derives (``arange``) and older checkpoints still carry, are ignored by name.

Preprocessing follows ``preprocessor_config.json`` (``image_mean``, ``image_std``, ``crop_size``, ``resample``),
with one difference in geometry: ``CLIPImageProcessor`` resizes the shortest edge to ``size`` and then
center-crops ``crop_size``, on uint8 pixels; histoclip resizes the whole square tile straight to the crop size on
the device (antialiased, after normalising). For a square tile the two cover the same field of view; for
``size`` > ``crop_size`` (a crop that drops a border) or non-square input they differ, and for tiles already at
the model size neither resizes, so the two agree up to float rounding.
"""

from __future__ import annotations

import hashlib
import json
import os
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

__all__ = [
    "BACKEND",
    "architecture_shapes",
    "cached_snapshot",
    "hub_snapshot",
    "missing_tokenizer_files",
    "model_folder",
    "preprocessing",
    "weights_files",
]

HUB = "hf-hub:"
CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"
#: Weights files as transformers writes them, in the order it prefers them: (single file, shard index).
WEIGHTS = (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json"))
#: Buffers transformers derives itself (``arange`` position ids, non-persistent since transformers 4.31) that
#: checkpoints written by older versions still hold: ignored by exact name, nothing else is.
DERIVED = frozenset({"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"})
#: PIL resample codes (preprocessor_config.json ``resample``) → the on-device interpolation closest to them
#: (histoclip resizes with torch's antialiased bilinear or bicubic only).
RESAMPLE = {0: "bilinear", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bilinear"}
#: CLIPImageProcessor's defaults, for a folder without preprocessor_config.json.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _where(spec: ModelSpec) -> str:
    return f"config models.{spec.name}.model"


def _hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (huggingface_hub reads it once, at
    import, so a later HF_HOME would otherwise be missed)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    import huggingface_hub.constants

    return Path(huggingface_hub.constants.HF_HUB_CACHE)


def cached_snapshot(repo: str) -> Path | None:
    """The snapshot folder ``refs/main`` points at in the hub cache, or None: the lookup
    ``snapshot_download(local_files_only=True)`` makes, without importing torch (for :meth:`HfClipBackend.files`,
    called while Snakemake plans the run)."""
    entry = _hub_cache() / f"models--{repo.replace('/', '--')}"
    try:
        revision = (entry / "refs" / "main").read_text().strip()
    except OSError:
        return None
    folder = entry / "snapshots" / revision
    return folder if revision and folder.is_dir() else None


def hub_snapshot(repo: str, download: bool = False) -> Path | None:
    """The cached snapshot folder of hub repository ``repo`` (``refs/main``), or None when it is not cached.
    Downloads (config, weights, tokenizer and preprocessor files) only when ``download`` is set."""
    from huggingface_hub import snapshot_download

    from histoclip.embedding.models import hub_offline

    with hub_offline(not download):
        try:
            folder = snapshot_download(
                repo,
                cache_dir=str(_hub_cache()),
                local_files_only=not download,
                allow_patterns=["*.json", "*.txt", "*.safetensors", "pytorch_model*.bin"],
            )
        except Exception:  # not cached (offline), or the hub unreachable: either way not available
            return None
    return Path(folder)


def model_folder(spec: ModelSpec) -> Path:
    """The model's folder: the entry's own, or the cached snapshot of ``hf-hub:org/repo``."""
    if spec.model.startswith(HUB):
        repo = spec.model[len(HUB) :]
        folder = hub_snapshot(repo, download=spec.allow_download)
        if folder is None:
            raise InputError(
                f"model {spec.name!r} ({spec.model}) is not in the Hugging Face cache ({_hub_cache()})",
                where=_where(spec),
                fix=f"on a machine with internet run `huggingface-cli download {repo}` and copy the cache (HF_HOME), "
                "or copy the repository's files into a folder and set `model` to it",
            )
        return folder
    folder = Path(spec.model)
    if not folder.is_dir():
        raise InputError(
            f"model {spec.name!r}: {folder} is not a folder",
            where=_where(spec),
            fix="set `model` to the folder of a transformers CLIPModel as its hub repository ships it (config.json, "
            "model.safetensors or pytorch_model.bin, tokenizer files, preprocessor_config.json), or hf-hub:ORG/REPO",
        )
    return folder


def weights_files(folder: Path) -> list[Path]:
    """The weights the model loads from ``folder``: safetensors first, as transformers prefers; a sharded
    checkpoint is its shards, as its index lists them. Empty when there are none (or the index is unreadable)."""
    for single, index in WEIGHTS:
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError):
                return []
            return [folder / name for name in sorted(set(weight_map.values()))]
    return []


def missing_tokenizer_files(folder: Path) -> list[str]:
    """The tokenizer files ``folder`` lacks: none when it has ``tokenizer.json`` or both of ``vocab.json`` and
    ``merges.txt`` (what CLIPTokenizer is built from)."""
    if (folder / "tokenizer.json").is_file():
        return []
    return [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]


def read_config(folder: Path, spec: ModelSpec) -> dict[str, Any]:
    """``config.json`` of a CLIPModel folder; anything else (missing, not JSON, another model type) is an
    :class:`InputError` saying what the folder is."""
    path = folder / CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(
            f"model {spec.name!r}: {path} does not exist",
            where=_where(spec),
            fix="copy the whole hub repository folder (config.json, weights, tokenizer files)",
        ) from None
    except (OSError, ValueError) as exc:
        raise InputError(f"model {spec.name!r}: {path} cannot be read as JSON ({exc})", where=_where(spec)) from exc
    if not isinstance(config, dict) or config.get("model_type") != "clip":
        kind = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise InputError(
            f"model {spec.name!r}: {path} is not a transformers CLIPModel config (model_type {kind!r})",
            where=_where(spec),
            fix="use backend timm for an image-only encoder, open_clip for open_clip_config.json folders",
        )
    return config


def _build(config: Mapping[str, Any]) -> torch.nn.Module:
    """The CLIPModel of ``config`` on the ``meta`` device: its architecture, no memory, no initialisation."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    with torch.device("meta"):
        return CLIPModel(CLIPConfig.from_dict(dict(config)))


def architecture_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors a checkpoint of this CLIPModel must hold (built on ``meta``)."""
    return {k: tuple(v.shape) for k, v in _build(config).state_dict().items()}


@dataclass(frozen=True)
class Preprocessing:
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str


def _edge(value: Any) -> int | None:
    """A size as preprocessor configs write it: an int, {height, width}, or {shortest_edge}."""
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping):
        found = value.get("height", value.get("shortest_edge"))
        return int(found) if found else None
    return None


def preprocessing(folder: Path, config: Mapping[str, Any], spec: ModelSpec) -> Preprocessing:
    """The folder's ``preprocessor_config.json`` (CLIPImageProcessor's defaults where it lacks a key, the
    vision config's image size where it has no size at all), with the entry's own ``image_size``/``mean``/``std``
    over it. The model's input size is the crop size (what CLIPImageProcessor hands the model)."""
    path = folder / PREPROCESSOR
    try:
        processor = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise InputError(f"model {spec.name!r}: {path} cannot be read as JSON ({exc})", where=_where(spec)) from exc
    size = _edge(processor.get("crop_size")) if processor.get("do_center_crop", True) else None
    size = size or _edge(processor.get("size")) or int(config.get("vision_config", {}).get("image_size", 224))
    return Preprocessing(
        image_size=int(spec.image_size or size),
        mean=tuple(float(v) for v in (spec.mean or processor.get("image_mean", OPENAI_MEAN))),
        std=tuple(float(v) for v in (spec.std or processor.get("image_std", OPENAI_STD))),
        interpolation=RESAMPLE.get(int(processor.get("resample", 3)), "bicubic"),
    )


def _read_weights(files: list[Path], spec: ModelSpec) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_state_dict(path, spec))
    return state


def _weights_digest(files: list[Path]) -> str:
    """sha256 of the weights file; for shards, of their names and sha256s (one digest per checkpoint)."""
    if len(files) == 1:
        return sha256_file(files[0])
    return hashlib.sha256("".join(f"{p.name}:{sha256_file(p)}\n" for p in files).encode()).hexdigest()


def _derive_buffers(model: torch.nn.Module) -> None:
    """Fill the buffers the checkpoint does not hold (a model made with ``to_empty`` has garbage there): the
    ``position_ids`` transformers derives as ``arange``. Any other such buffer is a transformers change this
    backend does not know: an error, not a silent garbage tensor."""
    import torch

    persistent = set(model.state_dict())
    for name, buffer in model.named_buffers():
        if name in persistent:
            continue
        if name not in DERIVED:
            raise RuntimeError(f"hf-clip: CLIPModel buffer {name} is neither in the checkpoint nor derived here")
        buffer.copy_(torch.arange(buffer.shape[-1], device=buffer.device).expand_as(buffer))


def _pooled(output: Any) -> torch.Tensor:
    """get_*_features returns the projected embedding as a tensor (transformers 4) or as the ``pooler_output`` of
    a model output (transformers 5)."""
    return output if hasattr(output, "dim") else output.pooler_output


def _missing_files(spec: ModelSpec, folder: Path, what: str) -> InputError:
    return InputError(
        f"model {spec.name!r}: no {what} in {folder}",
        where=_where(spec),
        fix="copy the whole hub repository folder (config.json, weights, tokenizer files, preprocessor_config.json)",
    )


def _tokenizer_error(spec: ModelSpec, folder: Path, missing: list[str]) -> InputError:
    return InputError(
        f"model {spec.name!r} has no tokenizer files in {folder}: {', '.join(missing)} missing (and no tokenizer.json)",
        where=_where(spec),
        fix="copy the tokenizer files of the model's hub repository (tokenizer.json, or vocab.json and merges.txt) "
        "into the folder",
    )


class HfClipBackend:
    name = "hf-clip"
    default_model = None  # the schema requires `model`: the folder or hf-hub:org/repo

    def has_text(self, entry: Mapping[str, Any]) -> bool:
        return True  # a CLIPModel always has its text tower

    def files(self, entry: Mapping[str, Any]) -> list[str]:
        """config.json and the weights file(s) that exist (a cached snapshot's for hf-hub, when cached)."""
        model = str(entry["model"])
        folder = cached_snapshot(model[len(HUB) :]) if model.startswith(HUB) else Path(model)
        if folder is None or not folder.is_dir():
            return []
        found = [folder / CONFIG] if (folder / CONFIG).is_file() else []
        return [str(path) for path in found + weights_files(folder)]

    def check(self, spec: ModelSpec) -> list[Finding]:
        """config.json a CLIPModel's, weights present and safe with the tensor names and shapes of the
        architecture built from it on ``meta``, tokenizer files present; nothing loaded onto any device."""
        folder = model_folder(spec)
        config = read_config(folder, spec)
        findings: list[Finding] = []
        missing = missing_tokenizer_files(folder)
        if missing:
            findings.append(("error", _tokenizer_error(spec, folder, missing)))
        if not (folder / PREPROCESSOR).is_file():
            findings.append(
                (
                    "warning",
                    InputError(
                        f"model {spec.name!r}: no {PREPROCESSOR} in {folder}; CLIPImageProcessor's defaults (OpenAI "
                        "CLIP mean/std, bicubic) and the vision config's image size are used",
                        where=_where(spec),
                        fix=f"copy {PREPROCESSOR} from the model's hub repository",
                    ),
                )
            )
        preprocessing(folder, config, spec)  # readable, or the InputError the run would raise
        files = weights_files(folder)
        if not files:
            return [
                ("error", _missing_files(spec, folder, "weights (model.safetensors or pytorch_model.bin)")),
                *findings,
            ]
        return _check_weights_fit(spec, config, files) + findings

    def load(self, spec: ModelSpec, device: torch.device) -> LoadedModel:
        from histoclip.embedding.models import LoadedModel

        folder = model_folder(spec)
        config = read_config(folder, spec)
        files = weights_files(folder)
        if not files:
            raise _missing_files(spec, folder, "weights (model.safetensors or pytorch_model.bin)")
        missing = missing_tokenizer_files(folder)
        if missing:
            raise _tokenizer_error(spec, folder, missing)
        prep = preprocessing(folder, config, spec)
        model = _load_model(spec, config, files, device)
        return LoadedModel(
            spec=spec,
            model=model,
            tokenizer=(tokenizer := _tokenizer(folder)),
            device=device,
            architecture=_architecture(model.config),
            dim=int(model.config.projection_dim),
            image_size=prep.image_size,
            mean=prep.mean,
            std=prep.std,
            interpolation=prep.interpolation,
            weights=str(files[0]) if len(files) == 1 else str(folder),
            weights_sha256=_weights_digest(files),
            image_features=_image_features(model, prep.image_size),
            text_features=_text_features(model, tokenizer, device),
            logit_scale_of=lambda: float(model.logit_scale.exp().item()),
            space="transformers CLIPModel projected image embedding (get_image_features), the zero-shot space",
        )


def _load_model(spec: ModelSpec, config: Mapping[str, Any], files: list[Path], device: torch.device) -> Any:
    """The CLIPModel on ``device`` in eval mode: built on ``meta``, storage allocated there, weights copied in
    strictly, derived buffers filled. float32 whatever the config's ``dtype`` (precision is the entry's)."""
    state = _read_weights(files, spec)
    model = _build(config).to_empty(device=device)
    load_strict(model, state, spec, str(files[0] if len(files) == 1 else files[0].parent), ignore=DERIVED.__contains__)
    _derive_buffers(model)
    return model.eval()


def _tokenizer(folder: Path) -> Any:
    """The folder's own tokenizer (CLIPTokenizer for PLIP), never downloaded and never remote code."""
    from transformers import AutoTokenizer

    from histoclip.embedding.models import hub_offline

    with hub_offline(True):
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)


def _architecture(config: Any) -> str:
    vision, text = config.vision_config, config.text_config
    return (
        f"CLIPModel(vision {vision.hidden_size}x{vision.num_hidden_layers} patch {vision.patch_size} "
        f"@{vision.image_size}px, text {text.hidden_size}x{text.num_hidden_layers}, projection {config.projection_dim})"
    )


def _image_features(model: Any, image_size: int) -> Any:
    """Preprocessed images → projected image embeddings; at another size than the model's, its position
    embeddings are interpolated (transformers' ``interpolate_pos_encoding``)."""
    interpolate = image_size != int(model.config.vision_config.image_size)

    def image_features(images: torch.Tensor) -> torch.Tensor:
        return _pooled(model.get_image_features(pixel_values=images, interpolate_pos_encoding=interpolate))

    return image_features


def _text_features(model: Any, tokenizer: Any, device: torch.device) -> Any:
    """Prompts → projected text embeddings: the folder's tokenizer, padded and truncated to the text model's
    context length (a tokenizer saved without ``model_max_length`` would otherwise not truncate at all)."""
    max_length = min(
        int(getattr(tokenizer, "model_max_length", 1 << 30)), model.config.text_config.max_position_embeddings
    )

    def text_features(texts: list[str]) -> torch.Tensor:
        tokens = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return _pooled(
            model.get_text_features(
                input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
            )
        )

    return text_features


def _check_weights_fit(spec: ModelSpec, config: Mapping[str, Any], files: list[Path]) -> list[Finding]:
    """The checkpoint's names and shapes (headers; ``weights_only`` for .bin) against the architecture's."""
    found: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            found.update(read_checkpoint_shapes(spec, path, where=_where(spec)))
        except InputError as exc:
            return [("error", exc)]
    try:
        expected = architecture_shapes(config)
    except Exception as exc:
        return [
            ("error", InputError(f"transformers cannot build the CLIPModel of {spec.model}: {exc}", where=_where(spec)))
        ]
    differences = shape_differences(expected, found, DERIVED.__contains__)
    weights = str(files[0] if len(files) == 1 else files[0].parent)
    return [("error", mismatch_error(spec, weights, differences))] if differences else []


BACKEND = HfClipBackend()
