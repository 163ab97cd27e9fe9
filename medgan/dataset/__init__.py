"""The slice dataset (schema ``medgan.slices/1``): the one writer and reader every stage shares.

A dataset folder holds ``dataset.json`` (metadata, counts, hashes, resolved config), ``slices.npy`` (float16
[N, 1, 128, 128] in [-1, 1]), ``slices.csv`` (one row per slice, pseudonymous keys only) and ``report.csv`` (one row per
input source: ok or skipped with a reason). Ingest writes it, export writes it with ``synthetic: true``; train, evaluate
and export read it. This package imports neither pydicom nor nibabel, so reading a dataset costs numpy only.
"""

from medgan.dataset.reader import SliceDataset
from medgan.dataset.schema import (
    COLUMNS,
    FLOAT_COLUMNS,
    INT_COLUMNS,
    REPORT_COLUMNS,
    SCHEMA,
    SPLITS,
    checked_float16,
    content_hash,
    image_digests,
)
from medgan.dataset.writer import SliceWriter, write_dataset

__all__ = [
    "COLUMNS",
    "FLOAT_COLUMNS",
    "INT_COLUMNS",
    "REPORT_COLUMNS",
    "SCHEMA",
    "SPLITS",
    "SliceDataset",
    "SliceWriter",
    "checked_float16",
    "content_hash",
    "image_digests",
    "write_dataset",
]
