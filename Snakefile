# histoclip: whole-slide image cohorts → tiles → CLIP embeddings → calls, clusters, survival, figures.
# Declarations only: the rules live in rules/, the logic in src/histoclip/.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "config/report/workflow.rst"


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/tiling.smk"
include: "rules/training.smk"
include: "rules/embedding.smk"
include: "rules/zeroshot.smk"
include: "rules/cohort.smk"
include: "rules/survival.smk"
include: "rules/figures.smk"
include: "rules/preflight.smk"
include: "rules/provenance.smk"


rule all:
    default_target: True
    input:
        all_outputs,
