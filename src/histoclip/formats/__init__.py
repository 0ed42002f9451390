"""The one reader and writer of every intermediate file of the workflow.

Every stage hands its results to the next through files; each file's layout (columns, footer metadata,
encodings, what an empty or failed slide looks like) is defined here and nowhere else, so a stage never opens
another stage's file by hand. Torch- and matplotlib-free: statistics-only jobs import it (a test checks).

======================================================  ============================
file                                                    module
======================================================  ============================
``results/tiles/{slide}.parquet``                       :mod:`~histoclip.formats.tiles`
``results/qc/cohort.tsv``                               :mod:`~histoclip.formats.tiles`
``results/qc/tissue/{slide}.png`` (tissue mask)         :mod:`~histoclip.formats.tiles`
``results/embeddings/{model}/{slide}.parquet``          :mod:`~histoclip.formats.embeddings`
``results/embeddings/{model}.tsv`` (+ shard manifests)  :mod:`~histoclip.formats.embeddings`
``results/zeroshot/…/text_classifier.parquet``          :mod:`~histoclip.formats.zeroshot`
``results/zeroshot/…/tile_scores/{slide}.parquet``      :mod:`~histoclip.formats.zeroshot`
``results/zeroshot/…/calls.tsv``                        :mod:`~histoclip.formats.zeroshot`
``results/slides/{model}.parquet``                      :mod:`~histoclip.formats.cohort`
``results/mil/…/attention/{slide}.parquet``             :mod:`~histoclip.formats.mil`
``results/phenotypes/{model}/*composition.tsv``         :mod:`~histoclip.formats.cohort`
``results/phenotypes/{model}/phenotypes.tsv``           :mod:`~histoclip.formats.cohort`
``results/phenotypes/{model}/assignments/{slide}``      :mod:`~histoclip.formats.cohort` (reader)
``results/demo/class_maps/{slide}.png``                 :mod:`~histoclip.formats.class_maps`
``results/report_alignment/{model}/reports.parquet``    :mod:`~histoclip.formats.reports`
======================================================  ============================

Atomic writes and Parquet footer metadata are :mod:`histoclip.store`'s (generic); the layouts are here.
"""

from histoclip.formats.class_maps import read_class_map, read_class_map_classes, tile_classes, write_class_map
from histoclip.formats.cohort import (
    PHENOTYPE_PREFIX,
    read_composition,
    read_phenotype_assignments,
    read_phenotype_table,
    read_slide_embeddings,
    read_slide_tsv,
    slide_embedding_columns,
    vectors_column,
    write_composition,
    write_slide_embeddings,
)
from histoclip.formats.embeddings import (
    DTYPES,
    EmbeddingFileWriter,
    EmbeddingFooter,
    embedding_paths,
    embedding_schema,
    read_embedding_footer,
    read_tile_embeddings,
    write_embedding_manifest,
    write_failed_embedding_file,
)
from histoclip.formats.mil import ATTENTION_COLUMNS, read_attention, write_attention
from histoclip.formats.reports import read_report_embeddings, write_report_embeddings
from histoclip.formats.tiles import (
    COHORT_COLUMNS,
    TILE_SCHEMA,
    TissueMask,
    read_cohort_table,
    read_tile_file,
    read_tile_metadata,
    read_tile_table,
    read_tissue_mask,
    write_cohort_table,
    write_tile_file,
    write_tissue_mask,
)
from histoclip.formats.zeroshot import (
    CALLS_TEXT_COLUMNS,
    PROBABILITY_PREFIX,
    SCORE_PREFIX,
    TextClassifier,
    called_classes,
    probability_column,
    read_calls,
    read_text_classifier,
    read_tile_scores,
    read_tile_scores_metadata,
    write_calls,
    write_text_classifier,
    write_tile_scores,
)

__all__ = [
    "ATTENTION_COLUMNS",
    "CALLS_TEXT_COLUMNS",
    "COHORT_COLUMNS",
    "DTYPES",
    "EmbeddingFileWriter",
    "EmbeddingFooter",
    "PHENOTYPE_PREFIX",
    "PROBABILITY_PREFIX",
    "SCORE_PREFIX",
    "TILE_SCHEMA",
    "TextClassifier",
    "TissueMask",
    "called_classes",
    "embedding_paths",
    "embedding_schema",
    "probability_column",
    "read_attention",
    "read_calls",
    "read_class_map",
    "read_class_map_classes",
    "read_cohort_table",
    "read_composition",
    "read_embedding_footer",
    "read_phenotype_assignments",
    "read_phenotype_table",
    "read_report_embeddings",
    "read_slide_embeddings",
    "read_slide_tsv",
    "read_text_classifier",
    "read_tile_embeddings",
    "read_tile_file",
    "read_tile_metadata",
    "read_tile_scores",
    "read_tile_scores_metadata",
    "read_tile_table",
    "read_tissue_mask",
    "slide_embedding_columns",
    "tile_classes",
    "vectors_column",
    "write_attention",
    "write_calls",
    "write_class_map",
    "write_cohort_table",
    "write_composition",
    "write_embedding_manifest",
    "write_failed_embedding_file",
    "write_report_embeddings",
    "write_slide_embeddings",
    "write_text_classifier",
    "write_tile_file",
    "write_tile_scores",
    "write_tissue_mask",
]
