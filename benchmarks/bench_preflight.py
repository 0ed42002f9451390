"""Preflight speed: seconds per 1,000 slides (target: seconds, not minutes).

A cohort of ``--slides`` entries (default 1,000) is made of symbolic links, each under its own name, to a few
small slides: three synthetic pyramidal JPEG-tiled TIFFs (histoclip.demo, like the demo's) and, when
../shared/data is there, the real Aperio CMU-1-Small-Region.svs. The preflight opens every entry, resolves its
mpp, sizes its tissue level and decodes two tiles, as it would for a real cohort. The slide files are few, so
they sit in the page cache: this measures the preflight's own cost, not a cold network file system's latency.

Prints JSON: seconds for the slide checks with all cores and with one thread (their ratio is measured in the
same run), seconds per 1,000 slides, and the whole preflight (sheet, prompts, model check included).

    .venv/bin/python benchmarks/bench_preflight.py [--slides 1000] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from histoclip.config import default_config, load_yaml  # noqa: E402
from histoclip.demo import write_pyramid_tiff  # noqa: E402
from histoclip.preflight import SlideSettings, check_sheet, check_slides, run_preflight  # noqa: E402

SHARED = Path(os.environ.get("HISTOCLIP_SHARED_DATA", REPO.parent / "shared" / "data"))


def make_sources(folder: Path) -> list[Path]:
    sources = []
    rng = np.random.default_rng(0)
    for i, side in enumerate((2048, 3072, 4096)):
        rgb = np.full((side, side, 3), 240, np.uint8)
        tissue = rng.integers(60, 230, (side // 2, side // 2, 3), dtype=np.uint8)
        tissue[..., 1] //= 2
        rgb[side // 4 : side * 3 // 4, side // 4 : side * 3 // 4] = tissue
        path = folder / f"source{i}.tiff"
        write_pyramid_tiff(path, rgb, mpp=0.5)
        sources.append(path)
    real = SHARED / "svs" / "CMU-1-Small-Region.svs"
    if real.exists():
        sources.append(real)
    return sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-preflight-") as tmp:
        folder = Path(tmp)
        sources = make_sources(folder)
        (folder / "slides").mkdir()
        rows = ["slide_id\tpatient_id\tpath"]
        for i in range(args.slides):
            link = folder / "slides" / f"slide{i:05d}{sources[i % len(sources)].suffix}"
            link.symlink_to(sources[i % len(sources)])
            rows.append(f"slide{i:05d}\tP{i // 2:05d}\tslides/{link.name}")
        sheet = folder / "slides.tsv"
        sheet.write_text("\n".join(rows) + "\n")

        start = time.perf_counter()
        records, problems = check_sheet(sheet)
        sheet_seconds = time.perf_counter() - start
        assert len(records) == args.slides and not problems, problems

        settings = SlideSettings.from_config(default_config())
        check_slides(records[: len(sources)], settings, 1)  # warm the page cache and the imports
        start = time.perf_counter()
        checks = check_slides(records, settings, args.threads)
        parallel = time.perf_counter() - start
        start = time.perf_counter()
        check_slides(records, settings, 1)
        serial = time.perf_counter() - start
        assert all(check.status == "ok" for check in checks), [c.problems for c in checks if c.status != "ok"][:3]

        config = load_yaml(REPO / "config" / "demo.yaml")
        config.update(slides=str(sheet), clinical=None)
        config["embedding"] = {"models": ["tiny"]}
        config["zeroshot"] = {"prompt_sets": ["nsclc"]}
        os.chdir(folder)
        start = time.perf_counter()
        report = run_preflight(config, search_dirs=[".", REPO], threads=args.threads, results_dir=folder / "results")
        whole = time.perf_counter() - start

    per_thousand = parallel / args.slides * 1000
    print(
        json.dumps(
            {
                "slides": args.slides,
                "distinct_files": len(sources),
                "threads": args.threads,
                "sheet_seconds": round(sheet_seconds, 3),
                "slide_checks_seconds": round(parallel, 3),
                "slide_checks_seconds_1_thread": round(serial, 3),
                "thread_speedup": round(serial / parallel, 2),
                "seconds_per_1000_slides": round(per_thousand, 2),
                "ms_per_slide": round(parallel / args.slides * 1000, 2),
                "whole_preflight_seconds": round(whole, 2),
                "whole_preflight_problems": len(report.problems),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
