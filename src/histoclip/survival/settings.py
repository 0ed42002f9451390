"""Fitting settings of the survival stage (config key ``survival``), read by the design, the Cox fits and the c-index.

Why apart from the plan: the term builders, the Cox fits and the cross-validation all need these numbers, and the
plan (which parses terms) sits above them; a module of its own keeps the imports flowing one way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from histoclip.config import SectionSettings, settings_fields

__all__ = ["SurvivalSettings"]


@dataclass(frozen=True)
class SurvivalSettings(SectionSettings, section="survival"):
    """Config key ``survival`` (fitting options), plus the workflow ``seed`` and ``zeroshot.abstain_margin``.

    No defaults here: they live in the config schema (``histoclip.config.default_config`` gives them)."""

    penalizer: float
    l1_ratio: float
    cv_folds: int
    cv_repeats: int
    min_events_per_covariate: float
    warn_events_per_covariate: float
    ph_alpha: float
    phenotype_transform: str
    phenotype_reference: str | None
    phenotype_pseudocount: float
    abstain_margin: float
    seed: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SurvivalSettings:
        """From the validated config (or a part of it at the same key paths: ``survival``, ``seed``,
        ``zeroshot.abstain_margin``)."""
        margin = config["zeroshot"]["abstain_margin"]
        return cls(**settings_fields(cls, config, cls.config_section, abstain_margin=margin))
