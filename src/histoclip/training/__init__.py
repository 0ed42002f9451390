"""Contrastive training and fine-tuning of open_clip models on image–text pairs.

What it is for: the demo trains its own tiny CLIP on the synthetic cohort (offline, minutes on two cores),
and a user can fine-tune a registered model on captioned tiles of their own cohort. The result is an
open_clip ``local-dir`` model that the rest of the workflow loads like any other
(``model: local-dir:/path`` in the config, see :mod:`histoclip.embedding.models`).

The modules, in the order a run uses them:

- :mod:`~histoclip.training.pairs` — pair tables (tile, image-file and slide-level pairs), read and checked
  by :func:`~histoclip.training.pairs.read_pairs`; :mod:`~histoclip.training.captions` — captions made from
  class phrases;
- :mod:`~histoclip.training.settings` — :class:`~histoclip.training.settings.TrainSettings` and the report;
- :mod:`~histoclip.training.dataset` and :mod:`~histoclip.training.batches` — pixels and batches;
- :mod:`~histoclip.training.augment` — flips, rotations and colour jitter on the device;
- :mod:`~histoclip.training.schedule` — AdamW and the learning-rate schedule;
- :mod:`~histoclip.training.loop` — :func:`~histoclip.training.loop.train_clip`, the run;
- :mod:`~histoclip.training.held_in` — the held-in zero-shot check;
- :mod:`~histoclip.training.checkpoint` — saving the model folder.

How (and why, on a CPU):

- tiles are decoded in DataLoader worker processes, each with its own OpenSlide handles, and resized to the
  training size with PIL there; when the decoded set fits in ``cache_mb`` it is read once (all cores) and
  the steps then run from memory (measured on 2 cores: decoding and resizing a 224-px tile costs about a
  quarter of the demo model's training step on it at 112 px, and a run sees each tile ~10 times);
- augmentation (the 8 flips/90° rotations — histology has no orientation — and mild stain/brightness/
  contrast/saturation jitter) and normalisation with the model's mean/std run on the batch, on the device,
  with random numbers from a seeded CPU generator, so batches and augmentations are the same whatever the
  number of workers (a step-bounded run repeated with the same threads gives identical weights);
- loss: open_clip's ``ClipLoss`` (symmetric InfoNCE with the model's learnt temperature, clamped to a logit
  scale of at most 100), AdamW (no weight decay on gains, biases and the temperature), linear warm-up then
  cosine to 0 over the budget. The budget is ``steps`` and/or ``max_seconds`` (wall time of the whole call
  up to the last step, loading and reading included), whichever runs out first; with a time budget the
  schedule is laid over the steps the time is expected to allow at the recent step rate (see
  :class:`~histoclip.training.schedule.Progress`), so only a step-bounded run (``max_seconds=None``) is
  bit-reproducible.

Output (``out_dir``, written into a temporary folder beside it and renamed into place only when complete):
``open_clip_config.json`` (``model_cfg`` with the training image size, ``preprocess_cfg``),
``open_clip_model.safetensors``, ``loss.tsv`` (step, loss, lr, seconds), ``loss.png`` and ``train.json``
(settings, data counts, base model and its weights' sha256, results, package versions). The saved folder
is reloaded through :func:`histoclip.embedding.models.load_model` before it is renamed into place, and must give the
same embeddings as the model in memory.

A loss in the 3s is not failure: with ``k`` same-class pairs in a batch of ``B`` (the same caption or class
repeats) the contrastive loss cannot go below about ``ln(B / k)``.

The package imports no demo code: the demo cohort's training pairs and class prompts live in the demo package.
"""
