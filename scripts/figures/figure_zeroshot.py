"""Rule figure_zeroshot: calls.tsv → confusion matrix and ROC figures of the held-out labelled slides."""

import histoclip_path  # noqa: F401  (first: the workflow's own src/ on sys.path)

from histoclip.figures import zeroshot_confusion_figure, zeroshot_roc_figure
from histoclip.formats import read_calls
from histoclip.logs import rule_log
from histoclip.plots import FigureStyle, save_figure

with rule_log(snakemake.log[0], "histoclip.figures") as log:
    style = FigureStyle.from_config(snakemake.params.style)
    calls = read_calls(snakemake.input.calls)
    name = f"{snakemake.wildcards.model} / {snakemake.wildcards.promptset}"
    for kind, title, draw in (
        ("confusion", "Zero-shot calls", zeroshot_confusion_figure),
        ("roc", "Zero-shot ROC", zeroshot_roc_figure),
    ):
        figure, data = draw(calls, style, title=f"{title}: {name}")
        stem = snakemake.output[f"{kind}_tsv"].removesuffix(".tsv")
        log.info("wrote %s", ", ".join(map(str, save_figure(figure, stem, style, data=data, title=name))))
