"""Checkpoints read safely, the same way for every backend: names and shapes from the header for the preflight,
tensors without unpickling code for the run, and a strict fit check that names the keys at fault.

Why one module: a checkpoint is a state dict whatever the model (open_clip, CONCH, transformers, timm), and the
failure modes users hit are the same — a truncated copy, a pickle that holds objects (refused: unpickling can run
any code), the checkpoint of another architecture. Reference loaders are not used because some of them load with
``strict=False`` or plain ``torch.load`` (CONCH's does both), which hides exactly these failures.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histoclip.errors import InputError

if TYPE_CHECKING:
    import torch

    from histoclip.embedding.models import ModelSpec

__all__ = [
    "WEIGHT_SUFFIXES",
    "checkpoint_shapes",
    "mismatch_error",
    "shape_differences",
    "load_state_dict",
    "load_strict",
    "read_checkpoint_shapes",
    "unsafe_checkpoint_error",
]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


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


def _unwrap(checkpoint: Any, path: Path) -> dict[str, Any]:
    """The state dict inside a checkpoint: a ``state_dict``/``model`` entry, without a DDP ``module.`` prefix."""
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model"):
            if key in checkpoint and isinstance(checkpoint[key], dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(k, str) for k in checkpoint):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict of named tensors")
    if checkpoint and all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k[len("module.") :]: v for k, v in checkpoint.items()}
    return checkpoint


def checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a checkpoint, without loading its values where the format allows.

    safetensors: the header only. ``.pt``/``.bin``: ``torch.load(weights_only=True, mmap=True)``, which refuses
    any pickled object that is not a tensor or a container of tensors (:class:`pickle.UnpicklingError`).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    state = _torch_load(path, mmap=True)
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def read_checkpoint_shapes(spec: ModelSpec, path: str | Path, where: str | None = None) -> dict[str, tuple[int, ...]]:
    """:func:`checkpoint_shapes` for the preflight of a model entry: a pickle with code, or a file that can't be
    read as a state dict (truncated, empty, something else), is an :class:`InputError` saying so (``where``: the
    entry's key at fault, default the entry)."""
    try:
        return checkpoint_shapes(path)
    except pickle.UnpicklingError as exc:
        raise unsafe_checkpoint_error(spec, str(path), exc) from exc
    except Exception as exc:  # damaged, empty, not a state dict, or a shard an index names that is absent
        raise InputError(
            f"the weights file {path} of model {spec.name!r} cannot be read as a state dict: {exc}",
            where=where or f"config models.{spec.name}",
            fix="copy the file again (it may be truncated) or point the model at the right file",
        ) from exc


def _torch_load(path: Path, mmap: bool = False) -> dict[str, Any]:
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError:  # not a zip checkpoint (legacy format): no mmap, still weights_only
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return _unwrap(checkpoint, path)


def load_state_dict(path: str | Path, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint file (safetensors, or a ``.pt``/``.bin`` state dict loaded with
    ``weights_only``); a pickle with code, or a file that is not a state dict, is an :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"weights file {path} does not exist", where=f"config models.{spec.name}", fix="point the model at its file"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return _torch_load(path)
    except pickle.UnpicklingError as exc:
        raise unsafe_checkpoint_error(spec, str(path), exc) from exc
    except Exception as exc:  # truncated, empty, or not a checkpoint at all
        raise InputError(
            f"the weights file {path} of model {spec.name!r} cannot be read as a state dict: {exc}",
            where=f"config models.{spec.name}",
            fix="copy the file again (it may be truncated) or point the model at the right file",
        ) from exc


def shape_differences(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    ignore: Callable[[str], bool] = lambda key: False,
) -> list[str]:
    """Differences between an architecture's parameters and a checkpoint that a strict load would refuse
    (``ignore``: keys a backend resizes or derives itself)."""
    missing = [k for k in expected if k not in found and not ignore(k)]
    unexpected = [k for k in found if k not in expected and not ignore(k)]
    shapes = [
        f"{k}: {list(found[k])} in the file, {list(expected[k])} in the model"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k]) and not ignore(k)
    ]
    out = []
    if missing:
        out.append(f"{len(missing)} tensor(s) missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        out.append(f"{len(unexpected)} unexpected tensor(s) (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        out.append(f"{len(shapes)} shape mismatch(es) (e.g. {'; '.join(shapes[:3])})")
    return out


def mismatch_error(spec: ModelSpec, weights: str, differences: list[str]) -> InputError:
    return InputError(
        f"the weights {weights} do not fit the architecture of model {spec.name!r} ({spec.model}): "
        + "; ".join(differences),
        where=f"config models.{spec.name}",
        fix="pair the checkpoint with the model config it was trained with",
    )


def load_strict(
    module: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    spec: ModelSpec,
    weights: str,
    ignore: Callable[[str], bool] = lambda key: False,
) -> None:
    """Load ``state`` into ``module``; any missing, unexpected or misshapen tensor (but ``ignore``d ones) is an
    :class:`InputError` naming them, before anything is copied."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    differences = shape_differences(expected, {k: tuple(v.shape) for k, v in state.items()}, ignore)
    if differences:
        raise mismatch_error(spec, weights, differences)
    module.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
