"""Benchmark: tissue detection + tile grid on a synthetic 100,000 × 100,000 px pyramidal slide.

Run by hand (`make bench`); prints JSON. Target on the 2-core dev machine: ≤ 10 s for tile_slide.
Writing the slide is timed separately and is not part of the target.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from histoclip.demo import write_large_slide
from histoclip.tiling.grid import tile_slide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--level0-px", type=int, default=100_000)
    parser.add_argument("--mpp", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "large.tiff"
        start = time.perf_counter()
        write_large_slide(path, level0_px=args.level0_px, mpp=args.mpp)
        write_s = time.perf_counter() - start
        timings = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            tiling = tile_slide(path, "large")
            timings.append(time.perf_counter() - start)
        print(
            json.dumps(
                {
                    "benchmark": "tissue detection + tile grid",
                    "level0_px": args.level0_px,
                    "level0_mpp": args.mpp,
                    "slide_bytes": path.stat().st_size,
                    "write_slide_s": round(write_s, 2),
                    "tile_slide_s": [round(t, 3) for t in timings],
                    "tile_slide_best_s": round(min(timings), 3),
                    "target_s": 10.0,
                    "tissue_level": tiling.tissue_level,
                    "tissue_mask_px": list(tiling.mask.shape),
                    "read_level": tiling.read_level,
                    "n_tiles": len(tiling.grid),
                    "tissue_area_mm2": round(tiling.tissue_area_mm2, 2),
                    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
