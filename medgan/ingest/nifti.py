"""NIfTI reader: .nii / .nii.gz, NIfTI-1 and -2, any byte order and dtype, 4-D -> one volume, canonical RAS+ output."""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations

from medgan.ingest.volume import ReadError, Volume, VolumeStream, physical

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    """True for ``.nii`` and ``.nii.gz`` file names."""
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _gunzip(buf) -> bytes:
    """Decompress every gzip member of a buffer (bytes, or a mapped file) in one pass (the fallback of `_decode`).

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


def _mapped(fp) -> memoryview:
    """An open file's bytes, mapped read-only. Nothing closes the mapping explicitly: it goes with the last reference
    (a gzip reader holds one; so may a traceback), so a reader that fails mid-stream never makes the close fail too."""
    return memoryview(mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ))


def _decode(mapped: memoryview) -> bytes | np.ndarray:
    """The decompressed bytes of a gzipped NIfTI (`_mapped`), as one new array of exactly the file's size.

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
    reader = _GzipReader(mapped)
    try:
        head, layout = _read_header(reader)
        if layout is None:
            return head + reader.readall()
        n = len(head)
        out = np.empty(max(layout[1], n), np.uint8)
        out[:n] = np.frombuffer(head, np.uint8)
        got = n + _readinto(reader, memoryview(out)[n:])
        rest = memoryview(bytearray(1 << 16))
        while _readinto(reader, rest):  # to the stream's end: checks the CRC; bytes after the voxels are dropped
            pass
    finally:
        reader.close()
    return out[:got]


def _read_header(reader) -> tuple[bytes, tuple[int, int] | None]:
    """A NIfTI's header and extensions, read from the start of a gzip reader, and its `_layout` (None: no size)."""
    head = bytearray(544)
    head = bytes(head[: _readinto(reader, memoryview(head))])
    layout = _layout(head)
    if layout is not None and layout[0] > len(head):  # header extensions
        more = bytearray(layout[0] - len(head))
        head += bytes(more[: _readinto(reader, memoryview(more))])
    return head, layout


def _image_class(head: bytes) -> type[nib.Nifti1Image] | type[nib.Nifti2Image] | None:
    """NIfTI-1 or NIfTI-2 from the header size in a file's first bytes (either byte order); None for neither."""
    sizeof = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")}
    return nib.Nifti1Image if 348 in sizeof else nib.Nifti2Image if 540 in sizeof else None


def _layout(head: bytes) -> tuple[int, int] | None:
    """(voxel offset, header + extensions + voxels in bytes) from a NIfTI's first bytes; None where they do not say."""
    cls = _image_class(head)
    sizeof = 348 if cls is nib.Nifti1Image else 540
    if cls is None or len(head) < sizeof:
        return None
    try:
        hdr = cls.header_class(binaryblock=head[:sizeof], check=False)
        offset, shape = int(hdr.get_data_offset()), hdr.get_data_shape()
        size = offset + int(np.prod(shape, dtype=np.int64)) * hdr.get_data_dtype().itemsize
    except Exception:  # a header nibabel cannot read: decoded whole, and reported by `_load`
        return None
    return (offset, size) if sizeof + 4 <= offset and 0 < size < 1 << 40 else None


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
                raw = _decode(_mapped(fp))
            except Exception as e:  # zlib.error, isal's IsalError, gzip.BadGzipFile, EOFError
                raise ValueError(f"{path.name}: gzip stream is corrupt or truncated ({e})") from None
        else:
            fp.seek(0)
            raw = fp.readall()
    if len(raw) < 348:
        raise ValueError(f"{path.name}: {len(raw)} bytes is too short for a NIfTI header")
    cls = _image_class(bytes(raw[:4])) or nib.Nifti1Image  # neither: nibabel names what is wrong
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
    """(the orientation to canonical RAS+, the canonical voxel spacing, each canonical slice's position along
    axis 2 in mm) of a stored 3-D grid.

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


GUESS_SAMPLES = 200_000  # voxels the modality guess looks at (every size // GUESS_SAMPLES-th, in stored order)


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
    index, notes = _volume_index(shape, volume_index, path.name)
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
    ornt, spacing, positions = _grid(affine, shape, path.name)
    arr = orientations.apply_orientation(data, ornt)
    if not modality:
        modality = _guess_modality(data.ravel(order="K")[:: max(1, data.size // GUESS_SAMPLES)] * slope + inter)
        notes.append(f"modality guessed as {modality}")
    vol = Volume(
        data=arr,
        spacing_mm=spacing,  # type: ignore[arg-type]
        modality=modality.upper(),
        positions_mm=positions,
        notes=notes,
        slope=slope,
        intercept=inter,
    )
    return vol, shape[:3], np.asarray(affine)  # type: ignore[return-value]


SLAB_BYTES = 8 << 20  # stored bytes decoded at a time by `NiftiStream` (a few MB: they stay in cache to be resized)


def open_volume(path: str | Path, *, volume_index: int = 0, modality: str = "", slice_axis: str = "axial"):
    """A NIfTI volume for `normalize_volume`: a `NiftiStream` (decoded slab by slab, never whole) where the file
    allows it, else the `Volume` of `read_nifti`.

    Streaming needs a gzipped file (``.nii.gz``: an uncompressed ``.nii`` is read whole), isal's gzip reader, numeric
    voxels, and slices along `slice_axis` that are whole stored slabs: the file's third (slowest) axis must be the
    canonical slice axis, as it is for an axial CT or MR stored the usual way. Both give the same slices.
    """
    path = Path(path)
    img = _stream_header(path)
    if img is None:
        return read_nifti(path, volume_index=volume_index, modality=modality)
    shape = tuple(int(s) for s in img.shape)
    _, notes = _volume_index(shape, volume_index, path.name)  # the checks and the note of the whole read
    ornt, spacing, positions = _grid(img.affine, shape, path.name)
    from medgan.ingest.normalize import AXES

    if slice_axis not in AXES or int(ornt[2, 0]) != AXES[slice_axis][0]:
        return read_nifti(path, volume_index=volume_index, modality=modality)
    proxy = img.dataobj
    return NiftiStream(
        path=path,
        stored_shape=shape[:3],  # type: ignore[arg-type]
        volume_index=volume_index,
        offset=int(proxy.offset),
        dtype=np.dtype(proxy.dtype),
        ornt=ornt,
        spacing_mm=spacing,  # type: ignore[arg-type]
        modality=modality.upper(),
        positions_mm=positions,
        notes=notes,
        slope=float(proxy.slope),
        intercept=float(proxy.inter),
    )


def _stream_header(path: Path) -> nib.Nifti1Image | nib.Nifti2Image | None:
    """The header-only image of a .nii.gz that `NiftiStream` can read; None otherwise (the whole read then decides,
    and reports any error)."""
    try:
        from isal.isal_zlib import _GzipReader
    except ImportError:
        return None
    try:
        with open(path, "rb", buffering=0) as fp:
            if fp.read(2) != b"\x1f\x8b":
                return None
            fp.seek(0)
            reader = _GzipReader(fp)
            head, layout = _read_header(reader)
            reader.close()
        if layout is None:
            return None
        img = _image_class(head).from_bytes(head[: layout[0]])  # type: ignore[union-attr]
    except Exception:  # damaged or odd: the whole read reports it
        return None
    proxy = img.dataobj
    if not hasattr(proxy, "offset") or np.dtype(proxy.dtype).kind not in "biuf" or getattr(proxy, "order", "F") != "F":
        return None
    return img


class NiftiStream(VolumeStream):
    """A gzipped NIfTI volume decoded a few MB at a time (`SLAB_BYTES`), in stored order, straight into one reused
    buffer: each slab of whole slices is handed to `normalize_volume` as a canonical view and resized while it is
    still in cache. The volume's ~100 MB is never held: peak memory is the slab, and no fresh memory is touched per
    volume. Integer voxels stay stored (``slope``/``intercept`` as `Volume`); float ones become float32 physical values
    with non-finite ones zeroed, slab by slab. The gzip stream is read to its end (its CRC is checked).

    The modality guess and the percentile sample of `read_nifti` / `percentile_range` are gathered from the slabs
    (the same voxels), so the slices equal those of the whole read.
    """

    def __init__(self, *, path: Path, stored_shape: tuple[int, int, int], volume_index: int, offset: int,
                 dtype: np.dtype, ornt: np.ndarray, **volume: Any):  # fmt: skip
        super().__init__(**volume)
        self.path, self.stored_shape, self.volume_index = path, stored_shape, volume_index
        self.offset, self.dtype, self.ornt = offset, dtype, ornt
        shape = [0, 0, 0]
        for axis, (to, _) in enumerate(ornt.astype(int).tolist()):
            shape[to] = stored_shape[axis]
        self.shape = tuple(shape)  # type: ignore[assignment]

    def slabs(self, sample_step: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        from isal.isal_zlib import _GzipReader

        name = self.path.name
        x, y, z = self.stored_shape
        per_slice = x * y * self.dtype.itemsize
        k_max = max(1, SLAB_BYTES // per_slice)
        flipped = int(self.ornt[2, 1]) < 0
        guess = not self.modality
        step_guess = max(1, x * y * z // GUESS_SAMPLES)
        guesses: list[np.ndarray] = []
        samples: list[np.ndarray] = []
        nonfinite = False
        buf = np.empty(k_max * per_slice, np.uint8)
        with open(self.path, "rb", buffering=0) as fp:
            reader = _GzipReader(_mapped(fp))  # read in place: ~4% faster than through the file's reads
            try:
                skip = self.offset + self.volume_index * z * per_slice
                while skip > 0:  # the header, and the volumes before the one read
                    got = _readinto(reader, memoryview(buf)[: min(skip, len(buf))])
                    if got == 0:
                        raise ReadError(f"{name}: voxel data is truncated (the stream ends before the volume)")
                    skip -= got
                for k0 in range(0, z, k_max):
                    k1 = min(z, k0 + k_max)
                    need = (k1 - k0) * per_slice
                    got = _readinto(reader, memoryview(buf)[:need])
                    if got < need:
                        have = k0 * per_slice + got
                        raise ReadError(f"{name}: voxel data is truncated ({have} of {z * per_slice} bytes)")
                    flat = np.frombuffer(buf, self.dtype, count=(k1 - k0) * x * y)
                    flat = flat.view(np.uint8) if self.dtype.kind == "b" else flat
                    if self.dtype.kind == "f":
                        flat = physical(flat, self.slope, self.intercept)
                        if not np.isfinite(flat).all():
                            nonfinite = True
                            flat = np.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
                    if guess:
                        guesses.append(flat[(-k0 * x * y) % step_guess :: step_guess].copy())
                    slab = orientations.apply_orientation(flat.reshape((x, y, k1 - k0), order="F"), self.ornt)
                    z0 = z - k1 if flipped else k0
                    if sample_step:
                        samples.append(slab[::sample_step, ::sample_step, (-z0) % sample_step :: sample_step].copy())
                    yield z0, slab
                while _readinto(reader, memoryview(buf)):  # to the stream's end: checks the CRC
                    pass
            except ReadError:
                raise
            except Exception as e:  # zlib.error, isal's IsalError, gzip.BadGzipFile, EOFError
                raise ReadError(f"{name}: gzip stream is corrupt or truncated ({e})") from None
            finally:
                reader.close()
        if self.dtype.kind == "f":
            self.slope, self.intercept = 1.0, 0.0
            if nonfinite:
                self.notes.append("non-finite voxels set to 0")
        if guess:
            self.modality = _guess_modality(np.concatenate(guesses) * self.slope + self.intercept)
            self.notes.append(f"modality guessed as {self.modality}")
        self.sample = np.concatenate([s.ravel() for s in samples]) if samples else None


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
