"""Model checks: weights on disk (or in the Hugging Face cache) and fitting the architecture, nothing loaded.

Each model is checked by its backend (:meth:`histoclip.embedding.backends.Backend.check`), with the same
code that finds the weights for the run: the checkpoint's tensor names and shapes from its header, compared
with the architecture built on PyTorch's ``meta`` device. What is added here is the preflight's own part: a
model the workflow trains is checked through its training entry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from histoclip.errors import InputError
from histoclip.preflight.problems import Problem, problems_from


def check_model(
    name: str, entry: Mapping[str, Any], config: Mapping[str, Any], search_dirs: Sequence[str | Path] = (".",)
) -> list[Problem]:
    """Weights present (offline) and fitting the architecture, as the model's backend checks them; nothing is
    loaded onto any device. A model the workflow trains itself is checked through its training entry until it
    has been trained."""
    from histoclip.embedding.backends import backend_for
    from histoclip.embedding.models import ModelSpec

    raw = str(entry.get("model", ""))  # a conch entry may leave it out
    trained = {f"local-dir:results/models/{t}" for t in config.get("training", {})}
    try:
        spec = ModelSpec.from_config(name, entry, search_dirs)
        if raw in trained and not (Path(spec.model[len("local-dir:") :]) / "open_clip_model.safetensors").exists():
            return check_training(raw[len("local-dir:results/models/") :], config, search_dirs)
        findings = backend_for(spec).check(spec)
    except InputError as exc:
        return problems_from(exc, "model")
    return [problem for severity, error in findings for problem in problems_from(error, "model", severity=severity)]


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
