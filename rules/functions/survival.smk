# Input functions, settings and output lists of the survival stage (rules/survival.smk).
import functools


def survival_settings(wildcards=None):
    """What SurvivalPlan.from_config reads: the `survival` section, the seed and the zero-shot abstain margin."""
    return config_part("survival", config["survival"]) | {
        "zeroshot": {"abstain_margin": config["zeroshot"]["abstain_margin"]}
    }


@functools.cache
def survival_plan():
    """The `survival` section parsed and checked once at parse time (terms, endpoint coding); cheap: lifelines is
    only imported by the rule itself."""
    from histoclip.survival.plan import SurvivalPlan

    return SurvivalPlan.from_config(survival_settings())


def survival_prompt_set():
    return config["survival"]["prompt_set"] or prompt_set_names()[0]


#: Slide tables that exist only for a model with a text tower (zero-shot calls; phenotypes named by class).
TEXT_SOURCES = ("calls", "class_composition")


def survival_text_sources():
    """The text-derived tables the configured terms and groupings read."""
    from histoclip.survival.plan import required_sources

    return [source for source in required_sources(survival_plan()) if source in TEXT_SOURCES]


def survival_models():
    """The models survival is fitted for: every embedding model, but those without a text tower when the terms
    or groupings read zero-shot calls or class fractions."""
    return [model for model in embedding_models() if has_text(model) or not survival_text_sources()]


def survival_inputs(wildcards):
    """Clinical table, sheet, and only the slide-level tables the configured terms and groupings read."""
    from histoclip.survival.plan import required_sources

    if not has_text(wildcards.model) and survival_text_sources():
        raise ValueError(
            f"model {wildcards.model!r} has no text tower, and survival reads {survival_text_sources()} (zero-shot "
            "calls or class fractions named by text): use phenotype:, phenotypes, cluster and clinical: terms for it"
        )
    if not config["clinical"]:
        raise ValueError("survival needs a clinical table: set `clinical` in the config (or --config clinical=PATH)")
    sources = {
        "calls": f"results/zeroshot/{wildcards.model}/{survival_prompt_set()}/calls.tsv",
        "composition": f"results/phenotypes/{wildcards.model}/composition.tsv",
        "class_composition": f"results/phenotypes/{wildcards.model}/class_composition.tsv",
        "clusters": f"results/clusters/{wildcards.model}/slide_clusters.tsv",
    }
    inputs = {"clinical": config["clinical"], "sheet": config["slides"]}
    return inputs | {source: sources[source] for source in required_sources(survival_plan())}


def survival_grouping_names():
    """Kaplan–Meier groupings as they appear in file names (clinical:sex → clinical_sex)."""
    from histoclip.survival.groupings import grouping_file_name

    return [grouping_file_name(g) for g in survival_plan().groupings]


def survival_km_figure_outputs():
    """figure_outputs of every Kaplan–Meier figure, keys km_{name}_{fmt}."""
    outputs = {}
    for name in survival_grouping_names():
        outputs |= figure_outputs(
            f"results/figures/survival/{{model}}/km_{name}",
            name=f"km_{name}",
            caption="survival_km.rst",
            category="6. Survival",
            subcategory="{model}",
        )
    return outputs


def survival_tables(wildcards=None):
    """Survival tables of every model (none without a clinical table)."""
    if not config["clinical"]:
        return []
    names = ["patients", "cox_univariable", "cox_multivariable", "cindex"]
    names += [f"km_{n}{suffix}" for n in survival_grouping_names() for suffix in ("", "_logrank")]
    return expand("results/survival/{model}/{name}.tsv", model=survival_models(), name=names)


def survival_multimodal_outputs(wildcards=None):
    """Image + clinical c-index table and figure of every embedding model (none without a clinical table)."""
    if not config["clinical"]:
        return []
    return expand(
        ["results/survival/{model}/cindex_multimodal.tsv", "results/figures/survival/{model}/cindex_multimodal.tsv"],
        model=embedding_models(),
    )


def survival_figures(wildcards=None):
    """Forest and Kaplan–Meier figures of every model (their source-data TSVs stand for each figure's files)."""
    if not config["clinical"]:
        return []
    names = ["forest", *[f"km_{n}" for n in survival_grouping_names()]]
    return expand("results/figures/survival/{model}/{name}.tsv", model=survival_models(), name=names)
