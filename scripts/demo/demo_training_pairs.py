"""Rule demo_training_pairs: tile–caption pairs from the demo cohort's training split."""

from pathlib import Path

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.demo import demo_pairs
from histoclip.logs import rule_log

with rule_log(snakemake.log[0], "histoclip.demo_training_pairs") as log:
    pairs = demo_pairs(Path(snakemake.input.sheet).parent, snakemake.output.pairs, seed=snakemake.params.seed)
    log.info("%d training pairs from the train split", len(pairs))
