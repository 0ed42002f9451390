# Input functions, settings and output lists of the demo stage (rules/demo.smk).


def demo_class_maps(wildcards=None):
    """The demo's class maps when the cohort is the demo (galleries then name each tile's true class)."""
    return [f"{DEMO_DIR}/class_maps"] if config["slides"] == f"{DEMO_DIR}/slides.tsv" else []
