"""Put the workflow's own library (src/) first on sys.path for rule scripts.

rules/common.smk puts this folder on the Snakemake process's sys.path, which Snakemake hands on to every rule
script (scripts/{stage}/*.py); importing this module first means a job finds the histoclip that sits beside
the Snakefile it runs, also inside a per-rule conda env or on a cluster node where histoclip was never
pip-installed, and never another checkout's (an editable install of a second clone, or PYTHONPATH, puts that
clone's src/ on the job's path before the one Snakemake hands on). Should histoclip already have been imported
from elsewhere before this runs, the job stops with both paths rather than run the other code.
"""

import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
if SRC in sys.path:  # Snakemake appended it, after any other installed histoclip: move it to the front
    sys.path.remove(SRC)
sys.path.insert(0, SRC)
_loaded = sys.modules.get("histoclip")
if _loaded is not None and not Path(_loaded.__file__).resolve().is_relative_to(Path(SRC).resolve()):
    raise ImportError(
        f"histoclip was imported from {_loaded.__file__} before this workflow's own library ({SRC}): the job would "
        "run another checkout's code; import histoclip_path first in the rule script"
    )
