"""Rule train_clip: image–text pairs → an open_clip model in results/models/{trained}/ (local-dir format)."""

from pathlib import Path

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.embedding.models import ModelSpec
from histoclip.logs import rule_log
from histoclip.training.loop import train_clip
from histoclip.training.pairs import read_pairs
from histoclip.training.settings import TrainSettings

with rule_log(snakemake.log[0], "histoclip.train_clip") as log:
    entry = dict(snakemake.params.training)
    pairs = read_pairs(entry.pop("pairs"), sheet_path=entry.pop("sheet", None), split=entry.pop("split", "train"))
    base_name = entry.pop("base")
    if base_name in snakemake.params.models:
        base = ModelSpec.from_config(base_name, snakemake.params.models[base_name], snakemake.params.search_dirs)
    else:
        base = ModelSpec.from_config(base_name, {"model": base_name}, snakemake.params.search_dirs)
    report = train_clip(
        pairs,
        Path(snakemake.output.weights).parent,
        base=base,
        settings=TrainSettings(**entry),
        device=snakemake.params.device,
        log=log,
    )
    log.info(
        "trained %d steps in %.0f s: loss %.3f → %.3f",
        report.steps,
        report.seconds,
        report.first_loss,
        report.last_loss,
    )
