"""A trained MIL model on disk, and calling a new cohort with it (``deploy``).

The saved model is the k fold models of the cross-validation together (an ensemble: a new slide's
probabilities are the mean of theirs), in one safetensors file: tensors ``fold{i}.{parameter}``, and in its
header the provenance a user needs to trust and reuse it: the task (label column, classes), the MIL model and
its architecture, the training settings, each fold's slides and best epoch, the cross-validated metrics, and the
embedding model it was trained on (name, weights sha256, dimension, preprocessing). Why an ensemble rather than
one more model fitted on every slide: the fold models are the ones the reported metrics describe, and no
epoch count has to be guessed without a validation set.

safetensors, not a pickle: loading a model file someone sent cannot run code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from histoclip import formats, store
from histoclip.bags import BagReader
from histoclip.errors import InputError
from histoclip.mil.crossval import AttentionSink, calls_frame, load_state
from histoclip.mil.train import predict, resolve_device

__all__ = ["SavedMil", "check_embeddings", "deploy", "load_mil_model", "save_mil_model"]

#: The safetensors header key of the provenance (a JSON string).
HEADER_KEY = "histoclip.mil"
FORMAT_VERSION = 1


def save_mil_model(
    path: str | os.PathLike[str], states: Sequence[Mapping[str, torch.Tensor]], info: Mapping[str, Any]
) -> None:
    """Write the fold models ``states`` and the provenance ``info`` (JSON-able: task, classes, model, architecture,
    dim, embedding provenance, settings, folds, metrics) atomically; the package versions are added."""
    from safetensors.torch import save_file

    tensors = {
        f"fold{i}.{name}": t.detach().cpu().contiguous() for i, state in enumerate(states) for name, t in state.items()
    }
    header = dict(info) | {
        "n_folds": len(states),
        "format_version": FORMAT_VERSION,
        "versions": store.package_versions(),
    }
    with store.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(header, sort_keys=True, default=str)})


@dataclass
class SavedMil:
    """A loaded model file: its provenance and each fold's weights."""

    path: str
    info: dict[str, Any]
    states: list[dict[str, torch.Tensor]]

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])


def load_mil_model(path: str | os.PathLike[str]) -> SavedMil:
    """Read a model file written by :func:`save_mil_model`; anything else is an error naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            header = (file.metadata() or {}).get(HEADER_KEY)
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise InputError(
            f"cannot be read as a MIL model file ({exc})",
            where=str(path),
            fix="point mil.deploy at a model.safetensors written by rule mil",
        ) from exc
    if header is None:
        raise InputError(
            "is a safetensors file without histoclip's MIL provenance",
            where=str(path),
            fix="point mil.deploy at a model.safetensors written by rule mil",
        )
    info = json.loads(header)
    states: list[dict[str, torch.Tensor]] = [{} for _ in range(int(info["n_folds"]))]
    for name, tensor in tensors.items():
        fold, _, parameter = name.partition(".")
        states[int(fold.removeprefix("fold"))][parameter] = tensor
    return SavedMil(str(path), info, states)


def check_embeddings(saved: SavedMil, footer: formats.EmbeddingFooter) -> None:
    """Refuse embeddings of another model than the one the MIL model was trained on: the same dimension is not
    enough, the tiles must live in the same space (same weights)."""
    trained = saved.info.get("embedding", {})
    if footer.dim != int(saved.info["dim"]):
        raise InputError(
            f"embeddings of dimension {footer.dim}, but the MIL model {saved.path} was trained on {saved.info['dim']}",
            where=footer.path,
            fix=f"embed the cohort with the model it was trained on ({trained.get('model_name', '?')})",
        )
    sha = trained.get("weights_sha256")
    if sha and footer.weights_sha256 and footer.weights_sha256 != sha:
        raise InputError(
            f"embedded with weights {footer.weights_sha256[:12]}…, but the MIL model {saved.path} was trained on "
            f"embeddings of {trained.get('model_name', '?')} with weights {sha[:12]}…",
            where=footer.path,
            fix="embed the cohort with the same weights the MIL model was trained on",
        )


def deploy(
    saved: SavedMil,
    slides: pd.DataFrame,
    bags: BagReader,
    *,
    device: str = "auto",
    attention_sink: AttentionSink | None = None,
) -> pd.DataFrame:
    """Call every slide of ``slides`` (slide_id, n_tiles, and label/split/patient_id when known) with the saved
    ensemble: the calls contract, ``fold`` = "ensemble". Slides without tiles get an empty call."""
    called = slides[slides["n_tiles"] > 0]["slide_id"].tolist()
    if called:
        check_embeddings(saved, formats.read_embedding_footer(bags.paths[called[0]]))
    torch_device = resolve_device(device)
    models = [
        load_state(
            saved.info["mil_model"],
            int(saved.info["dim"]),
            len(saved.classes),
            saved.info["architecture"],
            s,
            torch_device,
        )
        for s in saved.states
    ]
    probabilities: dict[str, np.ndarray] = {}
    for bag, p, attention in predict(models, bags, called, torch_device):
        probabilities[bag.slide_id] = p
        if attention_sink is not None:
            attention_sink(bag.slide_id, bag.x, bag.y, attention, "ensemble")
    frame = slides.copy()
    if "status" not in frame.columns:
        frame["status"] = np.where(frame["n_tiles"] > 0, "ok", "no tiles")
    return calls_frame(frame, saved.classes, probabilities, dict.fromkeys(called, "ensemble"))


def model_path_info(path: str | os.PathLike[str]) -> str:
    """One line describing a model file, for logs."""
    saved = load_mil_model(path)
    info = saved.info
    return (
        f"{Path(path).name}: {info['mil_model']} for task {info['task']} ({', '.join(saved.classes)}), "
        f"{info['n_folds']} fold models, trained on {info.get('embedding', {}).get('model_name', '?')} embeddings"
    )
