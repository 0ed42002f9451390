"""The ``histoclip`` command: ``histoclip check`` runs the preflight (histoclip.preflight) outside Snakemake;
``histoclip convert IN OUT.tiff`` rewrites a slide as a pyramidal tiled TIFF (histoclip.tiling.convert);
``histoclip deploy MODEL --sheet … --embeddings … --out …`` calls a cohort with a saved MIL model (histoclip.mil).

The config is put together the way the Snakefile has Snakemake do it, so that the check sees exactly what a
run would: the ``--configfile`` files merged in order, or ``config/config.yaml`` of the working directory when
none is given (a config file replaces it whole), then ``--config KEY=VALUE`` (parsed by Snakemake's own
parser). Exit status: 0 when nothing would stop the run,
1 when the preflight found an error (after writing the table), 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from histoclip.config import SCHEMA_PATH, load_yaml
from histoclip.errors import InputError

#: The workflow folder this library belongs to (config/prompts, config/models are looked up here too).
WORKFLOW_DIR = SCHEMA_PATH.parents[2]


def merged_config(configfiles: Sequence[str], entries: Sequence[str], base: str | Path | None) -> dict[str, Any]:
    """``configfiles`` (or ``base``, the Snakefile's configfile, when there are none), then ``--config`` entries."""
    from snakemake.cli import parse_config
    from snakemake.utils import update_config

    config: dict[str, Any] = {}
    files = list(configfiles) or ([base] if base is not None and Path(base).exists() else [])
    for path in files:
        loaded = load_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise InputError("is not a mapping of config keys", where=str(path), fix="see config/config.yaml")
        update_config(config, loaded)
    update_config(config, parse_config(list(entries)))
    return config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="histoclip", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "check",
        help="check a cohort before a run: config, sheet, clinical table, prompt sets, model weights, every slide",
        description="Open every slide, resolve its mpp, read a tile; validate the sheet, the clinical table, the "
        "prompt sets, the config and the model weights; write one line per problem. No GPU is used.",
    )
    check.add_argument("--directory", "-d", default=".", help="working directory of the run (default: .)")
    check.add_argument(
        "--configfile", nargs="+", default=[], help="config file(s), merged in order; they replace config/config.yaml"
    )
    check.add_argument("--config", nargs="+", default=[], metavar="KEY=VALUE", help="top-level config overrides")
    check.add_argument("--out", default="results/preflight.tsv", help="problem table (TSV)")
    check.add_argument("--slides-out", default="results/preflight_slides.tsv", help="per-slide table (TSV)")
    check.add_argument("--threads", type=int, default=None, help="threads opening slides (default: all cores)")
    convert = commands.add_parser(
        "convert",
        help="rewrite a slide (or a plain PNG/JPEG image) as a pyramidal JPEG-tiled TIFF that OpenSlide reads",
        description="Read IN with the slide readers (OpenSlide, wsidicom, pydicom, tifffile, pylibCZIrw) or Pillow, "
        "and write OUT as a pyramidal tiled TIFF, keeping its mpp; memory stays bounded for slides of any size.",
    )
    convert.add_argument("input", help="the slide or image to convert")
    convert.add_argument("output", help="the pyramidal TIFF to write (e.g. slide.tiff)")
    convert.add_argument("--mpp", type=float, default=None, help="level-0 µm per pixel (default: the input's own)")
    convert.add_argument("--tile", type=int, default=256, help="tile size in pixels (default: 256)")
    convert.add_argument("--quality", type=int, default=90, help="JPEG quality (default: 90)")
    deploy = commands.add_parser(
        "deploy",
        help="call a cohort's slides with a trained MIL model (results/mil/{model}/{task}/{mil}/model.safetensors)",
        description="Read each slide's embedding file (listed by an embedding manifest, "
        "results/embeddings/{model}.tsv, of embeddings made with the weights the model was trained on) and write the "
        "calls table; scored when the sheet has the model's label column.",
    )
    deploy.add_argument("model", help="the saved MIL model (model.safetensors)")
    deploy.add_argument("--sheet", required=True, help="cohort sheet of the slides to call")
    deploy.add_argument("--embeddings", required=True, help="embedding manifest (slide_id, path) of those slides")
    deploy.add_argument("--out", required=True, help="calls table to write (TSV)")
    deploy.add_argument("--attention", default=None, help="folder for per-slide attention files (default: none)")
    deploy.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    return parser


def deploy(args: argparse.Namespace) -> int:
    from histoclip.mil.stage import deploy_cohort

    try:
        evaluation = deploy_cohort(
            args.model, args.sheet, args.embeddings, args.out, attention=args.attention, device=args.device
        )
    except (InputError, ValueError) as exc:
        print(f"histoclip deploy: {exc}", file=sys.stderr)
        return 1
    print(f"calls written to {args.out}")
    if evaluation is not None:
        ci = evaluation["ci"]["balanced_accuracy"]
        print(
            f"balanced accuracy {evaluation['balanced_accuracy']:.3f} ({ci['low']:.3f}-{ci['high']:.3f}) on "
            f"{evaluation['n_scored']} labelled slides"
        )
    return 0


def convert(args: argparse.Namespace) -> int:
    from histoclip.tiling.convert import convert_to_pyramid_tiff

    try:
        result = convert_to_pyramid_tiff(args.input, args.output, mpp=args.mpp, tile=args.tile, quality=args.quality)
    except (InputError, ValueError) as exc:
        print(f"histoclip convert: {exc}", file=sys.stderr)
        return 1
    print(result.describe())
    return 0


def check(args: argparse.Namespace) -> int:
    from histoclip.preflight import describe, run_preflight, write_report

    os.chdir(args.directory)
    source = " + ".join([*(args.configfile or ["config/config.yaml"]), *(["--config"] if args.config else [])])
    try:
        config = merged_config(args.configfile, args.config, "config/config.yaml")
    except (InputError, ValueError) as exc:
        print(f"histoclip check: {exc}", file=sys.stderr)
        return 2
    results = Path(args.out).parent
    report = run_preflight(
        config, search_dirs=[".", WORKFLOW_DIR], threads=args.threads, results_dir=results, source=source
    )
    write_report(report, args.out, args.slides_out)
    print(describe(report, args.out), file=sys.stderr if not report.ok else sys.stdout)
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        return check(args)
    if args.command == "convert":
        return convert(args)
    if args.command == "deploy":
        return deploy(args)
    return 2  # pragma: no cover - argparse refuses unknown commands


if __name__ == "__main__":
    sys.exit(main())
