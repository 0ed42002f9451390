# Preflight: check the cohort before any GPU time is spent (`snakemake --cores 4 check`, or `histoclip check`).
# Every slide opened, its mpp resolved, one tile read; the sheet, the clinical table, the prompt sets and the
# model weights checked; one line per problem in results/preflight.tsv, and a failed job when any is an error.
# The tables are declared as logs, not outputs: Snakemake deletes a failed job's outputs but keeps its logs,
# and the table is needed most exactly when the check fails. A rule without outputs runs whenever it is asked
# for, which is what a check should do.


rule check:
    params:
        config=config,
        search_dirs=[".", workflow.basedir],
        results="results",
        source=f"config ({CONFIG_SOURCE})",
    log:
        table="results/preflight.tsv",
        slides="results/preflight_slides.tsv",
        log="results/logs/preflight.log",
    threads: 8
    conda:
        "../envs/preflight.yaml"
    script:
        "../scripts/preflight/preflight.py"
