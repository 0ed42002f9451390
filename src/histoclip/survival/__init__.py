"""Survival analysis: endpoints, Cox models with clinical and image covariates, c-index, Kaplan-Meier.

The modules, in the order the analysis uses them (imports flow down this list, never up):

- ``cells``: how cells of the clinical and slide tables are read (numbers, missing markers, label order);
- ``endpoints``: time and event columns, their coding, and the CLAM/SurvPath ``censorship`` conversion;
- ``clinical``: the clinical table as it comes (its patient and endpoint columns named by the config, several
  rows per patient), read when the workflow plans a run and by the preflight;
- ``patients``: slide outputs aggregated to patients (tile-weighted means, the patient's call and cluster);
- ``settings``: the fitting options; ``terms``: the one table of model-term kinds and the design built from it;
- ``groupings``: Kaplan–Meier groupings; ``plan``: what to analyse, read when the workflow is planned;
- ``cox``: Cox fits and their table; ``cindex``: cross-validated c-index; ``km``: Kaplan–Meier and log-rank;
- ``analysis``: the whole run and its tables; ``cli``: ``python -m histoclip.survival from-censorship``;
- ``plots``: Kaplan–Meier and forest figures drawn from the written tables.

Everything is linear or n log n in patients apart from lifelines' own fitting (groupby aggregation, one sort per
fold, lifelines' n log n concordance).
"""
