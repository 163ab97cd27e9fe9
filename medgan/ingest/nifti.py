"""NIfTI reader: .nii / .nii.gz, NIfTI-1 and -2, any byte order and dtype, 4-D -> one volume, canonical RAS+ output."""

from __future__ import annotations

import mmap
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

from medgan.ingest.volume import Volume, physical

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    """True for ``.nii`` and ``.nii.gz`` file names."""
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _gunzip(buf) -> bytes:
    """Decompress every gzip member of a buffer (bytes or a read-only mmap) in one pass (the fallback of `_decode`).

    A decompressor object reads the mapped file directly, so the compressed bytes are never copied; concatenated
    members (bgzip) are followed.
    """
    try:
        from isal import isal_zlib as z
    except ImportError:
        import zlib as z
    out: list[bytes] = []
    data = buf
    while True:
        d = z.decompressobj(31)
        out.append(d.decompress(data))
        if not d.eof:
            raise EOFError("compressed stream ends early")
        data = d.unused_data
        if not data.strip(b"\x00"):  # end of file, or the zero padding some writers append
            break
    return out[0] if len(out) == 1 else b"".join(out)


def _readinto(reader, view: memoryview) -> int:
    """Fill `view` from a gzip reader; fewer bytes only where the stream ends."""
    n = 0
    while n < len(view) and (k := reader.readinto(view[n:])):
        n += k
    return n


def _decode(mapped) -> bytes | np.ndarray:
    """The decompressed bytes of a gzipped NIfTI (a read-only mmap), as one new array of exactly the file's size.

    isal's gzip reader decodes the mapped file straight into that array, ~2x faster than the stdlib's zlib and
    without the pieces-then-join copy of a one-shot decompress: one allocation of the right size per volume, which
    the allocator reuses for the next (`worker.large_buffers_reused`). The header (its first 544 bytes) is decoded
    first to size it. All members are read (bgzip) and the stream is read to its end, so its CRC is checked; data
    after the voxels is dropped. Without isal, or where the header does not give a size, `_gunzip` decodes all.
    """
    try:
        from isal.isal_zlib import _GzipReader
    except ImportError:
        return _gunzip(mapped)
    view = memoryview(mapped)
    reader = _GzipReader(view)  # holds `view` until it is deleted: the mapping cannot close before
    try:
        head = bytearray(544)
        n = _readinto(reader, memoryview(head))
        layout = _layout(bytes(head[:n]))
        if layout is None:
            return bytes(head[:n]) + reader.readall()
        out = np.empty(max(layout[1], n), np.uint8)
        out[:n] = np.frombuffer(head, np.uint8, n)
        got = n + _readinto(reader, memoryview(out)[n:])
        while reader.readinto(head):  # to the stream's end: checks the CRC; bytes after the voxels are dropped
            pass
    finally:
        del reader
        view.release()
    return out[:got]


def _layout(head: bytes) -> tuple[int, int] | None:
    """(voxel offset, header + extensions + voxels in bytes) from a NIfTI's first bytes; None where they do not say."""
    for sizeof, cls in ((348, nib.Nifti1Header), (540, nib.Nifti2Header)):
        if len(head) >= sizeof and sizeof in (int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")):
            try:
                hdr = cls(binaryblock=head[:sizeof], check=False)
                offset, shape = int(hdr.get_data_offset()), hdr.get_data_shape()
                size = offset + int(np.prod(shape, dtype=np.int64)) * hdr.get_data_dtype().itemsize
            except Exception:  # a header nibabel cannot read: decoded whole, and reported by `_load`
                return None
            return (offset, size) if sizeof + 4 <= offset and 0 < size < 1 << 40 else None
    return None


def load_image(path: str | Path) -> nib.Nifti1Image | nib.Nifti2Image:
    """Load a NIfTI-1 or NIfTI-2 image fully into memory (gzip decoded with isal when available).

    Raises:
        ValueError: the file is not a readable NIfTI (truncated, wrong magic), naming the file.
    """
    img, raw = _load(Path(path))
    return type(img).from_bytes(bytes(raw))


def _load(path: Path) -> tuple[nib.Nifti1Image | nib.Nifti2Image, bytes | np.ndarray]:
    """The image's header (its data proxy is not to be read: see `_stored`) and the file's decompressed bytes."""
    with open(path, "rb", buffering=0) as fp:
        gz = fp.read(2) == b"\x1f\x8b"
        if gz:
            try:
                with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                    raw = _decode(mapped)
            except Exception as e:  # zlib.error, isal's IsalError, gzip.BadGzipFile, EOFError
                raise ValueError(f"{path.name}: gzip stream is corrupt or truncated ({e})") from None
        else:
            fp.seek(0)
            raw = fp.readall()
    if len(raw) < 348:
        raise ValueError(f"{path.name}: {len(raw)} bytes is too short for a NIfTI header")
    size_le = int.from_bytes(raw[:4], "little")
    size_be = int.from_bytes(raw[:4], "big")
    cls = nib.Nifti2Image if 540 in (size_le, size_be) else nib.Nifti1Image
    try:
        # The header and its extensions only where the voxels are viewed in place (nibabel would copy all of it).
        layout = _layout(bytes(raw[:544]))
        img = cls.from_bytes(bytes(raw[: layout[0]]) if layout else bytes(raw))
        if layout and img.get_data_dtype().kind not in "biuf":  # read through nibabel's proxy (`_stored`)
            img = cls.from_bytes(bytes(raw))
        return img, raw
    except Exception as e:  # nibabel raises several types for bad headers
        raise ValueError(f"{path.name}: not a readable NIfTI file ({type(e).__name__}: {e})") from None


def _stored(
    img: nib.Nifti1Image | nib.Nifti2Image, raw: bytes, index: tuple, name: str
) -> tuple[np.ndarray, float, float]:
    """Stored voxels of ``img[index]`` as a view on the decoded bytes (no copy), and scl_slope, scl_inter.

    Physical value = stored * slope + inter (nibabel's scaling, unusable slopes already mapped to 1/0 by nibabel).
    Layouts numpy cannot view (structured, object) go through nibabel's proxy as float32, scaled (slope 1, inter 0).
    """
    proxy = img.dataobj  # the loaded header's own offset/scaling (img.header is a copy with the offset reset)
    dtype, order = np.dtype(getattr(proxy, "dtype", np.float32)), getattr(proxy, "order", "F")
    if not hasattr(proxy, "offset") or dtype.kind not in "biuf":
        return np.asarray(proxy[index], dtype=np.float32), 1.0, 0.0
    offset, n = int(proxy.offset), int(np.prod(img.shape))
    if offset + n * dtype.itemsize > len(raw):
        raise ValueError(f"{name}: voxel data is truncated ({len(raw) - offset} of {n * dtype.itemsize} bytes)")
    data = np.frombuffer(raw, dtype=dtype, count=n, offset=offset).reshape(img.shape, order=order)[index]
    return (data.view(np.uint8) if dtype.kind == "b" else data), float(proxy.slope), float(proxy.inter)


def canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip a 3-D array to the closest canonical RAS+ orientation (as ``nib.as_closest_canonical``).

    Returns:
        (array view [X, Y, Z] with axis 0 toward Right, 1 toward Anterior, 2 toward Superior, its affine).
    """
    ornt = orientations.io_orientation(affine)
    out = orientations.apply_orientation(data, ornt)
    new_affine = affine @ orientations.inv_ornt_aff(ornt, data.shape)
    return out, new_affine


def read_nifti(path: str | Path, *, volume_index: int = 0, modality: str = "") -> Volume:
    """Read one NIfTI volume (see `read_nifti_grid`, which also returns the stored grid)."""
    return read_nifti_grid(path, volume_index=volume_index, modality=modality)[0]


def read_nifti_grid(
    path: str | Path, *, volume_index: int = 0, modality: str = ""
) -> tuple[Volume, tuple[int, int, int], np.ndarray]:
    """Read one NIfTI volume as float32 in canonical RAS+ orientation with scaling applied.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file (NIfTI-1 or -2, either byte order; qform or sform-only).
        volume_index: which volume of a 4-D file to read (``ingest.volume_index``).
        modality: "CT", "MR", ...; empty = guess: "CT" when the 1st percentile is below -500 (air in HU), else "OT".

    Returns:
        (a `Volume` with patient/volume keys empty (the caller pseudonymises), the stored 3-D shape, the stored affine).

    Raises:
        ValueError: unreadable file, a 4-D index out of range, or more than 4 non-singleton dimensions.

    Example:
        >>> vol = read_nifti("example_ct.nii.gz", modality="CT")
        >>> vol.array.shape, vol.spacing_mm
    """
    path = Path(path)
    img, raw = _load(path)
    shape = tuple(int(s) for s in img.shape)
    notes: list[str] = []
    if len(shape) < 3:
        raise ValueError(f"{path.name}: NIfTI shape {shape} has fewer than 3 dimensions")
    if len(shape) > 3:
        extra = shape[3:]
        if any(s > 1 for s in extra[1:]):
            raise ValueError(f"{path.name}: NIfTI shape {shape} has more than 4 non-singleton dimensions")
        if not 0 <= volume_index < extra[0]:
            raise ValueError(
                f"{path.name}: 4-D NIfTI has {extra[0]} volumes; ingest.volume_index={volume_index} is out of range"
            )
        index = (slice(None),) * 3 + (volume_index,) + (0,) * (len(shape) - 4)
        if extra[0] > 1:
            notes.append(f"4-D: volume {volume_index} of {extra[0]}")
    else:
        index = (slice(None),) * 3
    # Integer voxels stay stored (a view on the decoded bytes; normalization applies the scaling chunk by chunk);
    # float voxels become float32 physical values here, with non-finite ones zeroed.
    data, slope, inter = _stored(img, raw, index, path.name)
    if data.dtype.kind == "f":
        data = physical(data, slope, inter)
        slope, inter = 1.0, 0.0
        if not np.isfinite(data).all():
            notes.append("non-finite voxels set to 0")
            data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    affine = img.affine
    if affine is None or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"{path.name}: NIfTI has no usable qform/sform affine")
    arr, ras_affine = canonical(data, affine)
    spacing = tuple(float(s) for s in np.sqrt((ras_affine[:3, :3] ** 2).sum(axis=0)))
    positions = (
        ras_affine
        @ np.stack([np.zeros(arr.shape[2]), np.zeros(arr.shape[2]), np.arange(arr.shape[2]), np.ones(arr.shape[2])])
    )[2]
    if not modality:
        sample = data.ravel(order="K")[:: max(1, data.size // 200_000)] * slope + inter
        modality = "CT" if sample.size and np.percentile(sample, 1) < -500 else "OT"
        notes.append(f"modality guessed as {modality}")
    vol = Volume(
        data=arr,
        spacing_mm=spacing,  # type: ignore[arg-type]
        modality=modality.upper(),
        positions_mm=positions.astype(np.float64),
        notes=notes,
        slope=slope,
        intercept=inter,
    )
    return vol, shape[:3], np.asarray(affine)  # type: ignore[return-value]


def read_mask(path: str | Path) -> np.ndarray:
    """Read an integer label map in canonical RAS+ orientation (its own affine decides the orientation).

    Canonicalising image and mask each with their own affine lines them up voxel for voxel whenever they share a grid,
    whatever orientation each was stored in; the caller checks that the shapes then agree.

    Returns:
        int32 [X, Y, Z] canonical.

    Raises:
        ValueError: unreadable file or not 3-D.
    """
    path = Path(path)
    m, raw = _load(path)
    shape = tuple(int(s) for s in m.shape)
    if len(shape) < 3 or any(s > 1 for s in shape[3:]):
        raise ValueError(f"mask {path.name} has shape {shape}; a label map must be 3-D")
    data = physical(*_stored(m, raw, (slice(None),) * 3 + (0,) * (len(shape) - 3), path.name))
    arr, _ = canonical(np.rint(data).astype(np.int32), m.affine)
    return arr
