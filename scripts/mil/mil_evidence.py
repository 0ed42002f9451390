"""Rule mil_evidence: attention figures of a bounded number of slides (mil.evidence_slides), and their index."""

from dataclasses import replace
from pathlib import Path

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)
import pandas as pd

from histoclip.formats import called_classes, read_calls
from histoclip.logs import rule_log
from histoclip.mil.evidence import evidence_slides, slide_attention_figure
from histoclip.plots import FigureStyle, write_tsv
from histoclip.sheets import read_cohort_sheet

with rule_log(snakemake.log[0], "histoclip.mil.evidence") as log:
    calls = read_calls(snakemake.input.calls)
    style = replace(FigureStyle.from_config(snakemake.params.style), formats=("png",))
    slides = evidence_slides(calls, called_classes(calls), snakemake.params.n_slides)
    files = {r.slide_id: r.path for r in read_cohort_sheet(snakemake.input.sheet, check_files=False)}
    out = Path(snakemake.output.figures)
    out.mkdir(parents=True, exist_ok=True)
    by_id = calls.set_index("slide_id", drop=False)
    figures = []
    for slide_id in slides:
        shown = slide_attention_figure(
            files[slide_id],
            f"results/tiles/{slide_id}.parquet",
            f"{snakemake.input.attention}/{slide_id}.parquet",
            f"results/qc/{slide_id}.png",
            out / slide_id,
            call=by_id.loc[slide_id].to_dict(),
            model=snakemake.wildcards.milmodel,
            top_n=snakemake.params.top_n,
            style=style,
        )
        figures.append(str(out / f"{slide_id}.png"))
        log.info("slide %s: %d top-attention tiles shown", slide_id, len(shown))
    index = (
        by_id.loc[slides, ["slide_id", "call", "label"]]
        if slides
        else pd.DataFrame(columns=["slide_id", "call", "label"])
    )
    write_tsv(index.assign(figure=figures).reset_index(drop=True), snakemake.output.index)
