"""Benchmark: how long Snakemake takes to plan a large cohort (prints JSON).

Builds cohort sheets of 1,000 and 10,000 slides (every slide a symbolic link to one small file: planning
only checks that files exist, nothing opens a slide) in a copy of the workflow, and times
`snakemake -n` for the default target with the default config, as a user types it, plus
`snakemake -n --workflow-profile config/profiles/slurm` (as on a cluster). Every cluster
job re-parses the Snakefile, so parse time is reported too (`snakemake -n` of one tile file), and so is a
workflow of as many one-line jobs, timed in the same run: Snakemake's own floor on this machine at this
moment (a shared machine's load shows in both).
Target: ≤ 20 s for 10,000 slides on 2 cores. `--cprofile FILE` writes and summarises a cProfile of the largest
plain run, to find what is slow.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 20.0


def make_cohort(folder: Path, n_slides: int) -> tuple[Path, Path]:
    """A sheet of ``n_slides`` slides (two per patient) and a clinical table, in ``folder``."""
    slides = folder / "slides"
    slides.mkdir(parents=True)
    (folder / "one.tiff").write_bytes(b"II*\x00")  # never opened while planning
    sheet_rows, patients = [], {}
    for i in range(n_slides):
        link = slides / f"S{i:06d}.tiff"
        link.symlink_to(folder / "one.tiff")
        patient = f"P{i // 2:06d}"
        patients[patient] = (i % 97 + 1, i % 2)
        sheet_rows.append(f"S{i:06d}\t{patient}\tslides/{link.name}\n")
    sheet = folder / "slides.tsv"
    sheet.write_text("slide_id\tpatient_id\tpath\n" + "".join(sheet_rows))
    clinical = folder / "clinical.tsv"
    clinical.write_text("patient_id\ttime\tevent\n" + "".join(f"{p}\t{t}\t{e}\n" for p, (t, e) in patients.items()))
    return sheet, clinical


def copy_workflow(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in ("Snakefile", "rules", "scripts", "config", "src", "envs"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / name)
    return dest


def dry_run(workdir: Path, sheet: Path, clinical: Path, *extra: str, targets=()) -> tuple[float, int, str]:
    """Seconds of `snakemake -n`, the number of jobs it planned, and its output."""
    cmd = [sys.executable, "-m", "snakemake", *targets, "-n", "--cores", "2", "--configfile", "config/demo.yaml",
           "--config", f"slides={sheet}", f"clinical={clinical}", *extra]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    out = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-4000:]}")
    total = re.search(r"^total\s+(\d+)", out, flags=re.M)
    return seconds, int(total[1]) if total else 0, out


def trivial_dry_run(folder: Path, n_jobs: int) -> float:
    """Seconds of `snakemake -n --quiet` for ``n_jobs`` one-line jobs: Snakemake's own floor on this machine now.

    Measured in the same run, so that a loaded, shared machine reads as a ratio, not as a slow workflow.
    """
    folder.mkdir(parents=True)
    (folder / "Snakefile").write_text(
        f'rule all:\n    input: expand("out/{{i}}.txt", i=range({n_jobs}))\n\n'
        'rule one:\n    output: "out/{i}.txt"\n    shell: "touch {output}"\n'
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", "-n", "--quiet", "--cores", "1"], cwd=folder, check=True,
                   capture_output=True)  # fmt: skip
    return time.perf_counter() - start


def profile_run(workdir: Path, sheet: Path, clinical: Path, out: Path) -> str:
    """cProfile of one plain dry run, in this process; the top functions by cumulative time."""
    from snakemake.cli import main as snakemake_main

    argv = ["snakemake", "-n", "--quiet", "--cores", "2", "--configfile", "config/demo.yaml"]
    argv += ["--config", f"slides={sheet}", f"clinical={clinical}"]
    old_argv, old_cwd = sys.argv, Path.cwd()
    sys.argv = argv
    os.chdir(workdir)
    profiler = cProfile.Profile()
    try:
        profiler.runcall(snakemake_main)
    except SystemExit:
        pass
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    profiler.dump_stats(out)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--cprofile", metavar="FILE", help="write a cProfile of the largest plain dry run here")
    args = parser.parse_args()
    report: dict[str, object] = {"target_s": TARGET_S}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = []
        for n in args.sizes:
            workdir = copy_workflow(tmp / f"wf{n}")
            (workdir / "results").mkdir()
            sheet, clinical = make_cohort(tmp / f"cohort{n}", n)
            plain_s, jobs, _ = dry_run(workdir, sheet, clinical)
            quiet_s, _, _ = dry_run(workdir, sheet, clinical, "--quiet")
            profile = str(workdir / "config/profiles/slurm")
            slurm_s, slurm_jobs, _ = dry_run(workdir, sheet, clinical, "--workflow-profile", profile, "--quiet")
            one_s, _, _ = dry_run(workdir, sheet, clinical, "--quiet", targets=["results/tiles/S000000.parquet"])
            trivial_s = trivial_dry_run(tmp / f"trivial{n}", jobs)
            rows.append(
                {
                    "slides": n,
                    "jobs": jobs,
                    "dry_run_s": round(plain_s, 2),
                    "dry_run_quiet_s": round(quiet_s, 2),
                    "dry_run_slurm_profile_s": round(slurm_s, 2),
                    "one_job_s": round(one_s, 2),
                    "trivial_same_jobs_quiet_s": round(trivial_s, 2),
                    "quiet_over_trivial": round(quiet_s / trivial_s, 2),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        report["runs"] = rows
        if len(rows) >= 2:
            small, large = rows[0], rows[-1]
            report["ratio_large_over_small"] = round(large["dry_run_s"] / small["dry_run_s"], 2)
            report["slides_ratio"] = large["slides"] / small["slides"]
        report["largest_within_target"] = rows[-1]["dry_run_s"] <= TARGET_S
        if args.cprofile:
            n = args.sizes[-1]
            summary = profile_run(tmp / f"wf{n}", tmp / f"cohort{n}/slides.tsv", tmp / f"cohort{n}/clinical.tsv",
                                  Path(args.cprofile).resolve())  # fmt: skip
            print(summary, file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
