"""Benchmark: the HTML report's size (`snakemake --report`) for the demo and for a 2,000-slide cohort (prints JSON).

The report is one file with every figure and table it shows inside it, so it must not grow with the cohort:
target ≤ 20 MB whatever the number of slides. Runs the workflow's default target twice in copies of the workflow,
on the demo's config:

- the demo as shipped (220 slides of 2048² px), or an existing run of it with ``--demo-run DIR`` (e.g. the
  checkout after ``make demo``);
- a synthetic cohort of 2,000 slides (``demo.n_patients`` 2000 on slides of 512² px: about four tiles each, enough
  for every stage; small slides are what keep this run to minutes on 2 cores), with MIL trained for few epochs
  (MIL's speed is bench_mil.py's).

For each it prints the report's size, what it embeds (images, tables and their bytes), the largest files, and the
evidence figures drawn against the slides called; then the report's growth per slide between the two runs,
measured in the same run, in all and besides images (the evidence figures stop growing at their cap).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from bench_dag import copy_workflow  # noqa: E402  (this folder: the script's own)

from histoclip.html_report import embedded_files  # noqa: E402

TARGET_MB = 20.0
#: The 2,000-slide cohort: the demo's generator with more, smaller slides; shards as a cluster run would have them.
LARGE_COHORT = """\
demo: {n_patients: 2000, extra_slides: 0, slide_px: 512}
tiling: {shard_size: 500}
embedding: {shard_size: 500}
mil: {max_epochs: 5, patience: 2}
"""


def snakemake(workdir: Path, *args: str) -> float:
    """Seconds of one Snakemake call on the demo's config (plus ``extra.yaml`` when the folder has one)."""
    configs = ["config/demo.yaml", *(["extra.yaml"] if (workdir / "extra.yaml").exists() else [])]
    cmd = [sys.executable, "-m", "snakemake", *args, "--cores", "2", "--configfile", *configs]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {workdir}:\n{(result.stdout + result.stderr)[-4000:]}")
    return time.perf_counter() - start


def run_cohort(workdir: Path) -> dict[str, float]:
    """The demo cohort, the default target and the report, timed."""
    return {
        "cohort_s": round(snakemake(workdir, "demo_cohort"), 1),
        "default_target_s": round(snakemake(workdir), 1),
        "report_s": round(snakemake(workdir, "--report", "results/report.html"), 1),
    }


def describe(workdir: Path) -> dict[str, object]:
    """Size and contents of ``workdir``'s report, and the evidence selection against the calls."""
    import pandas as pd

    report = workdir / "results/report.html"
    embedded = embedded_files(report)
    kinds = embedded.assign(kind=embedded["mime_type"].str.split("/").str[0])
    evidence = pd.read_csv(workdir / "results/zeroshot/demo/demo/evidence.tsv", sep="\t")
    calls = pd.read_csv(workdir / "results/zeroshot/demo/demo/calls.tsv", sep="\t")
    return {
        "slides": int(len(pd.read_csv(workdir / "results/demo/slides.tsv", sep="\t"))),
        "report_mb": round(report.stat().st_size / 2**20, 2),
        "embedded": {
            kind: {"files": int(len(group)), "mb": round(group["encoded_bytes"].sum() / 2**20, 2)}
            for kind, group in kinds.groupby("kind")
        },
        "largest": [
            f"{r.filename} {r.encoded_bytes / 2**20:.2f} MB" for r in embedded.nlargest(5, "encoded_bytes").itertuples()
        ],
        "evidence": {
            "slides_called": int(len(calls)),
            "listed": int(len(evidence)),
            "drawn": int(evidence["drawn"].sum()),
            "by_reason": {str(k): int(v) for k, v in evidence.groupby("reason")["drawn"].sum().items()},
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-run", type=Path, help="a folder where the demo's default target has been run")
    parser.add_argument("--slides", type=int, default=2000, help="slides of the large cohort (default 2000)")
    args = parser.parse_args()
    result: dict[str, object] = {"target_mb": TARGET_MB}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.demo_run:
            demo = args.demo_run.resolve()
            snakemake(demo, "--report", "results/report.html")
            result["demo"] = describe(demo)
        else:
            demo = copy_workflow(tmp / "demo")
            result["demo"] = {**run_cohort(demo), **describe(demo)}
        large = copy_workflow(tmp / "large")
        (large / "extra.yaml").write_text(LARGE_COHORT.replace("2000", str(args.slides)))
        result["large"] = {**run_cohort(large), **describe(large)}
    small, big = result["demo"], result["large"]
    extra = max(big["slides"] - small["slides"], 1)
    result["report_bytes_per_extra_slide"] = round((big["report_mb"] - small["report_mb"]) * 2**20 / extra)
    # Besides images: the evidence figures grow until max_slides is reached, then stop; what is left grows for ever.
    besides = {name: run["report_mb"] - run["embedded"].get("image", {}).get("mb", 0.0) for name, run in result.items()
               if name in ("demo", "large")}  # fmt: skip
    result["report_bytes_per_extra_slide_besides_images"] = round((besides["large"] - besides["demo"]) * 2**20 / extra)
    result["within_target"] = bool(max(small["report_mb"], big["report_mb"]) <= TARGET_MB)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
