# Config validation, the cohort sheet, input functions and wildcard constraints.
# Kept cheap: every cluster job re-parses this file. The sheet is read once per parse (its ids make the shard
# rules); only the process that plans the run checks that its slide files exist, and no slide is opened here.
import functools
import logging
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))  # the library beside this Snakefile

from snakemake_interface_executor_plugins.settings import ExecMode

from histoclip.config import validate_config
from histoclip.sheets import read_clinical_table, read_cohort_sheet

config.update(validate_config(config, source="config (config/config.yaml + --config/--configfile)"))

DEMO_DIR = "results/demo"


wildcard_constraints:
    slide=r"[A-Za-z0-9._-]+",
    model="|".join(map(re.escape, config["models"])),
    promptset=r"[A-Za-z0-9._-]+",
    trained="|".join(map(re.escape, config["training"])) or "(?!)",


@functools.cache
def cohort():
    """The validated cohort sheet as {slide_id: SlideRecord}; clinical problems are reported here too."""
    if config["slides"] == f"{DEMO_DIR}/slides.tsv" and not Path(config["slides"]).exists():
        raise FileNotFoundError(
            f"the demo cohort sheet {config['slides']} does not exist yet: generate the demo cohort first with "
            "`snakemake --cores 2 demo_cohort` (`make demo` does both steps), or point the workflow at a cohort "
            "with --config slides=PATH clinical=PATH"
        )
    # Slide files are checked by the Snakemake process that plans the run; each job (which re-parses this file:
    # 10,000 stat calls on a network file system are seconds) trusts that check.
    records = read_cohort_sheet(config["slides"], check_files=workflow.exec_mode == ExecMode.DEFAULT)
    if config["clinical"]:
        clinical = read_clinical_table(config["clinical"], [r.patient_id for r in records])
        if clinical.missing_patients:
            logging.getLogger("histoclip").warning(
                "%d patient(s) in %s have no row in %s and will be left out of survival analyses: %s",
                len(clinical.missing_patients),
                config["slides"],
                config["clinical"],
                ", ".join(clinical.missing_patients),
            )
    return {r.slide_id: r for r in records}


def slide_ids():
    return list(cohort())


def slide_files(slides):
    """The slide files of ``slides`` (ids), as the sheet gives them (made absolute)."""
    records = cohort()
    return [str(records[slide].path) for slide in slides]


def tiling_settings():
    """Every setting that decides a slide's tile grid, but the slide's own (patient, sheet mpp): a change here
    re-tiles the cohort (params rerun trigger). tiling.shard_size and tiling.threads only decide how jobs are cut."""
    return {
        "on_slide_error": config["on_slide_error"],
        "tiling": {k: v for k, v in config["tiling"].items() if k not in ("shard_size", "threads")},
        "tissue": config["tissue"],
        "mpp": config["mpp"],
        "qc_thumbnail_px": config["qc"]["thumbnail_px"],
    }


def slide_tiling_settings(slide_ids):
    """{slide: what the sheet says that decides its tiles}: a change re-runs the slide's tiling shard."""
    records = cohort()
    return {slide: {"patient_id": records[slide].patient_id, "sheet_mpp": records[slide].mpp} for slide in slide_ids}


def config_part(section, keys):
    """A rule's settings param: ``keys`` of config ``section`` and the seed, at their config paths, which is what
    every ``Settings.from_config`` of the library reads (so the seed reaches every script one way)."""
    return {"seed": config["seed"], section: dict(keys)}


def tile_files(wildcards=None):
    return expand("results/tiles/{slide}.parquet", slide=slide_ids())


def all_outputs(wildcards):
    return [
        "results/versions.tsv",
        "results/qc/cohort.tsv",
        *embedding_manifests(),
        *zeroshot_calls(),
        "results/figures/cohort_qc.tsv",
        *zeroshot_figures(),
        *slide_tables(),
        *fewshot_outputs(),
        *prompt_sensitivity_outputs(),
        *evidence_figures(),
        *retrieval_outputs(),
        *phenotype_outputs(),
        *survival_tables(),
        *survival_figures(),
    ]


def figure_files(wildcards=None):
    """Every figure of the default target (each stands for its files by its source-data TSV): the `figures`
    target, and what the HTML report shows."""
    figures = [path for path in all_outputs(wildcards) if path.startswith("results/figures/") or "/evidence/" in path]
    if Path(config["slides"]).exists():
        figures += expand(
            "results/retrieval/{model}/text_to_tiles/{slug}.tsv", model=embedding_models(), slug=retrieval_query_slugs()
        )
    return figures


def embedding_models():
    return list(config["embedding"]["models"])


def model_entry(wildcards):
    return config["models"][wildcards.model]


def cohort_shards(size):
    """{shard name: slide ids}: fixed-size chunks of the sheet, in sheet order (appending slides to the
    sheet only changes the last shard). Empty while the sheet doesn't exist yet (the demo before
    `snakemake demo_cohort`). Reading the sheet here is cheap; no slide is opened."""
    if not Path(config["slides"]).exists():
        return {}
    ids = slide_ids()
    return {f"shard{start // size:05d}": ids[start : start + size] for start in range(0, len(ids), size)}


def embedding_shards():
    return cohort_shards(config["embedding"]["shard_size"])


def tiling_shards():
    return cohort_shards(config["tiling"]["shard_size"])


def tiling_shard_tables(wildcards=None):
    """The tiling shards' tables (results/qc/shards/): together they stand for every tile file."""
    return expand("results/qc/shards/{shard}.tsv", shard=tiling_shards())


@functools.cache
def _tiling_shard_of():
    return {slide: shard for shard, ids in tiling_shards().items() for slide in ids}


def tiling_shard_tables_of(slides):
    """The tables of the tiling shards that tile ``slides`` (each once, in order)."""
    shard_of = _tiling_shard_of()
    return [f"results/qc/shards/{shard}.tsv" for shard in dict.fromkeys(shard_of[slide] for slide in slides)]


def model_inputs(wildcards):
    """Files a model is made from, so that a changed or newly trained model re-runs what used it."""
    entry = config["models"][wildcards.model]
    model = entry["model"]
    if model.startswith("local-dir:results/models/"):
        return [f"{model[len('local-dir:'):]}/open_clip_model.safetensors"]
    files = [model] if model.endswith(".json") and Path(model).exists() else []
    pretrained = entry.get("pretrained")
    if pretrained and Path(pretrained).exists():
        files.append(pretrained)
    return files


def prompt_set_names():
    return [Path(p).stem if p.endswith((".yaml", ".yml", ".json")) else p for p in config["zeroshot"]["prompt_sets"]]


def prompt_set_path(wildcards):
    """config/prompts/{name}.yaml (or .json), or the path given in zeroshot.prompt_sets."""
    for entry in config["zeroshot"]["prompt_sets"]:
        if entry.endswith((".yaml", ".yml", ".json")) and Path(entry).stem == wildcards.promptset:
            return entry
    for suffix in (".yaml", ".yml", ".json"):
        for folder in (Path("config/prompts"), Path(workflow.basedir) / "config" / "prompts"):
            if (folder / f"{wildcards.promptset}{suffix}").exists():
                return str(folder / f"{wildcards.promptset}{suffix}")
    raise ValueError(
        f"prompt set {wildcards.promptset!r} not found in config/prompts/ (.yaml or .json): "
        "add the file or give its path in zeroshot.prompt_sets"
    )


def zeroshot_calls(wildcards=None):
    return expand(
        "results/zeroshot/{model}/{promptset}/calls.tsv", model=embedding_models(), promptset=prompt_set_names()
    )


def embedding_shard_manifests(wildcards):
    return expand("results/embeddings/{model}/shards/{shard}.tsv", model=wildcards.model, shard=embedding_shards())


def embedding_manifest(wildcards):
    """The file that stands for all of a model's embedding files (what the cohort-wide rules take as input)."""
    return f"results/embeddings/{wildcards.model}.tsv"


def embedding_manifests(wildcards=None):
    return expand("results/embeddings/{model}.tsv", model=embedding_models())


def training_inputs(wildcards):
    entry = config["training"][wildcards.trained]
    inputs = {"pairs": entry["pairs"]}
    if entry.get("sheet"):
        inputs["sheet"] = entry["sheet"]
    base = entry["base"]
    if base in config["models"]:
        inputs["base"] = model_inputs(type("W", (), {"model": base}))
    elif base.endswith(".json"):
        inputs["base"] = base
    return inputs


def figure_style(wildcards=None):
    """The shared figure style (config key ``figures``, style keys only): a params entry of every figure rule."""
    return {"figures": {k: config["figures"][k] for k in ("width_in", "height_in", "dpi", "font_size", "formats")}}


def figure_outputs(stem, *, caption, category, subcategory=None, name=None, labels=None):
    """Named outputs of one figure: ``{stem}.{fmt}`` for each configured format plus ``{stem}.tsv`` (its source
    data). The PNG (or, without one, the first format) goes into the HTML report with ``caption``
    (config/report/); keys are the formats, prefixed with ``{name}_`` when a rule draws several figures."""
    formats = list(config["figures"]["formats"])
    shown = "png" if "png" in formats else formats[0]
    prefix = f"{name}_" if name else ""
    outputs = {}
    for fmt in [*formats, "tsv"]:
        path = f"{stem}.{fmt}"
        if fmt == shown:
            path = report(
                path,
                caption=f"../config/report/{caption}",
                category=category,
                subcategory=subcategory,
                labels=labels,
            )
        outputs[f"{prefix}{fmt}"] = path
    return outputs


def has_labels():
    return any(record.label for record in cohort().values())


def zeroshot_figures(wildcards=None):
    """Confusion and ROC figures per (model, prompt set); only when the sheet has labels to evaluate."""
    if not Path(config["slides"]).exists() or not has_labels():
        return []
    return expand(
        "results/figures/zeroshot/{model}/{promptset}/{figure}.tsv",
        model=embedding_models(),
        promptset=prompt_set_names(),
        figure=("confusion", "roc"),
    )


def zeroshot_call_settings():
    """The zeroshot keys of a slide call (histoclip.zeroshot.calls.CallSettings) and the seed; the prompt-sensitivity
    keys are only params of the rules that use them, so changing them re-runs nothing else."""
    skip = {"prompt_sets", "n_subsets", "template_fraction", "synonym_fraction"}
    return config_part("zeroshot", {k: v for k, v in config["zeroshot"].items() if k not in skip})


# Aggregation, few-shot and prompt sensitivity


def slide_patients(wildcards=None):
    """Patient id of every slide, in sheet order (the slide table's patient_id column)."""
    return [record.patient_id for record in cohort().values()]


def aggregation_prompt_set():
    """The prompt set whose tile scores give the per-class top-K slide embeddings (None: mean only)."""
    name = config["aggregation"]["class_embeddings"]
    if name is not None and name not in prompt_set_names():
        raise ValueError(
            f"aggregation.class_embeddings is {name!r}, which is not a prompt set of zeroshot.prompt_sets "
            f"({prompt_set_names()}): add it there, or set aggregation.class_embeddings to null"
        )
    return name


def aggregation_tile_scores(wildcards):
    name = aggregation_prompt_set()
    return [f"results/zeroshot/{wildcards.model}/{name}/tile_scores"] if name else []


def aggregation_settings(wildcards=None):
    top_k = config["aggregation"]["class_top_k"] or config["zeroshot"]["top_k"]
    return {"prompt_set": aggregation_prompt_set(), "class_top_k": top_k}


def slide_tables(wildcards=None):
    return expand("results/slides/{model}.parquet", model=embedding_models())


def fewshot_settings(wildcards=None):
    return config_part("fewshot", config["fewshot"])


def prompt_sensitivity_settings(wildcards=None):
    """Zero-shot call settings plus the subset draws: what decides the prompt-sensitivity numbers."""
    keys = ("pooling", "top_k", "lse_temperature", "abstain_margin")
    keys += ("n_subsets", "template_fraction", "synonym_fraction")
    return config_part("zeroshot", {k: config["zeroshot"][k] for k in keys})


def fewshot_outputs(wildcards=None):
    """Few-shot tables and figures per (model, prompt set); only when the sheet has labels."""
    if not Path(config["slides"]).exists() or not has_labels():
        return []
    return expand(
        [
            "results/fewshot/{model}/{promptset}/summary.tsv",
            "results/figures/fewshot/{model}/{promptset}/balanced_accuracy_vs_k.tsv",
        ],
        model=embedding_models(),
        promptset=prompt_set_names(),
    )


def prompt_sensitivity_outputs(wildcards=None):
    """Prompt-sensitivity tables and figures per (model, prompt set); only when the sheet has labels."""
    if not Path(config["slides"]).exists() or not has_labels():
        return []
    return expand(
        [
            "results/zeroshot/{model}/{promptset}/prompt_sensitivity.json",
            "results/figures/zeroshot/{model}/{promptset}/prompt_sensitivity.tsv",
        ],
        model=embedding_models(),
        promptset=prompt_set_names(),
    )


# --- Zero-shot evidence and retrieval (rules/retrieval.smk) ---


def evidence_figures(wildcards=None):
    """The evidence shards' index files (each lists its slides' figures) for every (model, prompt set)."""
    if not Path(config["slides"]).exists():
        return []
    return [
        f"results/zeroshot/{model}/{promptset}/evidence/index/{shard}.tsv"
        for model, promptset, shard, _ in evidence_shard_rules()
    ]


def retrieval_query_slugs():
    """File stems of retrieval.queries' galleries (parse time: config only; a slug collision is an error here)."""
    from histoclip.zeroshot.prompts import query_slugs  # not histoclip.zeroshot.retrieval: every job parses this (matplotlib)

    return query_slugs(config["retrieval"]["queries"])


def retrieval_gallery_outputs():
    """Named outputs of every query's gallery: q{i}_{format} for each figure format and q{i}_tsv."""
    outputs = {}
    for i, slug in enumerate(retrieval_query_slugs()):
        outputs |= figure_outputs(
            f"results/retrieval/{{model}}/text_to_tiles/{slug}",
            name=f"q{i}",
            caption="retrieval_gallery.rst",
            category="5. Retrieval",
            subcategory="{model}: text → tiles",
        )
    return outputs


def retrieval_outputs(wildcards=None):
    """Retrieval tables (text → tiles, slide neighbours, precision@k) per embedding model."""
    if not Path(config["slides"]).exists():
        return []
    return expand(
        [
            "results/retrieval/{model}/text_to_tiles.tsv",
            "results/retrieval/{model}/slide_neighbours.tsv",
            "results/retrieval/{model}/slide_retrieval.json",
        ],
        model=embedding_models(),
    )


def demo_class_maps(wildcards=None):
    """The demo's class maps when the cohort is the demo (galleries then name each tile's true class)."""
    return [f"{DEMO_DIR}/class_maps"] if config["slides"] == f"{DEMO_DIR}/slides.tsv" else []


# ---- survival (rules/survival.smk)


@functools.cache
def survival_plan():
    """The `survival` section parsed and checked once at parse time (terms, endpoint coding); cheap: lifelines is
    only imported by the rule itself."""
    from histoclip.survival.model import SurvivalPlan

    return SurvivalPlan.from_config(
        config["survival"], seed=config["seed"], abstain_margin=config["zeroshot"]["abstain_margin"]
    )


def survival_prompt_set():
    return config["survival"]["prompt_set"] or prompt_set_names()[0]


def survival_inputs(wildcards):
    """Clinical table, sheet, and only the slide-level tables the configured terms and groupings read."""
    from histoclip.survival.model import required_sources

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
    from histoclip.survival.model import grouping_file_name

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
    return expand("results/survival/{model}/{name}.tsv", model=embedding_models(), name=names)


def survival_figures(wildcards=None):
    """Forest and Kaplan–Meier figures of every model (their source-data TSVs stand for each figure's files)."""
    if not config["clinical"]:
        return []
    names = ["forest", *[f"km_{n}" for n in survival_grouping_names()]]
    return expand("results/figures/survival/{model}/{name}.tsv", model=embedding_models(), name=names)


# --- tile phenotypes and slide clustering (rules/clustering.smk) ---


def phenotype_settings(wildcards=None):
    return config_part("phenotypes", config["phenotypes"])


def clustering_settings(wildcards=None):
    return config_part("clustering", config["clustering"])


def phenotype_classifiers(wildcards):
    """Text classifiers of every prompt set (the first one names the phenotypes in class_composition.tsv)."""
    return expand(
        "results/zeroshot/{model}/{promptset}/text_classifier.parquet",
        model=wildcards.model,
        promptset=prompt_set_names(),
    )


def slide_cluster_inputs(wildcards):
    """Slide features for clustering: phenotype compositions, or slide embeddings (the aggregation stage's table
    when the workflow has one, else the tile embeddings, averaged by the clustering job itself)."""
    if config["clustering"]["slide_features"] == "composition":
        return {"composition": f"results/phenotypes/{wildcards.model}/composition.tsv"}
    if hasattr(rules, "aggregate"):  # absent where the workflow is used as a module without rules/aggregation.smk
        return {"slide_embeddings": f"results/slides/{wildcards.model}.parquet"}
    return {"embeddings": embedding_manifest(wildcards)}


def slide_map_calls(wildcards):
    """Zero-shot calls of the first prompt set, to colour the slide map by (none without prompt sets)."""
    names = prompt_set_names()
    return {"calls": f"results/zeroshot/{wildcards.model}/{names[0]}/calls.tsv"} if names else {}


def phenotype_outputs(wildcards=None):
    """Everything the phenotype and clustering stages make, per model (the `phenotypes` target)."""
    return expand(
        [
            "results/phenotypes/{model}/composition.tsv",
            "results/phenotypes/{model}/class_composition.tsv",
            "results/figures/phenotypes/{model}/gallery.tsv",
            "results/clusters/{model}/slide_clusters.tsv",
            "results/figures/clusters/{model}/slide_map.tsv",
        ],
        model=embedding_models(),
    )


# --- shard rules made at parse time (embedding.smk, retrieval.smk) --------------------------------------------
# Made per model (and prompt set) and shard, with constant output paths. Snakemake looks up which job makes a
# file in an index of the outputs' constant prefixes, and a {model} wildcard right after results/embeddings/
# made every lookup scan every shard's outputs (planning time grew with slides², 167 s for 10,000 slides).


def rule_name(*parts):
    """A rule name from a stage, model, prompt set and shard (anything outside [A-Za-z0-9_] becomes _)."""
    return "_".join(re.sub(r"[^A-Za-z0-9_]", "_", part) for part in parts)


def model_files(model):
    """model_inputs() for a model named outright, as the per-model shard rules need it at parse time."""
    from types import SimpleNamespace

    return model_inputs(SimpleNamespace(model=model))


def shard_runtime(n_slides, minutes_per_slide):
    """Walltime (minutes) of a shard job that works ``threads`` slides at a time, growing with the attempt. A
    function that makes the callable, so that each shard rule binds its own ``n_slides``."""
    return lambda wildcards, threads, attempt: minutes_per_slide * -(-n_slides // threads) * attempt


def embedding_shard_rules():
    """(model, shard, slide ids) for every embedding shard rule."""
    shards = embedding_shards()
    return [(model, shard, ids) for model in embedding_models() for shard, ids in shards.items()]


def evidence_shard_rules():
    """(model, prompt set, shard, slide ids) for every zero-shot evidence shard rule."""
    shards = embedding_shards()
    return [
        (model, promptset, shard, ids)
        for model in embedding_models()
        for promptset in prompt_set_names()
        for shard, ids in shards.items()
    ]
