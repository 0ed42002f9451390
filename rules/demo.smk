# The synthetic demo cohort: slides, sheet, clinical table with simulated survival, tile captions, and the
# tile–caption pairs its CLIP is trained on.


include: "functions/demo.smk"


rule demo_cohort:
    output:
        sheet=f"{DEMO_DIR}/slides.tsv",
        clinical=f"{DEMO_DIR}/clinical.tsv",
        coefficients=f"{DEMO_DIR}/true_coefficients.tsv",
        captions=f"{DEMO_DIR}/captions.tsv",
        reports=f"{DEMO_DIR}/reports.tsv",
        slides=directory(f"{DEMO_DIR}/slides"),
        class_maps=directory(f"{DEMO_DIR}/class_maps"),
    params:
        demo=config["demo"],
    conda:
        "../envs/slides.yaml"
    log:
        "results/logs/demo_cohort.log",
    threads: 2
    script:
        "../scripts/demo/make_demo_cohort.py"


rule demo_training_pairs:
    input:
        sheet=f"{DEMO_DIR}/slides.tsv",
        captions=f"{DEMO_DIR}/captions.tsv",
    output:
        pairs=f"{DEMO_DIR}/training_pairs.tsv",
    params:
        seed=config["demo"]["seed"],
    log:
        "results/logs/demo_training_pairs.log",
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/demo/demo_training_pairs.py"
