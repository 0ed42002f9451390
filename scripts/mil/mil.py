"""Rule mil: one MIL model cross-validated on one task: calls, evaluation, training record, attention, model."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.logs import rule_log
from histoclip.mil.settings import MilSettings, MilTask
from histoclip.mil.stage import MilOutputs, train_task

with rule_log(snakemake.log[0], "histoclip.mil") as log:
    task = MilTask.from_config(snakemake.wildcards.task, snakemake.params.task)
    out = snakemake.output
    evaluation = train_task(
        snakemake.wildcards.milmodel,
        task,
        snakemake.input.sheet,
        snakemake.input.embeddings,
        MilSettings.from_config(snakemake.params.settings),
        MilOutputs(out.calls, out.evaluation, out.training, out.model, out.attention),
    )
    ci = evaluation["ci"]["balanced_accuracy"]
    log.info(
        "%s on %s: cross-validated balanced accuracy %.3f (%.3f-%.3f) on %d slides",
        snakemake.wildcards.milmodel,
        task.name,
        evaluation["balanced_accuracy"],
        ci["low"],
        ci["high"],
        evaluation["n_scored"],
    )
