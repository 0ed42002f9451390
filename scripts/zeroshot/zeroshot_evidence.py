"""Rule zeroshot_evidence: the evidence figures of a selection of slides (the most confident calls per class, the
misclassified slides and the abstentions, up to figures.evidence.max_slides) and their index, evidence.tsv."""

from dataclasses import replace
from pathlib import Path

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.formats import called_classes, read_calls, read_tile_scores_metadata
from histoclip.logs import rule_log
from histoclip.plots import FigureStyle, write_tsv
from histoclip.sheets import read_cohort_sheet
from histoclip.zeroshot.evidence import INDEX_COLUMNS, EvidenceOptions, select_slides, slide_evidence

with rule_log(snakemake.log[0], "histoclip.zeroshot.evidence") as log:
    calls = read_calls(snakemake.input.calls)
    options = EvidenceOptions.from_config(snakemake.params.options)
    called = called_classes(calls)
    settings = snakemake.params.zeroshot
    style = replace(FigureStyle.from_config(snakemake.params.style), formats=("png",))
    out_dir = Path(snakemake.output.figures)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = select_slides(calls, options)
    by_id = calls.set_index("slide_id", drop=False)
    slide_files = {r.slide_id: str(r.path) for r in read_cohort_sheet(snakemake.params.sheet)}
    figures, sources = [], []
    for row in index.itertuples():
        if not row.drawn:
            figures.append("")
            sources.append("")
            continue
        scores_path = f"{snakemake.input.tile_scores}/{row.slide_id}.parquet"
        classes = list(called)
        if options.include_background:
            classes += [c for c in read_tile_scores_metadata(scores_path).get("classes", []) if c not in classes]
        stem = out_dir / row.slide_id
        shown = slide_evidence(
            slide_files[row.slide_id],
            snakemake.params.tiles.format(slide=row.slide_id),
            scores_path,
            snakemake.params.thumbnails.format(slide=row.slide_id),
            stem,
            classes,
            call=by_id.loc[row.slide_id].to_dict(),
            top_k=settings["top_k"] if settings["pooling"] == "topk" else None,
            options=options,
            style=style,
        )
        figures.append(f"{stem}.png")
        sources.append(f"{stem}.tsv")
        log.info("slide %s (%s): %d classes, %d tiles shown", row.slide_id, row.reason, len(classes), len(shown))
    index["figure"], index["source_data"] = figures, sources
    counts = index.groupby("reason")["drawn"].agg(["size", "sum"])
    log.info(
        "%d of %d slides drawn (max_slides %s): %s",
        int(index["drawn"].sum()),
        len(calls),
        options.max_slides,
        ", ".join(f"{reason} {int(c['sum'])} of {int(c['size'])}" for reason, c in counts.iterrows()),
    )
    write_tsv(index[INDEX_COLUMNS], snakemake.output.index)
