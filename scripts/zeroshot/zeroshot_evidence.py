"""Rule zeroshot_evidence_{shard}: per slide, tile-score heatmaps over its QC thumbnail and its top tiles per class."""

from dataclasses import replace

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)
import pandas as pd

from histoclip.formats import called_classes, read_calls, read_tile_scores_metadata
from histoclip.logs import rule_log
from histoclip.plots import FigureStyle, write_tsv
from histoclip.zeroshot.evidence import EvidenceOptions, slide_evidence

with rule_log(snakemake.log[0], "histoclip.zeroshot.evidence") as log:
    calls = read_calls(snakemake.input.calls).set_index("slide_id", drop=False)
    options = EvidenceOptions.from_config(snakemake.params.options)
    called = called_classes(calls)
    settings = snakemake.params.zeroshot
    style = replace(FigureStyle.from_config(snakemake.params.style), formats=("png",))
    for i, slide_id in enumerate(snakemake.params.slides):
        scores_path = f"{snakemake.input.tile_scores}/{slide_id}.parquet"
        classes = list(called)
        if options.include_background:
            classes += [c for c in read_tile_scores_metadata(scores_path).get("classes", []) if c not in classes]
        shown = slide_evidence(
            snakemake.params.slide_files[i],
            snakemake.params.tiles[i],
            scores_path,
            snakemake.params.thumbnails[i],
            snakemake.output.tsv[i][: -len(".tsv")],
            classes,
            call=calls.loc[slide_id].to_dict() if slide_id in calls.index else None,
            top_k=settings["top_k"] if settings["pooling"] == "topk" else None,
            options=options,
            style=style,
        )
        log.info("slide %s: %d classes, %d tiles shown", slide_id, len(classes), len(shown))
    index = pd.DataFrame(
        {
            "slide_id": list(snakemake.params.slides),
            "call": [calls.loc[s, "call"] if s in calls.index else "" for s in snakemake.params.slides],
            "figure": list(snakemake.output.png),
            "source_data": list(snakemake.output.tsv),
        }
    )
    write_tsv(index, snakemake.output.index)
