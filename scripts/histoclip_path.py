"""Put the workflow's own library (src/) first on sys.path for rule scripts.

Snakemake adds this folder to sys.path of every script; importing this module first means a job finds the
histoclip that sits beside the Snakefile it runs, also inside a per-rule conda env or on a cluster node
where histoclip was never pip-installed.
"""

import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)
