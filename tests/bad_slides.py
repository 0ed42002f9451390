"""Slide files, good and broken in specific ways, and a small workflow runner: shared by the reliability tests
(test_preflight, test_bad_inputs, test_safety, test_crash_safety, test_determinism).

Every broken file is made the way it breaks in practice: a copy cut short, JPEG tile data overwritten, a
plain (strip) TIFF, a pyramid without physical resolution. OpenSlide opens or refuses them for real.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import tifffile

from histoclip.demo import write_pyramid_tiff

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
#: The demo's settings, which the tests' own config files adjust. A --configfile replaces config/config.yaml (the
#: real-cohort template) whole, so every run of a test names this file first.
DEMO_CONFIG = "config/demo.yaml"


def on_demo_config(args: Sequence[str]) -> list[str]:
    """``args`` (of ``snakemake`` or ``histoclip check``) with config/demo.yaml as the first config file: put in
    front of the test's own --configfile files (merged over it in order), or added when there are none."""
    args = list(args)
    if "--configfile" in args:
        at = args.index("--configfile") + 1
        return [*args[:at], DEMO_CONFIG, *args[at:]]
    return [*args, "--configfile", DEMO_CONFIG]


def textured_rgb(side: int = 1024, seed: int = 0) -> np.ndarray:
    """Glass with a saturated pink-purple block of random texture in the middle (tissue for the detector)."""
    rng = np.random.default_rng(seed)
    rgb = np.full((side, side, 3), 240, np.uint8)
    tissue = rng.integers(60, 230, (side // 2, side * 3 // 4, 3), dtype=np.uint8)
    tissue[..., 1] //= 2
    rgb[side // 4 : side * 3 // 4, side // 8 : side * 7 // 8] = tissue
    return rgb


def good_slide(path: Path, side: int = 1024, seed: int = 0, mpp: float | None = 0.5) -> Path:
    write_pyramid_tiff(path, textured_rgb(side, seed), mpp=mpp)
    return path


def truncated_slide(path: Path, fraction: float = 0.9, side: int = 1024) -> Path:
    """A pyramid cut short, as by an interrupted copy."""
    good_slide(path, side)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def corrupt_tiles_slide(path: Path, side: int = 2048, rows: Sequence[int] = (3, 4)) -> Path:
    """A pyramid whose level-0 JPEG tiles in tile rows ``rows`` are overwritten with noise: it opens, tissue
    detection (a coarse level) works, and reading those level-0 tiles fails."""
    good_slide(path, side)
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        per_row = -(-page.imagewidth // page.tilewidth)
        for index, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts, strict=True)):
            if index // per_row in rows:
                noise = np.random.default_rng(index).integers(0, 256, count - count // 3, dtype=np.uint8)
                data[offset + count // 3 : offset + count] = noise.tobytes()
    path.write_bytes(bytes(data))
    return path


def blank_slide(path: Path, side: int = 1024) -> Path:
    """Empty glass: a pyramid with no tissue at all."""
    write_pyramid_tiff(path, np.full((side, side, 3), 238, np.uint8), mpp=0.5)
    return path


def strip_tiff(path: Path, side: int = 512) -> Path:
    """A single-level, untiled RGB TIFF (a photo or an export, not a whole-slide image)."""
    tifffile.imwrite(
        path, textured_rgb(side), photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER", metadata=None
    )
    return path


def text_file(path: Path, text: str = "hello, this is not a slide\n") -> Path:
    """A text file under a slide's name (a renamed note, an error page saved by a failed download)."""
    path.write_text(text)
    return path


def plain_png(path: Path, side: int = 512) -> Path:
    """A plain PNG image: no pyramid, no resolution (a screenshot or photo of a slide)."""
    from PIL import Image

    Image.fromarray(textured_rgb(side)).save(path)
    return path


def single_level_tiled(path: Path, side: int, tile: int = 512) -> Path:
    """A tiled but single-level TIFF of ``side`` × ``side`` pixels (tiles streamed: no full image in memory)."""
    block = textured_rgb(tile, seed=1)

    def tiles():
        for _ in range((-(-side // tile)) ** 2):
            yield block

    tifffile.imwrite(
        path,
        tiles(),
        shape=(side, side, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression="jpeg",
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
        metadata=None,
    )
    return path


def write_sheet(path: Path, rows: Sequence[Sequence[str]], header: Sequence[str] = ("slide_id", "patient_id", "path")):
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n")
    return path


def write_clinical(path: Path, rows: Sequence[Sequence[str]]) -> Path:
    return write_sheet(path, rows, ("patient_id", "time", "event"))


# --- running the workflow in a copy ---------------------------------------------------------------------------------


def copy_workflow(dest: Path, repo: Path = REPO) -> Path:
    """The workflow (not its results) copied to ``dest``, as tests/test_workflow.py does."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "rules", "scripts", "config", "src", "envs"):
        src = repo / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(src, dest / name)
    return dest


def snakemake(
    workdir: Path, *args: str, check: bool = True, cores: int = 2, timeout: float = 900, demo: bool = True
) -> subprocess.CompletedProcess:
    """Run Snakemake in ``workdir``; on the demo's config (with the test's files over it) unless ``demo`` is False."""
    argv = on_demo_config(args) if demo else list(args)
    result = subprocess.run(
        [*SNAKEMAKE, *argv, "--cores", str(cores)], cwd=workdir, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def kill_when(
    workdir: Path, args: Sequence[str], ready: Callable[[], bool], cores: int = 2, limit: float = 300
) -> bool:
    """Start snakemake, SIGKILL its whole process group (snakemake, job scripts, loader workers) as soon as
    ``ready()`` holds; True if it was killed, False if it finished first."""
    log = open(workdir / "killed-run.log", "ab")  # noqa: SIM115 - closed below, after the process
    process = subprocess.Popen(
        [*SNAKEMAKE, *on_demo_config(args), "--cores", str(cores)],
        cwd=workdir,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    killed = False
    try:
        deadline = time.monotonic() + limit
        while process.poll() is None and time.monotonic() < deadline:
            if ready():
                os.killpg(process.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.02)
    finally:
        if process.poll() is None and not killed:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()
    return killed
