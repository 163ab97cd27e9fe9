"""NIfTI reader: .nii / .nii.gz through nibabel, NIfTI-1 and -2, 4-D -> one volume, canonical RAS+ output.

Before nibabel reads a voxel, the header's declared sizes are checked against ``ingest.max_volume_mb`` and against the
file (an uncompressed file must hold them; a gzipped one cannot inflate past ~1,032x, deflate's limit), so a tiny
hostile header cannot make the reader allocate gigabytes. A ``.nii.gz`` is inflated by ISA-L when ``isal`` is
installed (`medgan.ingest.fastgz`, ``ingest.fast_gunzip``), else by nibabel's own gzip reader.
"""

from __future__ import annotations

import contextlib
import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

from medgan.ingest import fastgz
from medgan.ingest.volume import Volume, physical

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_DEFLATE_MAX_RATIO = 1032  # deflate's largest compression ratio (RFC 1951: 258 bytes from 2 bits)
_MAX_OFFSET = 64 << 20  # header extensions beyond this are not plausible
GUESS_SAMPLES = 200_000  # voxels the modality guess looks at (every size // GUESS_SAMPLES-th, in stored order)


# What a corrupt or cut gzip stream raises, through the stdlib or ISA-L (OSError covers gzip.BadGzipFile).
_GZIP_ERRORS = (OSError, EOFError, zlib.error, *fastgz.ERRORS)


def _gzip_error(name: str, e: BaseException) -> ValueError:
    return ValueError(f"{name}: gzip stream is corrupt or truncated ({' '.join(str(e).split())})")


def is_nifti(path: Path) -> bool:
    """True for ``.nii`` and ``.nii.gz`` file names."""
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _first_bytes(path: Path, n: int) -> tuple[bytes, bool]:
    """The first `n` bytes of the (decompressed) file, and whether it is gzipped; never inflates more than `n`."""
    with open(path, "rb") as fp:
        gz = fp.read(2) == b"\x1f\x8b"
        fp.seek(0)
        if not gz:
            return fp.read(n), False
        try:
            with gzip.GzipFile(fileobj=fp) as g:
                return g.read(n), True
        except _GZIP_ERRORS as e:
            raise _gzip_error(path.name, e) from None


def check_header(path: str | Path, max_volume_mb: float = 4096) -> tuple[type[nib.Nifti1Image], bool]:
    """Check a NIfTI's declared sizes before any voxel is read.

    Returns:
        (the image class its header is, ``nib.Nifti1Image`` or ``nib.Nifti2Image``; whether the file is gzipped).

    Raises:
        ValueError: not a NIfTI header; a voxel offset or a volume over the limits; more voxel bytes than the file
            holds (uncompressed) or can inflate to (gzip); a header extension that runs past the voxel offset (nibabel
            would read its declared size, up to 2 GB, or the whole stream). The message names the file and the limit.
    """
    path = Path(path)
    head, gz = _first_bytes(path, 544)
    sizeof = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")} if len(head) >= 4 else set()
    cls = nib.Nifti1Header if 348 in sizeof else nib.Nifti2Header if 540 in sizeof else None
    if cls is None or len(head) < (348 if cls is nib.Nifti1Header else 540):
        raise ValueError(f"{path.name}: not a NIfTI-1/2 header ({len(head)} bytes read)")
    try:
        hdr = cls(binaryblock=head[: 348 if cls is nib.Nifti1Header else 540], check=False)
        offset = int(hdr.get_data_offset())
        shape = [int(s) for s in hdr.get_data_shape()]
        itemsize = hdr.get_data_dtype().itemsize
    except Exception as e:  # nibabel raises several types for bad headers
        raise ValueError(f"{path.name}: not a readable NIfTI header ({type(e).__name__}: {e})") from None
    data = int(np.prod(shape, dtype=object)) * itemsize
    limit = int(max_volume_mb * (1 << 20))
    if offset > _MAX_OFFSET:
        raise ValueError(f"{path.name}: voxel offset {offset} is implausible (> {_MAX_OFFSET >> 20} MB of extensions)")
    if data * 4 // max(itemsize, 1) > limit:
        raise ValueError(f"{path.name}: shape {tuple(shape)} is over ingest.max_volume_mb ({max_volume_mb:g} MB "
                         "as float32): not read")  # fmt: skip
    size = path.stat().st_size
    if not gz and offset + data > size:
        raise ValueError(f"{path.name}: voxel data is truncated ({max(size - offset, 0)} of {data} bytes)")
    if gz and offset + data > _DEFLATE_MAX_RATIO * size + (1 << 16):
        raise ValueError(f"{path.name}: declares {data} voxel bytes, more than its {size} gzip bytes can hold")
    start = (348 if cls is nib.Nifti1Header else 540) + 4  # the extension flag's 4 bytes, then the extensions
    if len(head) >= start and head[start - 4] != 0:
        _check_extensions(path, start, offset, "little" if hdr.endianness == "<" else "big")
    return (nib.Nifti1Image if cls is nib.Nifti1Header else nib.Nifti2Image), gz


def _check_extensions(path: Path, start: int, offset: int, byteorder: str) -> None:
    """Walk the header extensions (each: int32 size including its 8-byte head, int32 code, content) from `start` to
    the voxel offset as nibabel will, on at most `offset` inflated bytes (<= 64 MB, checked before).

    Raises:
        ValueError: an extension whose size is under 8 or runs past the voxel offset, or an offset before `start`.
    """
    if offset < start:
        raise ValueError(f"{path.name}: header extensions with a voxel offset of {offset} (under {start}): not read")
    blob, _ = _first_bytes(path, offset)
    pos = start
    while offset - pos >= 16 and pos + 8 <= len(blob):  # nibabel's loop; a short file is its error to report
        esize = int.from_bytes(blob[pos : pos + 4], byteorder, signed=True)
        if esize < 8 or pos + esize > offset:
            raise ValueError(f"{path.name}: a header extension at byte {pos} declares {esize} bytes, past the voxel "
                             f"offset {offset}: not read")  # fmt: skip
        pos += esize


@contextlib.contextmanager
def _opened(path: Path, max_volume_mb: float, fast_gunzip: bool) -> Iterator[nib.Nifti1Image | nib.Nifti2Image]:
    """The image after `check_header`: ``nibabel.load``, or for a gzipped file with `fast_gunzip` (and ``isal``
    installed) the same image over an ISA-L stream (`medgan.ingest.fastgz`); read its voxels inside the ``with``.
    Opening errors become one-line ValueErrors naming the file."""
    cls, gz = check_header(path, max_volume_mb)
    with contextlib.ExitStack() as stack:
        try:
            if gz and fast_gunzip and fastgz.available() and path.name.lower().endswith(".gz"):  # as nib.load decides
                img = stack.enter_context(fastgz.open_nifti(path, cls))
            else:
                img = nib.load(path)
        except MemoryError:
            raise ValueError(f"{path.name}: not enough memory to read its header") from None
        except Exception as e:
            if gz and isinstance(e, (EOFError, zlib.error, gzip.BadGzipFile, *fastgz.ERRORS)):  # not other OSErrors
                raise _gzip_error(path.name, e) from None
            raise ValueError(f"{path.name}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise ValueError(f"{path.name}: not a NIfTI image ({type(img).__name__})")
        yield img


def _voxels(img: nib.Nifti1Image | nib.Nifti2Image, index: tuple, name: str) -> tuple[np.ndarray, float, float]:
    """Stored voxels of ``img[index]`` (unscaled: an int16 CT stays int16) and the scaling to physical values; float
    or odd layouts come back as float32 physical values with scaling (1, 0).

    Raises:
        ValueError: truncated or corrupt voxel data, or not enough memory.
    """
    proxy = img.dataobj
    try:
        if getattr(proxy, "is_proxy", False) and img.get_data_dtype().kind in "biu" and len(img.shape) == 3:
            data = np.asarray(proxy.get_unscaled())
            slope, inter = proxy.slope, proxy.inter
            return (data.view(np.uint8) if data.dtype.kind == "b" else data), float(slope), float(inter)
        return np.asarray(proxy[index], dtype=np.float32), 1.0, 0.0
    except MemoryError:
        raise ValueError(f"{name}: not enough memory to read its {img.shape} voxels") from None
    except _GZIP_ERRORS as e:
        msg = " ".join(str(e).split())
        if msg.startswith("Expected"):  # nibabel: "Expected N bytes, got M bytes from <file>"
            raise ValueError(f"{name}: voxel data is truncated ({msg.split(' from ')[0]})") from None
        raise _gzip_error(name, e) from None
    except ValueError as e:
        raise ValueError(f"{name}: voxel data is truncated or corrupt ({e})") from None


def _volume_index(shape: tuple[int, ...], volume_index: int, name: str) -> tuple[tuple, list[str]]:
    """The index of one 3-D volume in a stored array of `shape`, and the note a 4-D file gets.

    Raises:
        ValueError: fewer than 3 or more than 4 non-singleton dimensions, or `volume_index` out of range.
    """
    if len(shape) < 3:
        raise ValueError(f"{name}: NIfTI shape {shape} has fewer than 3 dimensions")
    if len(shape) == 3:
        return (slice(None),) * 3, []
    extra = shape[3:]
    if any(s > 1 for s in extra[1:]):
        raise ValueError(f"{name}: NIfTI shape {shape} has more than 4 non-singleton dimensions")
    if not 0 <= volume_index < extra[0]:
        raise ValueError(
            f"{name}: 4-D NIfTI has {extra[0]} volumes; ingest.volume_index={volume_index} is out of range"
        )
    index = (slice(None),) * 3 + (volume_index,) + (0,) * (len(shape) - 4)
    return index, [f"4-D: volume {volume_index} of {extra[0]}"] if extra[0] > 1 else []


def _grid(affine: np.ndarray | None, shape: tuple[int, ...], name: str) -> tuple[np.ndarray, tuple, np.ndarray]:
    """(the orientation to canonical RAS+ as ``nib.as_closest_canonical`` finds it, the canonical voxel spacing, each
    canonical slice's position along axis 2 in mm) of a stored 3-D grid.

    Raises:
        ValueError: no usable qform/sform affine.
    """
    if affine is None or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"{name}: NIfTI has no usable qform/sform affine")
    ornt = orientations.io_orientation(affine)
    ras_affine = affine @ orientations.inv_ornt_aff(ornt, shape[:3])
    n = int(shape[int(ornt[:, 0].tolist().index(2))])  # slices along canonical axis 2
    spacing = tuple(float(s) for s in np.sqrt((ras_affine[:3, :3] ** 2).sum(axis=0)))
    positions = (ras_affine @ np.stack([np.zeros(n), np.zeros(n), np.arange(n), np.ones(n)]))[2]
    return ornt, spacing, positions.astype(np.float64)


def _guess_modality(sample: np.ndarray) -> str:
    """CT when the 1st percentile of a sample of physical values is below -500 (air in HU), else OT."""
    return "CT" if sample.size and np.percentile(sample, 1) < -500 else "OT"


def read_nifti(
    path: str | Path,
    *,
    volume_index: int = 0,
    modality: str = "",
    max_volume_mb: float = 4096,
    fast_gunzip: bool = True,
) -> Volume:
    """Read one NIfTI volume (see `read_nifti_grid`, which also returns the stored grid)."""
    return read_nifti_grid(
        path, volume_index=volume_index, modality=modality, max_volume_mb=max_volume_mb, fast_gunzip=fast_gunzip
    )[0]


def read_nifti_grid(
    path: str | Path,
    *,
    volume_index: int = 0,
    modality: str = "",
    max_volume_mb: float = 4096,
    fast_gunzip: bool = True,
) -> tuple[Volume, tuple[int, int, int], np.ndarray]:
    """Read one NIfTI volume in canonical RAS+ orientation (``nib.load``, or its ISA-L twin for a ``.nii.gz``, then the
    reorientation of ``nib.as_closest_canonical`` applied to the stored voxels).

    Integer voxels stay stored with their scaling in ``Volume.slope``/``intercept`` (normalization applies it after
    resizing); float voxels become float32 physical values, with non-finite ones zeroed.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file (NIfTI-1 or -2, either byte order; qform or sform-only).
        volume_index: which volume of a 4-D file to read (``ingest.volume_index``).
        modality: "CT", "MR", ...; empty = guess: "CT" when the 1st percentile is below -500 (air in HU), else "OT".
        max_volume_mb: the largest volume (as float32) the header may declare (``ingest.max_volume_mb``).
        fast_gunzip: inflate a ``.nii.gz`` with ISA-L when ``isal`` is installed (``ingest.fast_gunzip``; the same
            voxels as nibabel's own gzip reader, about 2.3x the inflate speed).

    Returns:
        (a `Volume` with patient/volume keys empty (the caller pseudonymises), the stored 3-D shape, the stored affine).

    Raises:
        ValueError: unreadable file, a declared size over a limit, a 4-D index out of range, or more than 4
            non-singleton dimensions; the message names the file.

    Example:
        >>> vol = read_nifti("example_ct.nii.gz", modality="CT")
        >>> vol.array.shape, vol.spacing_mm
    """
    path = Path(path)
    with _opened(path, max_volume_mb, fast_gunzip) as img:
        shape = tuple(int(s) for s in img.shape)
        index, notes = _volume_index(shape, volume_index, path.name)
        affine = np.asarray(img.affine)
        ornt, spacing, positions = _grid(affine, shape, path.name)
        data, slope, inter = _voxels(img, index, path.name)
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        notes.append("non-finite voxels set to 0")
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    if not modality:
        modality = _guess_modality(data.ravel(order="K")[:: max(1, data.size // GUESS_SAMPLES)] * slope + inter)
        notes.append(f"modality guessed as {modality}")
    vol = Volume(
        data=orientations.apply_orientation(data, ornt),
        spacing_mm=spacing,  # type: ignore[arg-type]
        modality=modality.upper(),
        positions_mm=positions,
        notes=notes,
        slope=slope,
        intercept=inter,
    )
    return vol, shape[:3], affine  # type: ignore[return-value]


def read_mask(path: str | Path, max_volume_mb: float = 4096, fast_gunzip: bool = True) -> np.ndarray:
    """Read an integer label map in canonical RAS+ orientation (its own affine decides the orientation).

    Canonicalising image and mask each with their own affine lines them up voxel for voxel whenever they share a grid,
    whatever orientation each was stored in; the caller checks that the shapes then agree.

    Returns:
        int32 [X, Y, Z] canonical.

    Raises:
        ValueError: unreadable file or not 3-D.
    """
    path = Path(path)
    with _opened(path, max_volume_mb, fast_gunzip) as m:
        shape = tuple(int(s) for s in m.shape)
        if len(shape) < 3 or any(s > 1 for s in shape[3:]):
            raise ValueError(f"mask {path.name} has shape {shape}; a label map must be 3-D")
        data = physical(*_voxels(m, (slice(None),) * 3 + (0,) * (len(shape) - 3), path.name))
        affine = np.asarray(m.affine)
    canon = nib.as_closest_canonical(nib.Nifti1Image(np.rint(data).astype(np.int32), affine))
    return np.asarray(canon.dataobj)
