"""Model terms: how each kind is written, which table it reads, and how it becomes covariate columns.

**Terms** of a model (config ``survival.multivariable`` / ``survival.univariable``), one string each:

===========================  =====================================================================================
``clinical:COLUMN``          a clinical-table column; numeric as is (per unit of the column), text as one
                             indicator per level, the most frequent level the reference (``clinical:sex=M``)
``subtype:CLASS``            1 if the patient's zero-shot call is CLASS, 0 for any other call (the reference);
                             patients whose call abstains are left out of the model
``p:CLASS``                  the patient's zero-shot probability of CLASS, per unit probability (0 → 1)
``class_fraction:CLASS``     fraction of the patient's tissue in the named tissue class (``class_composition.tsv``),
                             per unit fraction (0 → 1; a coefficient of 3 is × e^0.3 per +10 %)
``phenotype:COLUMN``         one phenotype fraction of ``composition.tsv`` (e.g. ``phenotype:phenotype_03``)
``phenotypes``               the whole phenotype composition. Fractions sum to 1, so the full set is collinear with
                             the intercept-free Cox model; one phenotype is the reference (``phenotype_reference``,
                             default the most abundant in the cohort). ``phenotype_transform: alr`` (default) uses
                             additive log-ratios log((f_k + c) / (f_ref + c)) with pseudo-count c
                             (``phenotype_pseudocount``) for the zeros every sparse composition has: a coefficient
                             is the log hazard ratio per e-fold increase of phenotype k relative to the reference.
                             ``drop_reference`` uses the raw fractions of the other phenotypes: a coefficient is
                             the effect of moving a unit of tissue from the reference phenotype to phenotype k
``cluster``                  the slide cluster, one indicator per cluster, the largest cluster the reference
===========================  =====================================================================================

Every kind is declared once, in :data:`TERM_KINDS`: how it is written (``kind:NAME`` or a bare ``kind``), the
table it reads (which is also what the rule must be given), and the builder that turns it into covariate columns
named after the term. Parsing, the rule's inputs and the design are lookups in that table; a new kind is one
builder and one entry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from histoclip.errors import InputError
from histoclip.survival.cells import MAX_LEVELS, levels_by_count, natural_key, numeric, text
from histoclip.survival.patients import SlideFeatures
from histoclip.survival.settings import SurvivalSettings

__all__ = ["TERM_KINDS", "Design", "DesignInputs", "DesignTerm", "Term", "TermKind", "build_design", "parse_term"]


@dataclass(frozen=True)
class Term:
    """One term of a Cox model as written in the config (``kind:name`` or a bare ``kind``)."""

    kind: str
    name: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" if self.name is not None else self.kind

    @property
    def source(self) -> str:
        """The table the term reads: ``clinical`` or a slide-level table (its kind's entry in TERM_KINDS)."""
        return TERM_KINDS[self.kind].source


@dataclass
class DesignTerm:
    """A term expanded into covariate columns, with what its coefficients compare against."""

    term: Term
    columns: list[str]
    reference: str
    notes: dict[str, str] = field(default_factory=dict)


@dataclass
class Design:
    """Covariate columns per patient (index ``patient_id``; NaN where a patient lacks the term)."""

    frame: pd.DataFrame
    terms: dict[str, DesignTerm]

    def columns(self, terms: Iterable[Term]) -> list[str]:
        return [c for t in terms for c in self.terms[str(t)].columns]


@dataclass(frozen=True)
class DesignInputs:
    """What every builder may read: the patients' clinical rows (their index is the patients), their slide
    features (for the file names in messages) and the settings (the phenotype transform)."""

    clinical: pd.DataFrame
    features: SlideFeatures
    settings: SurvivalSettings

    @property
    def patients(self) -> pd.Index:
        return self.clinical.index


#: Covariate columns by name, each indexed by the design's patients.
Columns = dict[str, pd.Series]
#: A kind's builder: (term, its source table at patient level, design inputs) → (columns, reference).
Builder = Callable[[Term, Any, DesignInputs], tuple[Columns, str]]


# ------------------------------------------------------------------------------------------------ builders
# Each: (the term, its source table at patient level, the design inputs) → (columns, what they compare against).


def _clinical_columns(term: Term, clinical: pd.DataFrame, inputs: DesignInputs) -> tuple[Columns, str]:
    """A numeric column as is; a text column as indicators against its most frequent level."""
    key = str(term)
    if term.name not in clinical.columns:
        raise InputError(
            f"model term {key}: the clinical table has no column {term.name!r} "
            f"(columns: {', '.join(map(str, clinical.columns))})",
            where="clinical table",
            fix="correct the term or add the column",
        )
    numbers, text_cells = numeric(clinical[term.name])
    if text_cells.any():
        columns, reference = _categorical(text(clinical[term.name]), key, where="clinical table")
        return columns, f"{reference} (most frequent level)"
    return {key: numbers}, f"per unit of {term.name}"


def _categorical(values: pd.Series, prefix: str, where: str) -> tuple[Columns, str]:
    """One indicator per level but the reference (most frequent; ties: first in natural order)."""
    present = values.dropna()
    if present.nunique() > MAX_LEVELS:
        raise InputError(
            f"{prefix} has {present.nunique()} distinct text values: too many levels for indicators",
            where=where,
            fix="use a numeric column, or recode it into a few categories",
        )
    levels = levels_by_count(present)
    if not levels:
        return {prefix: pd.Series(np.nan, index=values.index)}, "(no values)"
    reference = levels[0]
    # A single level still gets its (constant) indicator, so that the model reports it as dropped and why.
    indicated = sorted(levels[1:], key=natural_key) if len(levels) > 1 else levels
    columns = {f"{prefix}={level}": (values == level).astype(float).where(values.notna()) for level in indicated}
    return columns, f"{prefix}={reference}"


def _zero_shot_classes(term: Term, calls: pd.DataFrame, inputs: DesignInputs) -> list[str]:
    """The classes of the calls table (its ``p_<class>`` columns), checked to include the term's class."""
    classes = [c[2:] for c in calls.columns if c.startswith("p_")]
    if term.name not in classes:
        raise InputError(
            f"model term {term}: {term.name!r} is not a zero-shot class ({', '.join(classes)})",
            where=inputs.features.sources.get("calls", "zero-shot calls"),
            fix="use one of the prompt set's class names",
        )
    return classes


def _call_indicator(term: Term, calls: pd.DataFrame, inputs: DesignInputs) -> tuple[Columns, str]:
    """1 where the patient's call is the class, 0 for another call, missing where the call abstains."""
    classes = _zero_shot_classes(term, calls, inputs)
    call = calls.reindex(inputs.patients)["call"]
    called = call.notna() & call.ne("")
    others = [c for c in classes if c != term.name]
    return {str(term): (call == term.name).astype(float).where(called)}, f"zero-shot call {' or '.join(others)}"


def _call_probability(term: Term, calls: pd.DataFrame, inputs: DesignInputs) -> tuple[Columns, str]:
    """The patient's mean zero-shot probability of the class."""
    _zero_shot_classes(term, calls, inputs)
    return {str(term): calls.reindex(inputs.patients)[f"p_{term.name}"]}, "per unit probability (0 to 1)"


def _fraction(what: str, listed: str, reference: str, *, where: tuple[str, str], fix: str) -> Builder:
    """The builder of a term that names one fraction column (a tissue class, a phenotype): the column as is, or an
    error listing the columns there are. ``where`` is (the SlideFeatures.sources key, the fallback name)."""

    def build(term: Term, fractions: pd.DataFrame, inputs: DesignInputs) -> tuple[Columns, str]:
        if term.name not in fractions.columns:
            raise InputError(
                f"model term {term}: no {what} {term.name!r} ({listed}{', '.join(fractions.columns)})",
                where=inputs.features.sources.get(*where),
                fix=fix,
            )
        return {str(term): fractions[term.name].reindex(inputs.patients)}, reference

    return build


def _phenotype_composition(term: Term, fractions: pd.DataFrame, inputs: DesignInputs) -> tuple[Columns, str]:
    """The whole composition against one reference phenotype: additive log-ratios (``alr``) or the other
    phenotypes' fractions (``drop_reference``); the reference is named, or the cohort's most abundant."""
    settings = inputs.settings
    fractions = fractions.reindex(inputs.patients)
    phenotypes = list(fractions.columns)
    if len(phenotypes) < 2:
        raise InputError(
            f"the phenotype composition has {len(phenotypes)} phenotype column(s): a composition needs two or more",
            where="phenotype composition",
            fix="use phenotype:COLUMN for a single fraction",
        )
    reference = settings.phenotype_reference
    if reference is None:
        means = fractions.mean()
        reference = str(max(phenotypes, key=lambda c: (means[c] if pd.notna(means[c]) else -1.0, -phenotypes.index(c))))
    elif reference not in phenotypes:
        raise InputError(
            f"phenotype_reference {reference!r} is not a phenotype column ({', '.join(phenotypes)})",
            where="survival.phenotype_reference",
            fix="name one of the phenotype columns, or null for the most abundant",
        )
    others = [c for c in phenotypes if c != reference]
    if settings.phenotype_transform == "alr":
        c = settings.phenotype_pseudocount
        ratios = np.log((fractions[others] + c).div(fractions[reference] + c, axis=0))
        frame = ratios.rename(columns=lambda p: f"phenotypes:{p}")
        chosen = " (most abundant)" if settings.phenotype_reference is None else ""
        described = f"log-ratio to {reference}{chosen}, pseudo-count {c:g}"
    else:
        frame = fractions[others].rename(columns=lambda p: f"phenotypes:{p}")
        described = f"fraction moved from {reference}"
    return frame.to_dict("series"), described


def _cluster_indicators(term: Term, clusters: pd.Series, inputs: DesignInputs) -> tuple[Columns, str]:
    """One indicator per slide cluster but the largest (ties: first in natural order), the reference."""
    cluster = clusters.reindex(inputs.patients)
    labels = levels_by_count(cluster)
    if not labels:
        raise InputError(
            "no patient has a slide cluster", where=inputs.features.sources.get("clusters"), fix="check the clustering"
        )
    others = sorted(labels[1:], key=natural_key)
    columns = {f"cluster:{label}": (cluster == label).astype(float).where(cluster.notna()) for label in others}
    return columns, f"cluster {labels[0]} (largest)"


# ---------------------------------------------------------------------------------------------- the kinds


@dataclass(frozen=True)
class TermKind:
    """One kind of model term, declared once: how it is written, which table it reads, how it is built."""

    #: How the term is written and what it means (error messages list these).
    usage: str
    #: The table it reads: ``clinical`` or a slide-level table (``calls``, ``composition``, ``class_composition``,
    #: ``clusters``); a slide-level source is also an input of the survival rule.
    source: str
    #: Written ``kind:NAME`` (True) or as the bare kind (False).
    named: bool
    #: Its covariate columns, named after the term (``clinical:sex=M``, ``cluster:2``, ``phenotypes:phenotype_01``).
    build: Builder


TERM_KINDS: dict[str, TermKind] = {
    "clinical": TermKind("clinical:COLUMN, a column of the clinical table", "clinical", True, _clinical_columns),
    "subtype": TermKind(
        "subtype:CLASS, 1 if the patient's zero-shot call is CLASS (reference: the other classes)",
        "calls",
        True,
        _call_indicator,
    ),
    "p": TermKind("p:CLASS, the patient's zero-shot probability of CLASS", "calls", True, _call_probability),
    "class_fraction": TermKind(
        "class_fraction:CLASS, fraction of tissue in a named tissue class (class_composition.tsv)",
        "class_composition",
        True,
        _fraction(
            "tissue class",
            "classes: ",
            "per unit fraction of tissue (0 to 1)",
            where=("class_fractions", "class composition"),
            fix="use one of the named tissue classes",
        ),
    ),
    "phenotype": TermKind(
        "phenotype:COLUMN, one phenotype fraction (composition.tsv)",
        "composition",
        True,
        _fraction(
            "phenotype column",
            "",
            "per unit fraction of tiles (0 to 1)",
            where=("phenotypes", "phenotype composition"),
            fix="use one of the phenotype columns",
        ),
    ),
    "phenotypes": TermKind(
        "phenotypes, the whole phenotype composition (log-ratios against a reference phenotype)",
        "composition",
        False,
        _phenotype_composition,
    ),
    "cluster": TermKind(
        "cluster, the slide cluster (indicators, reference = the largest cluster)",
        "clusters",
        False,
        _cluster_indicators,
    ),
}


def parse_term(text: str, *, where: str = "survival config") -> Term:
    """``clinical:age`` → Term("clinical", "age"); unknown kinds and missing names are errors naming the term."""
    text = str(text).strip()
    kind, sep, name = text.partition(":")
    kind = kind.strip()
    name = name.strip()
    spec = TERM_KINDS.get(kind)
    if spec is None:
        raise InputError(
            f"unknown model term {text!r}",
            where=where,
            fix="write terms as one of: " + "; ".join(k.usage for k in TERM_KINDS.values()),
        )
    if not spec.named:
        if sep and name:
            raise InputError(f"term {text!r}: {kind!r} takes no name", where=where, fix=f"write just {kind!r}")
        return Term(kind)
    if not name:
        raise InputError(f"term {text!r} needs a name after ':'", where=where, fix=spec.usage)
    return Term(kind, name)


# ---------------------------------------------------------------------------------------------- the design


def build_design(
    clinical: pd.DataFrame, features: SlideFeatures, terms: Iterable[Term], settings: SurvivalSettings
) -> Design:
    """Covariate columns for ``terms`` for the patients of ``clinical`` (its index). References (most frequent
    level, largest cluster, most abundant phenotype) are chosen on these patients, once, so that univariable and
    multivariable models compare against the same thing."""
    inputs = DesignInputs(clinical, features, settings)
    columns: Columns = {}
    design_terms: dict[str, DesignTerm] = {}
    for term in dict.fromkeys(terms):
        key = str(term)
        if key in design_terms:
            continue
        kind = TERM_KINDS[term.kind]
        source = clinical if kind.source == "clinical" else features.part(kind.source, key)
        built, reference = kind.build(term, source, inputs)
        columns.update(built)
        design_terms[key] = DesignTerm(term, list(built), reference)
    frame = pd.DataFrame(columns, index=clinical.index, dtype=float)
    for key, design_term in design_terms.items():
        if frame[design_term.columns].isna().all().all():
            source = design_term.term.source
            raise InputError(
                f"model term {key} has no value for any of the {len(clinical.index)} patients",
                where=features.sources.get(source, source) if source != "clinical" else "clinical table",
                fix="check that the table covers the cohort's patients (and, for subtype:, that not every call "
                "abstains), or remove the term",
            )
    return Design(frame, design_terms)
