"""What the survival stage analyses: endpoints, model terms, Kaplan–Meier groupings and the fitting settings.

Why apart from the analysis: the workflow reads the plan when it builds the job graph (the rule's inputs are the
tables the terms read, its outputs one file per grouping), so this module must stay cheap to import — it never
imports lifelines.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from histoclip.errors import InputError
from histoclip.survival.clinical import ClinicalLayout
from histoclip.survival.endpoints import Endpoint
from histoclip.survival.groupings import grouping_file_name, parse_grouping
from histoclip.survival.patients import PARTS
from histoclip.survival.settings import SurvivalSettings
from histoclip.survival.terms import Term, parse_term

__all__ = ["SurvivalPlan", "required_sources"]


@dataclass(frozen=True)
class SurvivalPlan:
    """What to analyse: endpoints, model terms, Kaplan–Meier groupings and the fitting settings."""

    endpoints: tuple[Endpoint, ...]
    multivariable: tuple[Term, ...]
    univariable: tuple[Term, ...]
    groupings: tuple[str, ...]
    settings: SurvivalSettings
    #: The clinical table's patient column (``survival.patient_column``).
    patient_column: str = "patient_id"

    @property
    def layout(self) -> ClinicalLayout:
        """Which columns of the clinical table the plan reads: the patient column and every endpoint's."""
        return ClinicalLayout(self.patient_column, self.endpoints)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SurvivalPlan:
        """From the validated config (or a part of it at the same key paths: ``survival``, ``seed``,
        ``zeroshot.abstain_margin``)."""
        section = config["survival"]
        endpoints = tuple(Endpoint.from_config(n, e) for n, e in (section.get("endpoints") or {}).items())
        if not endpoints:
            raise InputError(
                "no endpoint", where="survival.endpoints", fix="add one, e.g. os: {time: time, event: event}"
            )
        multivariable = tuple(parse_term(t, where="survival.multivariable") for t in section.get("multivariable") or [])
        uni = section.get("univariable")
        univariable = multivariable if uni is None else tuple(parse_term(t, where="survival.univariable") for t in uni)
        for name, terms in (("multivariable", multivariable), ("univariable", univariable)):
            texts = [str(t) for t in terms]
            duplicates = sorted({t for t in texts if texts.count(t) > 1})
            if duplicates:
                raise InputError(f"duplicate term(s) {duplicates}", where=f"survival.{name}", fix="list each once")
        groupings = tuple(str(g) for g in section.get("km_groupings") or [])
        for g in groupings:
            parse_grouping(g)
        names = [grouping_file_name(g) for g in groupings]
        if len(set(names)) != len(names):
            raise InputError(
                f"km_groupings {list(groupings)} repeat a name", where="survival.km_groupings", fix="list each once"
            )
        settings = SurvivalSettings.from_config(config)
        if settings.phenotype_transform not in ("alr", "drop_reference"):
            raise InputError(
                f"phenotype_transform {settings.phenotype_transform!r}",
                where="survival",
                fix="use alr or drop_reference",
            )
        patient_column = str(section.get("patient_column") or "patient_id")
        return cls(endpoints, multivariable, univariable, groupings, settings, patient_column)


def required_sources(plan: SurvivalPlan) -> list[str]:
    """Slide-level tables the plan reads (``calls``, ``composition``, ``class_composition``, ``clusters``), in a
    fixed order: the rule's inputs, so that a model of clinical terms alone doesn't wait for the clustering."""
    sources = {t.source for t in (*plan.multivariable, *plan.univariable)}
    sources |= {parse_grouping(g).source for g in plan.groupings}
    return [s for s in PARTS if s in sources]
