"""Rule report_alignment: retrieval on held-out slides, report-style calls and their comparison, attention maps."""

from pathlib import Path

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.logs import rule_log
from histoclip.plots import FigureStyle
from histoclip.report_alignment.pipeline import evaluate
from histoclip.sheets import read_cohort_sheet

with rule_log(snakemake.log[0], "histoclip.report_alignment") as log:
    params, output = snakemake.params, snakemake.output
    records = read_cohort_sheet(params.sheet)
    slides = [r.slide_id for r in records]
    settings = params.settings
    summary = evaluate(
        records,
        snakemake.input.reports,
        snakemake.input.report_embeddings,
        snakemake.input.embeddings,
        snakemake.input.weights,
        snakemake.input.classifier,
        snakemake.input.tile_calls,
        ks=settings["recall_at"],
        abstain_margin=params.zeroshot["abstain_margin"],
        bootstrap=params.zeroshot["bootstrap"],
        seed=params.seed,
        out_dir=Path(output.retrieval).parent,
        figure_stem=Path(output.tsv).with_suffix(""),
        style=FigureStyle.from_config(params.style),
        attention_slides=settings["attention_slides"],
        top_n=settings["top_n"],
        tiles={s: params.tiles.format(slide=s) for s in slides},
        thumbnails={s: f"results/qc/{s}.png" for s in slides},
        slide_files={r.slide_id: str(r.path) for r in records},
    )
    Path(output.attention).mkdir(parents=True, exist_ok=True)
    for direction in ("report_to_slide", "slide_to_report"):
        aligned, chance = summary["aligned"][direction], summary["aligned"][direction]["chance_recall_at"]
        log.info(
            "%s on %d held-out: recall@k %s (chance %s), median rank %.1f (untrained: %s)",
            direction, aligned["n_queries"], aligned["recall_at"], chance, aligned["median_rank"],
            summary["untrained"][direction]["recall_at"],
        )  # fmt: skip
