"""Rule logs: a line a job logs is printed once to stderr and written once to its log file, whether or not a
library (open_clip, timm) has configured the root logger."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

from histoclip.logs import rule_log

#: How libraries configure the root logger: nothing; open_clip's ``logging.info`` (which runs ``basicConfig``
#: when the root has no handler, as its model factory does while a model loads); timm's own root handler.
ROOT_SETUPS = {
    "none": "",
    "open_clip": "logging.info('Loaded ViT-B-32 model config.')",
    "timm": "logging.root.addHandler(logging.StreamHandler()); logging.root.setLevel(logging.INFO)",
}


@pytest.mark.parametrize("setup", sorted(ROOT_SETUPS))
def test_a_line_is_printed_once(tmp_path, setup):
    """In a fresh process, as a rule script runs: the root logger is configured inside the block, as it is when
    open_clip loads a model there."""
    log_path = tmp_path / "job.log"
    script = textwrap.dedent(
        f"""
        import logging
        from histoclip.logs import rule_log
        with rule_log({str(log_path)!r}, "histoclip.job"):
            {ROOT_SETUPS[setup]}
            logging.getLogger("histoclip.embedding.embed").info("slide s1: 12 tiles")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stderr.count("slide s1: 12 tiles") == 1, done.stderr
    assert "INFO:histoclip" not in done.stderr
    assert log_path.read_text().count("slide s1: 12 tiles") == 1


def test_propagation_is_restored_after_the_block(tmp_path, capsys):
    """Outside a rule log the histoclip logger propagates again (tests read it through the root's handlers)."""
    histoclip_logger = logging.getLogger("histoclip")
    before = histoclip_logger.propagate
    with rule_log(tmp_path / "job.log"):
        logging.getLogger("histoclip.x").info("inside")
    assert histoclip_logger.propagate is before
    assert capsys.readouterr().err.count("inside") == 1
