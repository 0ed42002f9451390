"""Model backends: how a model entry's files are found, checked without loading, loaded safely and called.

A model entry's ``backend`` (``open_clip``, the default; ``conch``; ``hf-clip``; ``timm``) names one of these.
Everything else in the workflow sees only :class:`~histoclip.embedding.models.LoadedModel` (which encodes tiles
and, where the model has a text tower, prompts) and the embedding files it writes, so a new backend is a module
here and one line in :data:`BACKENDS`.

This module is imported while Snakemake plans a run (rule inputs come from :meth:`Backend.files`), so it and
each backend's ``files`` must not import torch or the model packages.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from histoclip.errors import InputError

if TYPE_CHECKING:
    from histoclip.embedding.models import LoadedModel, ModelSpec

__all__ = ["BACKENDS", "Backend", "Finding", "backend_for", "backend_named", "model_files", "model_has_text"]

#: Backend name → module under histoclip.embedding.backends (imported only when the backend is used).
BACKENDS: dict[str, str] = {
    "open_clip": "open_clip_backend",
    "conch": "conch_backend",
    "hf-clip": "hf_clip_backend",
    "timm": "timm_backend",
}

#: A preflight finding: (severity "error" | "warning", the error saying what and how to fix it).
Finding = tuple[str, InputError]


class Backend(Protocol):
    """What the workflow needs from a model backend."""

    name: str
    #: the ``model`` of an entry that leaves it out (only backends whose models have a canonical config: conch)
    default_model: str | None

    def has_text(self, entry: Mapping[str, Any]) -> bool:
        """Whether a config entry's model has a text tower (zero-shot calls, evidence, text retrieval, prompt
        sensitivity, training need one). Cheap: called at parse time."""

    def files(self, entry: Mapping[str, Any]) -> list[str]:
        """Local files a config entry is made from, as the config gives them (rule inputs: a changed checkpoint
        re-runs what used it; a model the workflow trains is the training rule's output). Cheap: called at parse
        time, no torch."""

    def check(self, spec: ModelSpec) -> list[Finding]:
        """Preflight: files present and readable, tensor names and shapes fitting the architecture, nothing
        loaded onto a device."""

    def load(self, spec: ModelSpec, device: str) -> LoadedModel:
        """The model in eval mode on ``device``, loaded without unpickling code; missing or unexpected
        weights are an error naming them."""


def backend_named(name: str, model: str = "?") -> Backend:
    """The backend called ``name`` (a model entry's ``backend``; ``model``: the entry, for the error)."""
    module = BACKENDS.get(name)
    if module is None:
        raise InputError(
            f"unknown backend {name!r} for model {model!r}",
            where=f"config models.{model}.backend",
            fix=f"use one of {', '.join(BACKENDS)}",
        )
    return importlib.import_module(f"histoclip.embedding.backends.{module}").BACKEND


def backend_for(spec: ModelSpec) -> Backend:
    """The backend of a model entry."""
    return backend_named(spec.backend, spec.name)


def model_files(name: str, entry: Mapping[str, Any]) -> list[str]:
    """The files a config entry's model is made from (its backend's :meth:`Backend.files`)."""
    return backend_named(str(entry.get("backend", "open_clip")), name).files(entry)


def model_has_text(name: str, entry: Mapping[str, Any]) -> bool:
    """Whether a config entry's model has a text tower (its backend's :meth:`Backend.has_text`)."""
    return backend_named(str(entry.get("backend", "open_clip")), name).has_text(entry)
