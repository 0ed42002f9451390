"""Small synthetic cohorts of real embedding files with a known answer, shared by the MIL, survival and audit
tests: which class a slide is, and which of its tiles carry it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from histoclip.formats import EmbeddingFileWriter, write_embedding_manifest

SHA = "ab" * 32


def write_bag(path: Path, slide_id: str, features: np.ndarray, sha: str = SHA) -> None:
    """One slide's embedding file (float16, as the embedding stage writes it) on a tile grid of 224 px."""
    n = len(features)
    x = (np.arange(n) % 10) * 224
    y = (np.arange(n) // 10) * 224
    meta = {"slide_id": slide_id, "model_name": "synthetic", "weights_sha256": sha, "dim": features.shape[1]}
    writer = EmbeddingFileWriter(path, x, y, features.shape[1], "float16", meta, row_group_rows=64)
    writer.add(features)
    writer.commit(slide_id)


def signal_cohort(
    root: Path, *, n_patients: int = 24, dim: int = 16, seed: int = 0, sha: str = SHA, key_fraction: float = 0.1
) -> tuple[Path, Path, pd.DataFrame]:
    """A cohort where a slide of class ``b`` has a few key tiles pointing along axis 0, one of class ``a`` along
    axis 1, and every other tile is noise. Every third patient has two slides. Returns (sheet, manifest, truth:
    slide_id, patient_id, label, key tile indices)."""
    rng = np.random.default_rng(seed)
    rows, truth = [], []
    (root / "emb").mkdir(parents=True, exist_ok=True)
    for p in range(n_patients):
        label = "ab"[p % 2]
        for s in range(2 if p % 3 == 0 else 1):
            slide_id = f"p{p:02d}-s{s}"
            n = int(rng.integers(40, 80))
            features = rng.normal(0, 1, (n, dim))
            keys = rng.choice(n, max(1, int(key_fraction * n)), replace=False)
            features[keys, 0 if label == "b" else 1] += 4.0
            features /= np.linalg.norm(features, axis=1, keepdims=True)
            write_bag(root / "emb" / f"{slide_id}.parquet", slide_id, features, sha)
            rows.append(
                {
                    "slide_id": slide_id,
                    "patient_id": f"P{p:02d}",
                    "path": "x.svs",
                    "label": label,
                    "split": "train" if p < n_patients // 3 else "test",
                }
            )
            truth.append({"slide_id": slide_id, "keys": set(keys.tolist())})
    sheet = pd.DataFrame(rows)
    (root / "x.svs").write_bytes(b"")
    sheet.to_csv(root / "slides.tsv", sep="\t", index=False)
    write_embedding_manifest(
        root / "manifest.tsv", sheet["slide_id"], [root / "emb" / f"{s}.parquet" for s in sheet["slide_id"]]
    )
    return root / "slides.tsv", root / "manifest.tsv", sheet.merge(pd.DataFrame(truth), on="slide_id")
