# histoclip: whole-slide image cohorts → tiles → CLIP embeddings → calls, clusters, survival, figures.
# Declarations only: the rules live in rules/, the logic in src/histoclip/.
from snakemake.utils import min_version

min_version("9.0")


# config/config.yaml is the real-cohort starting point; files given with --configfile (config/demo.yaml for the
# demo) replace it whole instead of merging into it, so no key of one cohort's settings leaks into another's.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "config/report/workflow.rst"


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/tiling.smk"
include: "rules/training.smk"
include: "rules/embedding.smk"
include: "rules/zeroshot.smk"
include: "rules/cohort.smk"
include: "rules/mil.smk"
include: "rules/survival.smk"
include: "rules/report_alignment.smk"
include: "rules/audit.smk"
include: "rules/figures.smk"
include: "rules/export.smk"
include: "rules/preflight.smk"
include: "rules/provenance.smk"


rule all:
    default_target: True
    input:
        all_outputs,
