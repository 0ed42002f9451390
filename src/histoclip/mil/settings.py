"""Settings of the MIL stage (config key ``mil``): the tasks, the models and how they are trained.

Defaults live in the config schema only; :func:`histoclip.config.default_config` gives them to library callers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from histoclip.config import SectionSettings

__all__ = ["MODELS", "MilSettings", "MilTask"]

#: The MIL models: gated-attention MIL, and the mean-pooling linear baseline.
MODELS = ("abmil", "mean")


@dataclass(frozen=True)
class MilTask:
    """One classification task: its name, the sheet column with the classes, and the classes (None = every
    value of the column, sorted)."""

    name: str
    label_column: str
    classes: tuple[str, ...] | None = None

    @classmethod
    def from_config(cls, name: str, entry: Mapping[str, Any]) -> MilTask:
        classes = entry.get("classes")
        return cls(name, str(entry["label_column"]), tuple(map(str, classes)) if classes else None)


@dataclass(frozen=True)
class MilSettings(SectionSettings, section="mil"):
    """Config ``mil``: how the models are trained (not the tasks, evidence or deploy keys), plus the workflow
    ``seed``."""

    folds: int
    validation_fraction: float
    max_epochs: int
    patience: int
    learning_rate: float
    weight_decay: float
    hidden_dim: int
    dropout: float
    max_train_tiles: int | None
    device: str
    threads: int
    bag_cache_mb: int
    seed: int

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ValueError(f"mil.folds must be at least 2, got {self.folds}")
        if not 0 < self.validation_fraction <= 0.5:
            raise ValueError(f"mil.validation_fraction must be in (0, 0.5], got {self.validation_fraction}")

    def architecture(self) -> dict[str, Any]:
        """What a saved model needs to be rebuilt (besides the embedding dimension and the classes)."""
        return {"hidden_dim": self.hidden_dim, "dropout": self.dropout}
