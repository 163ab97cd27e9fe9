"""A faster inflate for ``.nii.gz`` sources, beside nibabel's stdlib gzip: Intel ISA-L through ``isal.igzip``.

Reading a gzipped NIfTI is mostly inflating it, and ISA-L inflates 2.3x as fast as zlib on one core (a 100-slice
512x512 int16 volume: 1,471 against 635 slices/s), so ``run_ingest`` of ``.nii.gz`` volumes runs 1.67x faster with it
(benchmarks/README.md).
It is used when the ``isal`` package is installed (a dependency where it ships wheels: x86-64 and arm64) and
``ingest.fast_gunzip`` is true. nibabel's own reader is the plain path; both give the same voxels (this one through
nibabel's public ``from_stream``), and the size checks of `medgan.ingest.nifti.check_header` come first either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib

try:
    from isal import igzip, isal_zlib
except ImportError:  # a platform without isal wheels: the plain path
    igzip = isal_zlib = None

# What a corrupt ISA-L stream raises beyond the stdlib's OSError / EOFError (a bad deflate block).
ERRORS: tuple[type[Exception], ...] = (isal_zlib.error,) if isal_zlib is not None else ()


def available() -> bool:
    """True when ``isal`` is installed."""
    return igzip is not None


@contextlib.contextmanager
def open_nifti(path: Path, cls: type[nib.Nifti1Image]) -> Iterator[nib.Nifti1Image]:
    """``cls.from_stream`` over an ISA-L gzip stream of `path` (`cls`: ``Nifti1Image`` or ``Nifti2Image``). The image's
    voxels are read from the stream, so read them inside the ``with``; the stream closes on exit."""
    with igzip.open(path, "rb") as stream:
        yield cls.from_stream(stream)
