"""Weakly supervised slide classification: attention-based multiple-instance learning on the tile embeddings.

The supervised reference a cohort paper sets next to zero-shot and few-shot: a model trained on slide labels
only, with patient-level cross-validation, on the same embedding files (streamed, never the cohort in memory),
scored by the zero-shot evaluation code, with attention evidence and a saved model that calls new cohorts.

Modules, from the bottom up: :mod:`~histoclip.mil.settings` (config ``mil``), :mod:`~histoclip.mil.folds`
(patient-level stratified folds), :mod:`histoclip.bags` (the streaming bag reader,
shared with the slide–report aligner), :mod:`~histoclip.mil.models`
(gated-attention MIL, mean-pooling baseline), :mod:`~histoclip.mil.train` (one model, early stopping),
:mod:`~histoclip.mil.crossval` (the k folds → calls), :mod:`~histoclip.mil.saved` (model file and deploy),
:mod:`~histoclip.mil.evidence` (attention figures), :mod:`~histoclip.mil.comparison` (zero-shot vs few-shot vs
MIL on the same held-out slides).
"""
