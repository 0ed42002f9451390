"""The model registry: open_clip models declared in config, loaded once, described in every output.

A model entry names an open_clip model in one of the ways open_clip understands, plus optional overrides:

- a built-in architecture (``ViT-B-16``) with ``pretrained`` = a tag (``openai``, from the local cache) or a
  checkpoint file (``.safetensors``, or a ``.pt``/``.bin`` loaded with ``weights_only``);
- ``hf-hub:org/repo`` (QuiltNet, BiomedCLIP): read from the Hugging Face cache, offline by default;
- ``local-dir:/path``: ``open_clip_config.json`` + weights (what ``train_clip`` writes);
- a JSON model config file (``config/models/*.json``), with or without ``pretrained``; without weights the
  model is randomly initialised from ``seed`` — only meant for tests and benchmarks, and recorded as such.

Nothing is downloaded unless ``allow_download`` is set: ``HF_HUB_OFFLINE=1`` makes a missing weight fail at
once with a message that says where to put it, instead of retrying a hub for a minute.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from histoclip.errors import InputError
from histoclip.store import sha256_file

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the config's ``models`` mapping (see config/schemas/config.schema.yaml)."""

    name: str
    model: str
    pretrained: str | None = None
    image_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    precision: str = "auto"
    batch_size: int | str | None = None
    allow_download: bool = False
    seed: int = 0

    @classmethod
    def from_config(cls, name: str, entry: Mapping[str, Any], search_dirs: Sequence[str | Path] = (".",)) -> ModelSpec:
        """Build a spec from a config entry; relative file paths are looked up in ``search_dirs`` in order
        (the working directory, then the workflow folder), so shipped configs work from anywhere."""

        def resolve(path: str) -> str:
            if Path(path).is_absolute():
                return path
            for folder in search_dirs:
                if (Path(folder) / path).exists():
                    return str((Path(folder) / path).resolve())
            return str((Path(search_dirs[0]) / path).resolve())

        model = str(entry["model"])
        if model.endswith(".json"):
            model = resolve(model)
        elif model.startswith("local-dir:"):
            model = "local-dir:" + resolve(model[len("local-dir:") :])
        pretrained = entry.get("pretrained")
        if pretrained and Path(pretrained).suffix in WEIGHT_SUFFIXES:
            pretrained = resolve(pretrained)
        return cls(
            name=name,
            model=model,
            pretrained=pretrained,
            image_size=entry.get("image_size"),
            mean=tuple(entry["mean"]) if entry.get("mean") else None,
            std=tuple(entry["std"]) if entry.get("std") else None,
            precision=entry.get("precision", "auto"),
            batch_size=entry.get("batch_size"),
            allow_download=bool(entry.get("allow_download", False)),
            seed=int(entry.get("seed", 0)),
        )


@dataclass
class LoadedModel:
    """A model ready for inference, with what an output file needs to say about it."""

    spec: ModelSpec
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    architecture: str
    dim: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    weights: str
    weights_sha256: str
    autocast_dtype: torch.dtype | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def provenance(self) -> dict[str, Any]:
        return {
            "model_name": self.spec.name,
            "model": self.spec.model,
            "architecture": self.architecture,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "dim": self.dim,
            "preprocessing": {
                "image_size": self.image_size,
                "mean": list(self.mean),
                "std": list(self.std),
                "interpolation": self.interpolation,
                "scale": "(uint8 tile / 255 - mean) / std, then resized on the device",
            },
            "precision": str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else "fp32",
            "device": self.device.type,
        }

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())

    def preprocess_on_device(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 tiles [B, H, W, 3] (already on the device) → normalised float images [B, 3, S, S].

        Scaling and normalisation are one fused multiply-add in the tiles' own channels-last layout (a
        separate /255, -mean, /std over a permuted tensor costs more than the tiny models themselves on a
        CPU); the result is a channels-last view, which convolutions take as is.
        """
        scale = 1.0 / (255.0 * torch.tensor(self.std, device=tiles.device))
        shift = -torch.tensor(self.mean, device=tiles.device) / torch.tensor(self.std, device=tiles.device)
        images = torch.addcmul(shift, tiles.float(), scale).permute(0, 3, 1, 2)
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = torch.nn.functional.interpolate(
                images,
                size=(self.image_size, self.image_size),
                mode=self.interpolation if self.interpolation in ("bilinear", "bicubic") else "bilinear",
                antialias=True,
                align_corners=False,
            )
        return images

    @torch.inference_mode()
    def encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected image embeddings (float32) of uint8 NHWC tiles: the zero-shot space."""
        images = self.preprocess_on_device(tiles)
        with autocast(self.device, self.autocast_dtype):
            features = self.model.encode_image(images)
        return torch.nn.functional.normalize(features.float(), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        with autocast(self.device, self.autocast_dtype):
            features = self.model.encode_text(tokens)
        return torch.nn.functional.normalize(features.float(), dim=-1)


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def resolve_device(device: str) -> torch.device:
    """``auto`` → cuda when present, else cpu; ``cuda`` without a GPU is an error, not a silent CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(
            f"device {device!r} was asked for but torch sees no CUDA GPU (torch {torch.__version__})",
            where="config embedding.device",
            fix="set embedding.device to auto or cpu, or run on a GPU node (check CUDA_VISIBLE_DEVICES and drivers)",
        )
    return torch.device(device)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def sha256_state_dict(model: torch.nn.Module) -> str:
    """A hash of the parameters themselves, for weights that exist only in memory (random init)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def hub_offline(offline: bool) -> Iterator[None]:
    """Set HF_HUB_OFFLINE for the block (huggingface_hub reads it at call time through its constants)."""
    old = os.environ.get("HF_HUB_OFFLINE")
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub_constants

        previous = hub_constants.HF_HUB_OFFLINE
        hub_constants.HF_HUB_OFFLINE = offline or previous
    except Exception:  # huggingface_hub absent or changed: the environment variable still applies
        hub_constants, previous = None, None
    try:
        yield
    finally:
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = previous
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _missing_weights(spec: ModelSpec, detail: str, key: str = "") -> InputError:
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


def unsafe_checkpoint_error(spec: ModelSpec, weights: str | None, exc: Exception) -> InputError:
    """A checkpoint whose pickle holds more than tensors: refused, because unpickling it could run any code."""
    refused = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), str(exc).splitlines()[0])
    return InputError(
        f"the checkpoint {weights} of model {spec.name!r} is a pickle with objects other than tensors ({refused}); "
        "it is refused because unpickling it could run arbitrary code",
        where=f"config models.{spec.name}.pretrained",
        fix="use a .safetensors file (convert the checkpoint where it came from, from a trusted source: "
        "safetensors.torch.save_file(state_dict, 'model.safetensors')), or a plain state_dict .pt",
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
    the Hugging Face cache. Call it under :func:`hub_offline` to keep it from downloading."""
    try:
        from open_clip.pretrained import download_pretrained_from_hf

        found = download_pretrained_from_hf(spec.model[len("hf-hub:") :])
    except Exception:  # not cached (offline), or no hub client: either way not available
        found = None
    if not found:
        raise _missing_weights(spec, "not in the Hugging Face cache")
    return found


def local_weights(spec: ModelSpec) -> tuple[str, str | None]:
    """(the name open_clip builds the model by, the local weights file or None) of ``spec``, as
    :func:`load_model` loads it: a JSON model config is registered, a ``local-dir:`` folder must hold
    ``open_clip_config.json`` and a weights file (safetensors first), a ``pretrained`` checkpoint file must
    exist. Raises :class:`InputError` saying what is missing. hf-hub weights: :func:`hub_weights_file`."""
    model_name, pretrained = spec.model, spec.pretrained
    if model_name.endswith(".json"):
        model_name = register_json_config(Path(model_name), spec)
    if model_name.startswith("local-dir:"):
        folder = Path(model_name[len("local-dir:") :])
        if not (folder / "open_clip_config.json").is_file():
            raise _missing_weights(spec, f"{folder}/open_clip_config.json does not exist")
        candidates = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        if not candidates:
            raise _missing_weights(spec, f"no weights file ({', '.join(WEIGHT_SUFFIXES)}) in {folder}")
        return model_name, str(next((p for p in candidates if p.suffix == ".safetensors"), candidates[0]))
    if pretrained and Path(pretrained).suffix in WEIGHT_SUFFIXES:
        if not Path(pretrained).is_file():
            raise _missing_weights(spec, f"checkpoint {pretrained} does not exist", key="pretrained")
        return model_name, pretrained
    return model_name, None


def embedding_dim(model: torch.nn.Module, image_size: int, device: torch.device) -> int:
    """Width of the projected image embedding (what is stored), asking the model if it doesn't say."""
    dim = getattr(model.visual, "output_dim", None)
    if dim:
        return int(dim)
    with torch.inference_mode():
        return int(model.encode_image(torch.zeros(1, 3, image_size, image_size, device=device)).shape[-1])


def load_model(spec: ModelSpec, device: str | torch.device = "auto") -> LoadedModel:
    """Load ``spec`` once, on ``device``, in eval mode; clear errors for missing or mismatched weights."""
    import open_clip

    device = device if isinstance(device, torch.device) else resolve_device(device)
    if spec.precision not in PRECISIONS:
        raise InputError(f"precision {spec.precision!r} is not one of {PRECISIONS}", where=f"models.{spec.name}")
    pretrained = spec.pretrained
    model_name, weights_file = local_weights(spec)
    force_preprocess = {}
    if spec.mean:
        force_preprocess["mean"] = spec.mean
    if spec.std:
        force_preprocess["std"] = spec.std
    with hub_offline(not spec.allow_download):
        if model_name.startswith("hf-hub:"):
            weights_file = hub_weights_file(spec)
        if weights_file is None and not pretrained:
            torch.manual_seed(spec.seed)
        try:
            model = open_clip.create_model(
                model_name,
                pretrained=pretrained,
                device=device,
                force_image_size=spec.image_size,
                force_preprocess_cfg=force_preprocess or None,
                pretrained_text=False,
                weights_only=True,
            )
        except pickle.UnpicklingError as exc:
            raise unsafe_checkpoint_error(spec, weights_file or pretrained, exc) from exc
        except RuntimeError as exc:
            text = str(exc)
            if "size mismatch" in text or "Missing key" in text or "Unexpected key" in text:
                first = "; ".join(line.strip() for line in text.splitlines()[:4])
                raise InputError(
                    f"the weights {weights_file or pretrained} do not fit the architecture of model {spec.name!r} "
                    f"({spec.model}): {first}",
                    where=f"config models.{spec.name}",
                    fix="pair the checkpoint with the model config it was trained with",
                ) from exc
            if "download" in text.lower() or "not found" in text.lower() or "offline" in text.lower():
                raise _missing_weights(spec, text.splitlines()[0]) from exc
            raise
        tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    preprocess = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = preprocess.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, list | tuple) else size
    if weights_file:
        weights, digest = weights_file, sha256_file(weights_file)
    elif pretrained:
        weights, digest = f"tag:{pretrained}", sha256_state_dict(model)
    else:
        weights, digest = f"random-init(seed={spec.seed})", sha256_state_dict(model)
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
        autocast_dtype=autocast_dtype(spec.precision, device),
    )
