"""Models declared in config, loaded once through their backend, described in every output.

A model entry (config ``models``) names a model and its ``backend`` (:mod:`histoclip.embedding.backends`:
``open_clip``, the default; ``conch``; ``hf-clip``; ``timm``). Whatever the backend, the rest of the workflow
sees a :class:`LoadedModel`: L2-normalised image embeddings of uint8 tiles and, where the model has a text tower,
of prompts, in one space, with the provenance every output records.

Nothing is downloaded unless ``allow_download`` is set: ``HF_HUB_OFFLINE=1`` makes a missing weight fail at
once with a message that says where to put it, instead of retrying a hub for a minute.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from histoclip.embedding.backends.checkpoints import WEIGHT_SUFFIXES
from histoclip.errors import InputError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the config's ``models`` mapping (see config/schemas/config.schema.yaml)."""

    name: str
    model: str
    backend: str = "open_clip"
    pretrained: str | None = None
    image_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    precision: str = "auto"
    batch_size: int | str | None = None
    allow_download: bool = False
    seed: int = 0
    #: timm: how one embedding is read from the tokens (cls, mean, cls+mean, head); None = from the folder's config
    pooling: str | None = None
    #: timm: constructor arguments over the folder's config.json (what a model card passes in code)
    model_args: Mapping[str, Any] | None = field(default=None, hash=False)

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

        backend = str(entry.get("backend", "open_clip"))
        model = str(entry.get("model") or default_model(name, backend))
        if model.endswith(".json"):
            model = resolve(model)
        elif model.startswith("local-dir:"):
            model = "local-dir:" + resolve(model[len("local-dir:") :])
        elif not model.startswith("hf-hub:") and ("/" in model or model.startswith(".")):
            model = resolve(model)  # a folder or file as the model's hub repository ships it
        pretrained = entry.get("pretrained")
        if pretrained and Path(pretrained).suffix in WEIGHT_SUFFIXES:
            pretrained = resolve(pretrained)
        return cls(
            name=name,
            model=model,
            backend=backend,
            pretrained=pretrained,
            image_size=entry.get("image_size"),
            mean=tuple(entry["mean"]) if entry.get("mean") else None,
            std=tuple(entry["std"]) if entry.get("std") else None,
            precision=entry.get("precision", "auto"),
            batch_size=entry.get("batch_size"),
            allow_download=bool(entry.get("allow_download", False)),
            seed=int(entry.get("seed", 0)),
            pooling=entry.get("pooling"),
            model_args=dict(entry["model_args"]) if entry.get("model_args") else None,
        )


def default_model(name: str, backend: str) -> str:
    """The model a backend builds when an entry names none (conch: its released config); the schema requires
    ``model`` for the other backends, and this says so for an entry that did not pass through it."""
    from histoclip.embedding.backends import backend_named

    default = getattr(backend_named(backend, name), "default_model", None)
    if default is None:
        raise InputError(
            f"model {name!r} has no `model`", where=f"config models.{name}", fix=f"say which {backend} model to load"
        )
    return str(default)


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
    #: preprocessed images [B, 3, S, S] → image embeddings (not yet normalised), in the space the texts share
    image_features: Callable[[torch.Tensor], torch.Tensor]
    #: prompts → text embeddings on the device; None for an image-only encoder
    text_features: Callable[[list[str]], torch.Tensor] | None = None
    #: the model's logit scale (exp of its learnt temperature); None for an image-only encoder
    logit_scale_of: Callable[[], float] | None = None
    #: what the stored embeddings are (the embedding file's ``space`` metadata)
    space: str = "open_clip projected image embedding (encode_image), the zero-shot space"
    autocast_dtype: torch.dtype | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def has_text(self) -> bool:
        return self.text_features is not None

    def provenance(self) -> dict[str, Any]:
        return {
            "model_name": self.spec.name,
            "backend": self.spec.backend,
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
            **({"pooling": self.extra["pooling"]} if "pooling" in self.extra else {}),
        }

    @property
    def logit_scale(self) -> float:
        if self.logit_scale_of is None:
            raise self.no_text_tower("a logit scale")
        return self.logit_scale_of()

    def no_text_tower(self, needed_for: str) -> InputError:
        return InputError(
            f"model {self.spec.name!r} ({self.spec.backend}: {self.architecture}) has no text tower, so it has no "
            f"{needed_for}",
            where=f"config models.{self.spec.name}",
            fix="use a vision-language model (open_clip, conch, hf-clip) for zero-shot calls, evidence, retrieval, "
            "prompt sensitivity and training; image-only encoders feed embedding, aggregation, phenotypes, "
            "clustering, survival and few-shot",
        )

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
            features = self.image_features(images)
        return torch.nn.functional.normalize(features.float(), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings (float32) in the image embeddings' space."""
        if self.text_features is None:
            raise self.no_text_tower("text embeddings (prompts)")
        with autocast(self.device, self.autocast_dtype):
            features = self.text_features(texts)
        return torch.nn.functional.normalize(features.float(), dim=-1)


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def resolve_device(device: str, key: str = "embedding.device") -> torch.device:
    """``auto`` → cuda when present, else cpu; ``cuda`` without a GPU is an error, not a silent CPU run. ``key``
    is the config key the device came from (the error names it)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(
            f"device {device!r} was asked for but torch sees no CUDA GPU (torch {torch.__version__})",
            where=f"config {key}",
            fix=f"set {key} to auto or cpu, or run on a GPU node (check CUDA_VISIBLE_DEVICES and drivers)",
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


def load_model(spec: ModelSpec, device: str | torch.device = "auto") -> LoadedModel:
    """Load ``spec`` once, on ``device``, in eval mode, through its backend; clear errors for missing or
    mismatched weights."""
    from histoclip.embedding.backends import backend_for

    device = device if isinstance(device, torch.device) else resolve_device(device)
    if spec.precision not in PRECISIONS:
        raise InputError(f"precision {spec.precision!r} is not one of {PRECISIONS}", where=f"models.{spec.name}")
    loaded = backend_for(spec).load(spec, device)
    loaded.autocast_dtype = autocast_dtype(spec.precision, device)
    return loaded
