# Config validation, the cohort sheet, wildcard constraints, and the helpers every stage uses. Each stage's own
# input functions, settings and output lists live in rules/functions/{stage}.smk, included by its rule file.
# Kept cheap: every cluster job re-parses this file. The sheet is read once per parse (its ids make the shard
# rules); only the process that plans the run checks that its slide files exist, and no slide is opened here.
import functools
import logging
import re
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(workflow.basedir) / "src"))  # the library beside this Snakefile
# Snakemake appends this process's sys.path to every rule script's, so scripts/{stage}/*.py find
# scripts/histoclip_path.py (which then puts this src/ first for them too).
sys.path.append(str(Path(workflow.basedir) / "scripts"))

from snakemake_interface_executor_plugins.settings import ExecMode

from histoclip.config import validate_config
from histoclip.sheets import read_cohort_sheet
from histoclip.survival.clinical import ClinicalLayout, read_clinical_table

CONFIG_SOURCE = " + ".join(
    [*map(str, workflow.overwrite_configfiles or ["config/config.yaml"])]
    + (["--config"] if workflow.config_settings.overwrite_config else [])
)
config.update(validate_config(config, source=f"config ({CONFIG_SOURCE})"))

DEMO_DIR = "results/demo"


wildcard_constraints:
    slide=r"[A-Za-z0-9._-]+",
    model="|".join(map(re.escape, config["models"])),
    promptset=r"[A-Za-z0-9._-]+",
    trained="|".join(map(re.escape, config["training"])) or "(?!)",
    milmodel="abmil|mean",
    task=r"[A-Za-z0-9._-]+",


@functools.cache
def cohort():
    """The validated cohort sheet as {slide_id: SlideRecord}; clinical problems are reported here too."""
    if config["slides"] == f"{DEMO_DIR}/slides.tsv" and not Path(config["slides"]).exists():
        raise FileNotFoundError(
            f"the demo cohort sheet {config['slides']} does not exist yet: generate the demo cohort first with "
            "`snakemake --cores 2 --configfile config/demo.yaml demo_cohort` (`make demo` does both steps), or "
            "point the workflow at a cohort: copy config/config.yaml, set `slides` and the model, and run with "
            "--configfile YOUR_COPY"
        )
    # Slide files are checked by the Snakemake process that plans the run; each job (which re-parses this file:
    # 10,000 stat calls on a network file system are seconds) trusts that check.
    records = read_cohort_sheet(config["slides"], check_files=workflow.exec_mode == ExecMode.DEFAULT)
    if config["clinical"]:
        clinical = read_clinical_table(
            config["clinical"], [r.patient_id for r in records], layout=ClinicalLayout.from_config(config)
        )
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


def slide_patients(wildcards=None):
    """Patient id of every slide, in sheet order (the slide table's patient_id column)."""
    return [record.patient_id for record in cohort().values()]


def has_labels():
    return any(record.label for record in cohort().values())


def has_train_split():
    """Whether any slide is in the sheet's train split: few-shot draws its shots from those."""
    return bool(train_patients())


#: Fewest training patients slide–report alignment can train on (histoclip.report_alignment.training.MIN_PATIENTS,
#: not imported here: every job parses this file, and that module imports torch).
MIN_ALIGNMENT_PATIENTS = 3


@functools.cache
def train_patients():
    """The patients with a slide in the sheet's train split."""
    return {
        record.patient_id
        for record in cohort().values()
        if str(record.extra.get("split", "")).strip().lower() == "train"
    }


def cohort_shards(size):
    """{shard name: slide ids}: fixed-size chunks of the sheet, in sheet order (appending slides to the
    sheet only changes the last shard). Empty while the sheet doesn't exist yet (the demo before
    `snakemake demo_cohort`). Reading the sheet here is cheap; no slide is opened."""
    if not Path(config["slides"]).exists():
        return {}
    ids = slide_ids()
    return {f"shard{start // size:05d}": ids[start : start + size] for start in range(0, len(ids), size)}


def embedding_models():
    return list(config["embedding"]["models"])


@functools.cache
def has_text(model):
    """Whether a model has a text tower (its backend says; image-only encoders such as timm's have none)."""
    from histoclip.embedding.backends import model_has_text

    return model_has_text(model, config["models"][model])


def text_models():
    """The embedding models with a text tower: the ones zero-shot calls, evidence, text retrieval, prompt
    sensitivity and few-shot against zero-shot are made for (few-shot without a text tower: rule fewshot_labels)."""
    return [model for model in embedding_models() if has_text(model)]


@functools.cache
def image_only_note():
    """One log line per image-only model of the run: what the default target leaves out for it, and why."""
    for model in embedding_models():
        if not has_text(model):
            logging.getLogger("histoclip").warning(
                "model %s (backend %s) has no text tower: its zero-shot calls, evidence, text → tile retrieval, "
                "prompt sensitivity, few-shot against zero-shot and survival terms that read calls are left out of the "
                "default target; embeddings, slide embeddings, phenotypes (numbered, not named), clustering, slide "
                "neighbours and few-shot on the sheet's labels are made",
                model,
                config["models"][model].get("backend"),
            )


def skipped_stages():
    """(stage, why) for every stage the default target leaves out for want of an input, with what would add it."""
    skipped = []
    if not config["zeroshot"]["prompt_sets"]:
        skipped.append(
            (
                "zero-shot calls, evidence heatmaps, prompt sensitivity, confusion/ROC figures and few-shot against "
                "zero-shot",
                "zeroshot.prompt_sets is empty (name a prompt set: config/prompts/*.yaml or your own file)",
            )
        )
    if not config["retrieval"]["queries"]:
        skipped.append(("text → tile retrieval galleries", "retrieval.queries is empty (add free-text queries)"))
    if not config["clinical"]:
        skipped.append(
            (
                "survival (Cox models, Kaplan–Meier curves, c-index, image + clinical c-index)",
                "no clinical table (set `clinical`)",
            )
        )
    if not config["report_alignment"]["reports"]:
        skipped.append(
            (
                "slide–report alignment (report retrieval, report-style zero-shot)",
                "report_alignment.reports is not set (a table of slide_id or patient_id and report)",
            )
        )
    elif not text_models():
        skipped.append(
            (
                "slide–report alignment (report retrieval, report-style zero-shot)",
                "no model of embedding.models has a text tower to embed the reports with",
            )
        )
    elif Path(config["slides"]).exists() and not has_train_split():
        skipped.append(
            (
                "slide–report alignment (report retrieval, report-style zero-shot)",
                f"no slide of {config['slides']} has split = train, the slides the aligner is trained on",
            )
        )
    elif Path(config["slides"]).exists() and len(train_patients()) < MIN_ALIGNMENT_PATIENTS:
        skipped.append(
            (
                "slide–report alignment (report retrieval, report-style zero-shot)",
                f"{len(train_patients())} patient(s) of {config['slides']} are in the train split; the aligner needs "
                f"at least {MIN_ALIGNMENT_PATIENTS} (2 to fit on, 1 to stop on)",
            )
        )
    if Path(config["slides"]).exists():
        if not has_labels():
            skipped.append(
                (
                    "confusion/ROC figures, prompt sensitivity and few-shot",
                    f"the cohort sheet {config['slides']} has no `label` values to evaluate against (add a `label` "
                    "column: the true class of each slide)",
                )
            )
        elif not has_train_split():
            skipped.append(
                (
                    "few-shot",
                    f"no slide of {config['slides']} has split = train, the slides its shots are drawn from (add a "
                    "`split` column: train / test)",
                )
            )
    skipped += mil_skipped()
    if Path(config["slides"]).exists() and not has_sites():
        skipped.append(
            (
                "site audit",
                f"the cohort sheet {config['slides']} has no `{config['audit']['site_column']}` values (add the "
                "hospital of each slide, or set audit.site_from: tcga_barcode for TCGA barcodes)",
            )
        )
    return skipped


def mil_skipped():
    """MIL tasks left out: none declared, or a task whose label column the sheet lacks (or leaves empty)."""
    if not config["mil"]["tasks"]:
        return [("MIL (ABMIL and mean pooling)", "mil.tasks is empty (declare a task: a label column and its classes)")]
    if not Path(config["slides"]).exists():
        return []
    ready = mil_tasks_ready()
    return [
        (
            f"MIL task {name}",
            f"the cohort sheet {config['slides']} has no `{task['label_column']}` values to train on (add the column)",
        )
        for name, task in config["mil"]["tasks"].items()
        if name not in ready
    ]


@functools.cache
def skipped_stages_note():
    """One log line per stage left out of the default target and why, once per planning run (not in every job)."""
    if workflow.exec_mode != ExecMode.DEFAULT:
        return
    for stage, why in skipped_stages():
        logging.getLogger("histoclip").warning("left out of the default target: %s: %s", stage, why)


def prompt_set_names():
    return [Path(p).stem if p.endswith((".yaml", ".yml", ".json")) else p for p in config["zeroshot"]["prompt_sets"]]


def config_part(section, keys):
    """A rule's settings param: ``keys`` of config ``section`` and the seed, at their config paths, which is what
    every ``Settings.from_config`` of the library reads (so the seed reaches every script one way)."""
    return {"seed": config["seed"], section: dict(keys)}


def figure_style(wildcards=None):
    """The shared figure style (config key ``figures``, style keys only): a params entry of every figure rule."""
    return {"figures": {k: config["figures"][k] for k in ("width_in", "height_in", "dpi", "font_size", "formats", "report_px")}}


def figure_outputs(stem, *, caption, category, subcategory=None, name=None, labels=None, tissue_images=False):
    """Named outputs of one figure: ``{stem}.{fmt}`` for each configured format plus ``{stem}.tsv`` (its source
    data). The PNG (or, without one, the first format) goes into the HTML report with ``caption``
    (config/report/); keys are the formats, prefixed with ``{name}_`` when a rule draws several figures.
    ``tissue_images``: a figure made of tissue images (a gallery) goes into the report as its JPEG copy at
    figures.report_px (``{stem}.report.jpg``, key ``report``; save_figure's report_copy), not as the PNG."""
    formats = list(config["figures"]["formats"])
    shown = None if tissue_images else "png" if "png" in formats else formats[0]
    prefix = f"{name}_" if name else ""
    outputs = {}
    for fmt in [*formats, "tsv", *(["report.jpg"] if tissue_images else [])]:
        path = f"{stem}.{fmt}"
        if fmt == shown or fmt == "report.jpg":
            path = report(
                path,
                caption=f"../config/report/{caption}",
                category=category,
                subcategory=subcategory,
                labels=labels,
            )
        outputs[f"{prefix}{fmt.removesuffix('.jpg')}"] = path
    return outputs


# --- shard rules (tiling, embedding) are made at parse time with constant output paths: see
# docs/architecture.md, "Planning".


def rule_name(*parts):
    """A rule name from a stage, model, prompt set and shard (anything outside [A-Za-z0-9_] becomes _)."""
    return "_".join(re.sub(r"[^A-Za-z0-9_]", "_", part) for part in parts)


def shard_runtime(n_slides, minutes_per_slide):
    """Walltime (minutes) of a shard job that works ``threads`` slides at a time, growing with the attempt. A
    function that makes the callable, so that each shard rule binds its own ``n_slides``."""
    return lambda wildcards, threads, attempt: minutes_per_slide * -(-n_slides // threads) * attempt


def wildcards_for(**values):
    """A wildcards object for an input function called outside a job (e.g. a model named outright at parse time)."""
    return SimpleNamespace(**values)


# --- targets


def all_outputs(wildcards):
    image_only_note()
    skipped_stages_note()
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
        *mil_outputs(),
        *survival_tables(),
        *survival_figures(),
        *export_outputs(),
        *report_alignment_outputs(),
        *survival_multimodal_outputs(),
        *audit_outputs(),
    ]


def figure_files(wildcards=None):
    """Every figure of the default target (each stands for its files by its source-data TSV): the `figures`
    target, and what the HTML report shows."""
    figures = [
        path
        for path in all_outputs(wildcards)
        if path.startswith("results/figures/") or Path(path).name == "evidence.tsv"
    ]
    if Path(config["slides"]).exists():
        figures += expand(
            "results/retrieval/{model}/text_to_tiles/{slug}.tsv", model=text_models(), slug=retrieval_query_slugs()
        )
    return figures
