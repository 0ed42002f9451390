# The synthetic demo cohort: slides, sheet, clinical table with simulated survival, tile captions.


rule demo_cohort:
    output:
        sheet=f"{DEMO_DIR}/slides.tsv",
        clinical=f"{DEMO_DIR}/clinical.tsv",
        coefficients=f"{DEMO_DIR}/true_coefficients.tsv",
        captions=f"{DEMO_DIR}/captions.tsv",
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
        "../scripts/make_demo_cohort.py"
