"""Rule demo_cohort: the synthetic demo cohort under results/demo/."""

from pathlib import Path

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.demo import make_demo_cohort
from histoclip.demo.reports import write_demo_reports
from histoclip.logs import rule_log

with rule_log(snakemake.log[0], "histoclip.demo") as log:
    demo = dict(snakemake.params.demo)
    cohort = make_demo_cohort(Path(snakemake.output.sheet).parent, **demo)
    write_demo_reports(cohort.slide_truth, snakemake.output.reports, demo["seed"])  # slide–report alignment
    log.info("demo cohort written to %s (seed %s)", cohort.root, demo["seed"])
