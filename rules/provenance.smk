# The environment a run used: results/versions.tsv (the Parquet outputs carry their own provenance too).
# It reruns when a version changes (the versions are the rule's params), and runs in the Snakemake process
# itself (`run:`, no conda env), whose environment is what it records.
from histoclip.versions import installed_versions, write_versions_table


rule versions:
    output:
        table="results/versions.tsv",
    params:
        versions=lambda wildcards: installed_versions(),
    log:
        "results/logs/versions.log",
    localrule: True
    run:
        write_versions_table(output.table, params.versions)
        Path(log[0]).write_text(f"{len(params.versions)} entries written to {output.table}\n")
