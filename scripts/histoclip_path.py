"""Put the workflow's own library (src/) first on sys.path for rule scripts.

rules/common.smk puts this folder on the Snakemake process's sys.path, which Snakemake hands on to every rule
script (scripts/{stage}/*.py); importing this module first means a job finds the histoclip that sits beside
the Snakefile it runs, also inside a per-rule conda env or on a cluster node where histoclip was never
pip-installed.
"""

import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
if SRC in sys.path:  # Snakemake appended it, after any other installed histoclip: move it to the front
    sys.path.remove(SRC)
sys.path.insert(0, SRC)
