"""Fitting settings of the survival stage (config key ``survival``), read by the design, the Cox fits and the c-index.

Why apart from the plan: the term builders, the Cox fits and the cross-validation all need these numbers, and the
plan (which parses terms) sits above them; a module of its own keeps the imports flowing one way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["SurvivalSettings"]


@dataclass(frozen=True)
class SurvivalSettings:
    """Config key ``survival`` (fitting options), plus the workflow ``seed`` and ``zeroshot.abstain_margin``."""

    penalizer: float = 0.0
    l1_ratio: float = 0.0
    cv_folds: int = 5
    cv_repeats: int = 5
    min_events_per_covariate: float = 10.0
    ph_alpha: float = 0.05
    phenotype_transform: str = "alr"
    phenotype_reference: str | None = None
    phenotype_pseudocount: float = 0.01
    abstain_margin: float = 0.0
    seed: int = 0

    @classmethod
    def from_config(cls, entry: Mapping[str, Any], *, seed: int = 0, abstain_margin: float = 0.0) -> SurvivalSettings:
        fields = {k: v for k, v in entry.items() if k in cls.__dataclass_fields__ and k not in ("seed",)}
        fields.setdefault("abstain_margin", abstain_margin)
        return cls(**fields, seed=seed)
