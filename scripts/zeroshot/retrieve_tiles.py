"""Rule retrieve_tiles: configured text queries → the cohort's top-N tiles by cosine (table + a gallery per query)."""

from pathlib import Path

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)
import numpy as np

from histoclip.embedding.models import ModelSpec, load_model
from histoclip.formats import embedding_paths, read_tile_metadata, tile_classes
from histoclip.logs import rule_log
from histoclip.plots import FigureStyle, write_tsv
from histoclip.sheets import read_cohort_sheet
from histoclip.zeroshot.retrieval import query_gallery, text_to_tiles

with rule_log(snakemake.log[0], "histoclip.zeroshot.retrieval") as log:
    params = snakemake.params
    records = {r.slide_id: r for r in read_cohort_sheet(params.sheet)}
    slides = list(records)
    queries = list(params.settings["queries"])
    spec = ModelSpec.from_config(snakemake.wildcards.model, params.model, params.search_dirs)
    model = load_model(spec, params.device)
    text = model.encode_texts(queries).cpu().numpy() if queries else np.zeros((0, model.dim), np.float32)
    table = text_to_tiles(
        queries, text, slides, embedding_paths(snakemake.input.embeddings, slides), params.settings["top_n"],
        weights_sha256=model.weights_sha256,
    )  # fmt: skip
    write_tsv(table, snakemake.output.table)
    slide_paths = {sid: str(records[sid].path) for sid in slides}
    tile_files = {slide: params.tiles.format(slide=slide) for slide in slides}
    style = FigureStyle.from_config(params.style)
    for i, query in enumerate(queries):
        rows = table[table["query"] == query].sort_values("rank")
        truth = None
        if snakemake.input.class_maps:  # the demo cohort: the true tissue class of each tile shown
            truth = [
                str(tile_classes(
                    Path(snakemake.input.class_maps[0]) / f"{r.slide_id}.png", r.x, r.y,
                    int(read_tile_metadata(tile_files[r.slide_id])["tile_level0_px"]),
                ))
                for r in rows.itertuples()
            ]  # fmt: skip
        shown = query_gallery(
            rows, query, slide_paths, tile_files, getattr(snakemake.output, f"q{i}_tsv")[: -len(".tsv")],
            style=style, truth=truth,
        )  # fmt: skip
        purity = f", truth {shown['truth'].value_counts().to_dict()}" if truth is not None else ""
        log.info("query %r: %d tiles from %d slides%s", query, len(shown), shown["slide_id"].nunique(), purity)
