"""Synthetic pathology reports of the demo slides, written from each slide's known truth.

Why: slide–report alignment (:mod:`histoclip.report_alignment`) learns from free text, and on the demo every
number it produces should have a known answer. Each report states three facts of its slide as painted (the
class maps, ``slide_truth.tsv``): the subtype, how much of the tissue is necrotic and how dense the
lymphocytic infiltrate is, each in one of a few phrasings, graded in words and with the measured percentage,
mixed with distractor sentences that carry no information about the slide (specimen handling, blocks,
clinical history), in a shuffled order. The subtype is named with the demo's class synonyms
(:data:`~histoclip.demo.captions.CLASS_SYNONYMS`), the words the demo CLIP's text tower was trained on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from histoclip.demo.captions import CLASS_SYNONYMS
from histoclip.store import atomic_path

__all__ = ["LYMPHOCYTE_GRADES", "NECROSIS_GRADES", "demo_report", "write_demo_reports"]

#: Necrosis grades: (upper bound of the necrotic fraction of tissue, phrasings); {pct} is the percentage. A slide
#: without necrosis is described by what is there ("viable tumour"), not by "no necrosis": a frozen CLIP text
#: tower reads the word, not the negation, and the demo's tower knows only its class words (README).
NECROSIS_GRADES: tuple[tuple[float, tuple[str, ...]], ...] = (
    (
        0.05,
        (
            "Tumour is viable throughout.",
            "Viable tumour cells throughout the section.",
            "The tumour is entirely viable.",
        ),
    ),
    (
        0.15,
        (
            "Focal necrosis, about {pct} % of the tissue.",
            "Small foci of necrosis ({pct} %).",
            "Necrosis is focal ({pct} % of tissue).",
        ),
    ),
    (
        1.01,
        (
            "Extensive tumour necrosis with necrotic debris, about {pct} % of the tissue.",
            "Large areas of coagulative necrosis and necrotic tissue ({pct} %).",
            "Abundant necrotic debris and tumour necrosis, {pct} % of the section.",
        ),
    ),
)
#: Lymphocyte grades: (upper bound of the lymphocytic fraction of tissue, phrasings).
LYMPHOCYTE_GRADES: tuple[tuple[float, tuple[str, ...]], ...] = (
    (0.09, ("Few inflammatory cells.", "Inflammation is minimal.")),
    (
        0.11,
        (
            "Tumour-infiltrating lymphocytes, about {pct} % of tissue.",
            "Some lymphocytes ({pct} % of tissue).",
        ),
    ),
    (
        1.01,
        (
            "A dense lymphocytic infiltrate with lymphoid aggregates ({pct} %).",
            "Brisk tumour-infiltrating lymphocytes and lymphoid aggregates, {pct} % of the tissue.",
        ),
    ),
)
DIAGNOSIS_PHRASINGS = (
    "Sections show {}.",
    "The findings are consistent with {}.",
    "Diagnosis: {}.",
    "Microscopy: {}.",
)
DISTRACTORS = (
    "The specimen was received in formalin, labelled with the patient's name.",
    "The specimen was sampled in {n} blocks.",
    "Clinical history: mass in the {side} upper lobe.",
    "Margins were inked before sectioning.",
    "Immunohistochemistry was not requested.",
    "The case was reviewed at the thoracic multidisciplinary meeting.",
    "Slides were stained with haematoxylin and eosin.",
    "Report authorised by the reporting pathologist.",
)


def _graded(
    rng: np.random.Generator, fraction: float, grades: tuple[tuple[float, tuple[str, ...]], ...], synoptic: str
) -> list[str]:
    """The sentence of the fact's grade; the top grade is also repeated in the synoptic part of the report (as a
    prominent finding is), so a report says more about what there is more of."""
    for grade, (upper, phrasings) in enumerate(grades):
        if fraction < upper:
            pct = int(round(100 * fraction))
            sentences = [str(rng.choice(phrasings)).format(pct=pct)]
            if grade == len(grades) - 1:
                sentences.append(synoptic.format(pct=pct))
            return sentences
    raise ValueError(f"fraction {fraction} is not in [0, 1]")


def demo_report(rng: np.random.Generator, subtype: str, necrosis_fraction: float, lymphocyte_fraction: float) -> str:
    """One report: diagnosis, necrosis and lymphocyte sentences and 1-3 distractors, in a random order."""
    facts = [
        str(rng.choice(DIAGNOSIS_PHRASINGS)).format(rng.choice(CLASS_SYNONYMS[subtype])),
        *_graded(rng, necrosis_fraction, NECROSIS_GRADES, "Tumour necrosis: extensive ({pct} %)."),
        *_graded(rng, lymphocyte_fraction, LYMPHOCYTE_GRADES, "Tumour-infiltrating lymphocytes: brisk ({pct} %)."),
    ]
    chosen = rng.choice(len(DISTRACTORS), size=int(rng.integers(1, 4)), replace=False)
    noise = [
        DISTRACTORS[i].format(n=int(rng.integers(2, 9)), side=rng.choice(["right", "left"])) for i in sorted(chosen)
    ]
    sentences = facts + noise
    return " ".join(sentences[i] for i in rng.permutation(len(sentences)))


def write_demo_reports(slide_truth: str | Path, out: str | Path, seed: int) -> pd.DataFrame:
    """``reports.tsv`` (slide_id, patient_id, report) for every slide of the demo's ``slide_truth.tsv``; each
    slide's report comes from its own random stream (seed, slide index), so the file is byte-identical per seed."""
    truth = pd.read_csv(slide_truth, sep="\t")
    rows = []
    for index, slide in enumerate(truth.itertuples(index=False)):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 18, index]))
        report = demo_report(rng, slide.label, slide.necrosis_fraction, slide.lymphocytes_fraction_of_tissue)
        rows.append((slide.slide_id, slide.patient_id, report))
    reports = pd.DataFrame(rows, columns=["slide_id", "patient_id", "report"])
    with atomic_path(Path(out)) as tmp:
        reports.to_csv(tmp, sep="\t", index=False, lineterminator="\n")
    return reports
