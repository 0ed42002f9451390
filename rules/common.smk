# Config validation, the cohort sheet, input functions and wildcard constraints.
# Kept cheap: every cluster job re-parses this file. The sheet is read (and its files checked for existence)
# only when a rule needs it, and never are slides opened here.
import functools
import logging
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))  # the library beside this Snakefile

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
    records = read_cohort_sheet(config["slides"])
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


def slide_record(wildcards):
    try:
        return cohort()[wildcards.slide]
    except KeyError:
        raise ValueError(
            f"slide {wildcards.slide!r} is not in the cohort sheet {config['slides']}: "
            "add it to the sheet or ask for a slide that is there"
        ) from None


def slide_path(wildcards):
    return str(slide_record(wildcards).path)


def tiling_settings(wildcards):
    """Everything that decides a slide's tile grid: a change here re-tiles the slide (params rerun trigger)."""
    record = slide_record(wildcards)
    return {
        "patient_id": record.patient_id,
        "sheet_mpp": record.mpp,
        "on_slide_error": config["on_slide_error"],
        "tiling": config["tiling"],
        "tissue": config["tissue"],
        "mpp": config["mpp"],
        "qc_thumbnail_px": config["qc"]["thumbnail_px"],
    }


def tile_files(wildcards=None):
    return expand("results/tiles/{slide}.parquet", slide=slide_ids())


def qc_thumbnails(wildcards=None):
    return expand("results/qc/{slide}.png", slide=slide_ids())


def all_outputs(wildcards):
    return [
        "results/qc/cohort.tsv",
        *qc_thumbnails(),
        *embedding_files(),
        *zeroshot_calls(),
        "results/figures/cohort_qc.tsv",
        *zeroshot_figures(),
    ]


def embedding_models():
    return list(config["embedding"]["models"])


def model_entry(wildcards):
    return config["models"][wildcards.model]


def embedding_shards():
    """{shard name: slide ids}: fixed-size chunks of the sheet, in sheet order (appending slides to the
    sheet only changes the last shard). Empty while the sheet doesn't exist yet (the demo before
    `snakemake demo_cohort`). Reading the sheet here is cheap; no slide is opened."""
    if not Path(config["slides"]).exists():
        return {}
    ids = slide_ids()
    size = config["embedding"]["shard_size"]
    return {f"shard{start // size:05d}": ids[start : start + size] for start in range(0, len(ids), size)}


def embedding_files(wildcards=None):
    return expand("results/embeddings/{model}/{slide}.parquet", model=embedding_models(), slide=slide_ids())


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


def model_embeddings(wildcards):
    return expand("results/embeddings/{model}/{slide}.parquet", model=wildcards.model, slide=slide_ids())


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
    return {k: config["figures"][k] for k in ("width_in", "height_in", "dpi", "font_size", "formats")}


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
