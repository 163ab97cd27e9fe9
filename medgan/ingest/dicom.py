"""DICOM reader: group image series found on disk, order slices along the normal, decode to a canonical RAS+ float32
Volume.

Two steps, so a caller can plan work before paying for pixels:

- `discover_series` walks a folder (regular files only, `headers.dicom_files`), reads and checks headers
  (`headers.read_header`) and groups files into series (`SeriesRef`), skipping what is not a usable image with a
  one-line reason (`Skip`).
- `read_series` decodes one series with ``pydicom.dcmread`` + ``pydicom.pixels.pixel_array`` and
  ``apply_modality_lut``: CT in HU, MONOCHROME1 inverted, colour to luminance, enhanced multi-frame functional groups,
  slices ordered by position along the slice normal (never InstanceNumber), duplicates and gaps noted, and the array
  reoriented to the closest canonical RAS+ with nibabel, like `medgan.ingest.nifti`.

Example:
    >>> refs, skips = discover_series(Path("data/ct_series"))
    >>> vol = read_series(refs[0], pseudonym=lambda s: hashlib.sha256(s.encode()).hexdigest()[:16])
    >>> vol.array.shape, vol.spacing_mm
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from nibabel import orientations
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut
from pydicom.uid import UID

from medgan.ingest.headers import (
    TAGS,
    Frame,
    SeriesRef,
    Skip,
    clean,
    decoder_problem,
    dicom_files,
    frames_of,
    identifiers,
    not_image,
    number,
    orientation,
    pixel_bytes,
    quiet,
    read_header,
    regular_file_problem,
    size_problem,
    text,
)
from medgan.ingest.volume import Volume

__all__ = ["SeriesRef", "Skip", "dicom_files", "discover_series", "read_series", "regular_file_problem"]

_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420", "PALETTE COLOR")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 luminance weights
_DUP_TOL_MM = 0.01  # slices closer than this along the normal are the same position


@dataclass
class ScannedFile:
    """One usable image file found by `scan_files`: what grouping needs.

    Attributes:
        path: the file.
        group: (SeriesInstanceUID or a fallback hash, geometry, path key for files without geometry); internal.
        positions: each frame's position along the slice normal (NaN without geometry).
        n_frames: frames in the file.
        tags: Modality and the `SeriesRef.label_tags`.
        identifiers: its identifying header values.
        header: its parsed header (kept for `read_series` in the same process).
    """

    path: Path
    group: tuple
    positions: list[float]
    n_frames: int
    tags: dict[str, str]
    identifiers: set[str]
    header: Dataset | None = None


@quiet
def discover_series(
    source: Path, min_series_slices: int = 4, *, root: Path | None = None, max_volume_mb: float = 4096
) -> tuple[list[SeriesRef], list[Skip]]:
    """Find the DICOM image series under a folder (recursively) or in a single file, reading headers only.

    Files are DICOM with or without a ``.dcm`` extension and with or without the 128-byte preamble; only regular files
    are read (`dicom_files`). Files are grouped by SeriesInstanceUID; when it is empty, by a hash of
    (FrameOfReferenceUID, ImageOrientationPatient rounded, Rows, Columns, SeriesDescription, SeriesNumber). A series
    whose files disagree on orientation or image size is split by those. Files without patient geometry (radiographs,
    ultrasound, secondary captures) are never stacked: each file is its own series.

    Scout rule: a series with geometry is a scout/localiser and skipped when its ImageType contains LOCALIZER, or
    when it has 2 to ``min_series_slices - 1`` distinct slice positions (frames at one position count once). A single
    image is kept as a 2-D image.

    Args:
        source: a folder or a single file.
        min_series_slices: the fewest slices a multi-slice series needs to count as a volume.
        root: the folder no file may lead out of through a symlink (None: no check).
        max_volume_mb: the most decoded float32 pixels one file or one series may declare (``ingest.max_volume_mb``).

    Returns:
        (series sorted by first file path, skipped files or series with a one-line reason each).

    Raises:
        FileNotFoundError: `source` does not exist.
    """
    source = Path(source)
    files, skips = dicom_files(source, root)
    scanned, more = scan_files(files, source, max_volume_mb)
    series, grouped = group_series(scanned, min_series_slices, max_volume_mb)
    return series, skips + more + grouped


@quiet
def scan_files(paths: list[Path], source: Path, max_volume_mb: float = 4096) -> tuple[list[ScannedFile], list[Skip]]:
    """Parse the headers of `paths` (files under `source`, in order): the usable image files, and the skipped ones
    with a reason (not DICOM, corrupt, no pixel data, no decoder, a declared size over the limit or the file)."""
    limit = int(max_volume_mb * (1 << 20))
    skips: list[Skip] = []
    out: list[ScannedFile] = []
    for path in paths:
        try:
            ds, has_pixels, offset = read_header(path, limit)
            tsuid, size = UID(ds.file_meta.TransferSyntaxUID), path.stat().st_size
            reason = (not_image(ds, has_pixels, at_end=0 < size <= offset) or decoder_problem(tsuid)
                      or size_problem(ds, size, offset, limit))  # fmt: skip
        except InvalidDicomError:
            skips.append(Skip(path, "not a DICOM file"))
            continue
        except MemoryError:
            skips.append(Skip(path, "not enough memory to read the header"))
            continue
        except ValueError as e:
            skips.append(
                Skip(path, clean(e, path) if "max_volume_mb" in str(e) else f"corrupt header: {clean(e, path)}")
            )
            continue
        except Exception as e:  # pydicom raises many types on corrupt headers
            skips.append(Skip(path, f"corrupt header: {clean(e, path)}"))
            continue
        if reason:
            skips.append(Skip(path, reason, identifiers(ds)))
            continue
        try:
            iop = orientation(ds)
            geom = (tuple(np.round(iop, 3)) if iop else None, number(ds, "Rows"), number(ds, "Columns"))
            uid = text(ds, "SeriesInstanceUID")
            if not uid:
                parts = [text(ds, "FrameOfReferenceUID"), *map(str, geom), text(ds, "SeriesDescription")]
                uid = "fallback:" + hashlib.sha256("|".join([*parts, text(ds, "SeriesNumber")]).encode()).hexdigest()
            if iop is not None:
                normal = np.cross(iop[:3], iop[3:])
                positions = [float(f.ipp @ normal) if f.ipp is not None else np.nan for f in frames_of(ds, 0)]
            else:
                positions = [np.nan]
            tags = {t: text(ds, t) for t in TAGS}
        except Exception as e:
            skips.append(Skip(path, f"corrupt header: {clean(e, path)}", identifiers(ds)))
            continue
        # Files without geometry stay alone; their key part is the path below `source`, stable wherever data moves.
        alone = (path.relative_to(source).as_posix() if source.is_dir() else path.name) if iop is None else ""
        n_frames = max(number(ds, "NumberOfFrames", 1), 1)
        out.append(ScannedFile(path, (uid, geom, alone), positions, n_frames, tags, identifiers(ds), ds))
    return out, skips


def group_series(
    scanned: list[ScannedFile], min_series_slices: int = 4, max_volume_mb: float = 4096
) -> tuple[list[SeriesRef], list[Skip]]:
    """Group scanned files (in scan order) into series, applying the scout rule of `discover_series` and the limit
    on a whole series' float32 size."""
    skips: list[Skip] = []
    groups: dict[tuple, list[ScannedFile]] = {}
    for f in scanned:
        groups.setdefault(f.group, []).append(f)
    series: list[SeriesRef] = []
    n_per_uid: dict[str, int] = {}
    for uid, _, _ in groups:
        n_per_uid[uid] = n_per_uid.get(uid, 0) + 1
    for (uid, geom, single), members in groups.items():
        tags = members[0].tags
        n = sum(m.n_frames for m in members)
        positions = np.sort(np.concatenate([m.positions for m in members]))
        # Frames at one position (echoes, time points, copies) count once: the scout rule is about spatial extent.
        n_unique = n if np.isnan(positions).any() else int(1 + (np.diff(positions) >= _DUP_TOL_MM).sum())
        key = uid if n_per_uid[uid] == 1 else f"{uid}|{geom}|{single}"
        image_type = tags.get("ImageType", "").upper()
        mb = n * geom[1] * geom[2] * 4 / (1 << 20)
        ids = set().union(*(m.identifiers for m in members))
        if not single and "LOCALIZER" in image_type:
            skips.append(Skip(members[0].path, f"scout/localiser: ImageType LOCALIZER ({len(members)} files)", ids))
        elif not single and 1 < n_unique < min_series_slices:
            reason = f"scout/localiser: {n_unique} slices < min_series_slices ({min_series_slices})"
            skips.append(Skip(members[0].path, reason, ids))
        elif mb > max_volume_mb:
            reason = f"series of {n} frames is {mb:.0f} MB as float32, over ingest.max_volume_mb ({max_volume_mb:g})"
            skips.append(Skip(members[0].path, reason, ids))
        else:
            label_tags = {t: tags.get(t, "") for t in TAGS[1:]}
            headers = [m.header for m in members] if all(m.header is not None for m in members) else []
            modality = tags.get("Modality") or "OT"
            series.append(SeriesRef(key, [m.path for m in members], modality, n, label_tags, ids, headers))
    series.sort(key=lambda s: s.files[0])
    return series, skips


def _decode(ds: Dataset) -> np.ndarray:
    """Stored values of all frames (colour as RGB), with decoder failures turned into one-line ValueErrors."""
    try:
        return pydicom.pixels.pixel_array(ds)
    except MemoryError:
        raise ValueError(f"not enough memory to decode {pixel_bytes(ds) >> 20} MB of pixels") from None
    except AttributeError as e:
        if "PixelData" not in ds:  # the header said Pixel Data follows (`scan_files`): the file ends inside it
            raise ValueError("truncated or corrupt pixel data: the Pixel Data element ends early") from e
        raise ValueError(f"cannot decode the pixels: missing image attribute ({clean(e)})") from e
    except Exception as e:
        tsuid = UID(ds.file_meta.TransferSyntaxUID)
        problem = decoder_problem(tsuid)
        if problem:
            raise ValueError(problem) from e
        raise ValueError(f"truncated or corrupt pixel data ({tsuid.name}): {clean(e)}") from e


def _to_float(raw: np.ndarray, ds: Dataset, item: Dataset) -> np.ndarray:
    """One frame's physical values (float32): colour to luminance, modality LUT, MONOCHROME1 mirrored."""
    photometric = text(ds, "PhotometricInterpretation").strip() or "MONOCHROME2"
    if photometric in _COLOUR:
        rgb = apply_color_lut(raw, ds) if photometric == "PALETTE COLOR" else raw
        return (np.asarray(rgb, np.float32) @ _LUMA).astype(np.float32)
    out = apply_modality_lut(raw, item)
    if photometric == "MONOCHROME1":  # mirrored within the mapped value range, so the units' range is kept
        lo, hi = _mapped_range(ds, item)
        out = lo + hi - np.asarray(out, np.float64)
    return np.asarray(out, dtype=np.float32)  # rounded once from the float64 physical values


def _mapped_range(ds: Dataset, item: Dataset) -> tuple[float, float]:
    """The stored-value range (Bits Stored, Pixel Representation) mapped through the modality LUT of `item`."""
    bits, signed = number(ds, "BitsStored", 16), number(ds, "PixelRepresentation")
    ends = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1])
    lo, hi = np.asarray(apply_modality_lut(ends, item), np.float64)
    return float(lo), float(hi)


def _one_linear_map(headers: list[Dataset], items: list[Dataset]) -> tuple[float, float] | None:
    """The (slope, intercept) that `_to_float` would apply to the stored values of every frame (`items` hold each
    frame's rescale), when one linear map does: monochrome, one pixel layout in every file (photometric, bits,
    signedness), at most 16 bits allocated (so float32 holds every stored value exactly), no Modality LUT Sequence,
    and one Rescale Slope/Intercept (or none); None otherwise."""

    def layout(h: Dataset) -> tuple[str, int, int, int]:
        photometric = text(h, "PhotometricInterpretation").strip() or "MONOCHROME2"
        return (
            photometric,
            number(h, "BitsAllocated", 16),
            number(h, "BitsStored", 16),
            number(h, "PixelRepresentation"),
        )

    layouts = {layout(h) for h in headers}  # `_to_float` reads these per file: one map needs them alike
    if not items or len(layouts) != 1:
        return None
    ((photometric, bits_allocated, _, _),) = layouts
    if photometric in _COLOUR or bits_allocated > 16:
        return None
    maps = set()
    for item in items:
        if item.get("ModalityLUTSequence"):
            return None
        try:  # as apply_modality_lut: the rescale applies when both tags are present
            both = "RescaleSlope" in item and "RescaleIntercept" in item
            maps.add((float(item.RescaleSlope), float(item.RescaleIntercept)) if both else (1.0, 0.0))
        except (TypeError, ValueError):
            return None  # an unreadable rescale: the general path says what is wrong
        if len(maps) > 1:
            return None
    slope, intercept = maps.pop()
    if photometric == "MONOCHROME1":  # mirrored as in `_to_float`: lo + hi - (stored * slope + intercept)
        lo, hi = _mapped_range(headers[0], items[0])
        return -slope, lo + hi - intercept
    return slope, intercept


def _order(positions: np.ndarray, notes: list[str]) -> tuple[np.ndarray, float]:
    """Indices of frames sorted along the normal with duplicates dropped, and the typical slice step (mm)."""
    order = np.argsort(positions, kind="stable")
    keep = [order[0]]
    for i in order[1:]:
        if positions[i] - positions[keep[-1]] < _DUP_TOL_MM:
            keep[-1] = min(keep[-1], i)  # the earliest (file, frame) wins among equal positions
        else:
            keep.append(i)
    keep_arr = np.array(keep)
    if len(keep_arr) < len(order):
        dropped = len(order) - len(keep_arr)
        notes.append(f"dropped {dropped} of {len(order)} frames at duplicate positions (kept the first of each)")
    steps = np.diff(positions[keep_arr])
    if len(steps) == 0:
        return keep_arr, 0.0
    step = float(np.median(steps))
    gaps = steps > 1.5 * step
    if gaps.any():
        notes.append(
            f"{int(gaps.sum())} gap(s) in slice positions (largest {steps.max():.2f} mm vs typical step {step:.2f} mm);"
            " slices stacked without filling"
        )
    return keep_arr, step


@quiet
def read_series(series: SeriesRef, pseudonym: Callable[[str], str]) -> Volume:
    """Decode one series into a float32 Volume in physical units and canonical RAS+ orientation.

    Values: ``apply_modality_lut`` (Rescale Slope/Intercept or a Modality LUT Sequence, per frame for enhanced
    objects) so CT is in HU; MONOCHROME1 mirrored within its value range so higher is brighter; colour (RGB, YBR,
    palette) converted to BT.601 luminance. When one linear map does all of that for every frame (`_one_linear_map`:
    the usual series), the Volume holds the stored values with that map as its slope/intercept, and ``Volume.array``
    gives the same float32 values. Geometry: frames ordered by ``cross(row, col) . ImagePositionPatient``;
    duplicates dropped, gaps noted; the LPS affine is converted to RAS and the array reoriented to the closest
    canonical RAS+ (axis 0 toward Right, 1 Anterior, 2 Superior). Without geometry (radiographs, ultrasound) or for a
    lone non-axial slice, frames stay in stored order as [columns, rows, frames] with both in-plane axes reversed, so
    the normalizer's display flip shows the image as stored.

    Args:
        series: a `SeriesRef` from `discover_series`.
        pseudonym: keyed pseudonym function; patient = pseudonym("patient:" + PatientID), volume =
            pseudonym("series:" + key).

    Returns:
        The Volume; ``positions_mm`` is the Superior coordinate of each axis-2 slice and ``notes`` lists remarks.

    Raises:
        ValueError: undecodable or inconsistent series, in one line without identifiers (a missing decoder plugin names
            the package to install).
    """
    notes: list[str] = []
    headers, frames = [], []
    for i, path in enumerate(series.files):
        try:
            ds = series.headers[i] if series.headers else pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception as e:
            raise ValueError(f"corrupt header: {clean(e, path)}") from e
        headers.append(ds)
        frames += frames_of(ds, i)
    first = headers[0]
    patient_id = text(first, "PatientID").strip()
    patient = pseudonym("patient:" + patient_id) if patient_id else ""
    iops = [orientation(ds) for ds in headers]
    geometric = all(iop is not None for iop in iops) and all(f.ipp is not None for f in frames)
    rows, cols = number(first, "Rows"), number(first, "Columns")
    if geometric:
        iop = np.array(iops[0])
        if any(np.abs(np.array(o) - iop).max() > 1e-3 for o in iops):
            raise ValueError("files of the series have different orientations; not a single volume")
        row_dir, col_dir = iop[:3], iop[3:]
        normal = np.cross(row_dir, col_dir)
        keep, step = _order(np.array([f.ipp @ normal for f in frames]), notes)
        if step == 0.0:
            step = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
    else:
        keep, step = np.arange(len(frames)), 1.0
        notes.append("no patient geometry: frames kept in stored order, orientation as stored")
    if any(number(ds, "NumberOfFrames") for ds in headers) and len(frames) > 1:
        notes.append(f"multi-frame: {len(keep)} slices from {len(frames)} frames")

    # Decode file by file into one float32 stack [slices, rows, cols]; each file's pixels are released after use.
    # When one linear map gives every frame its physical values (the usual CT or MR series), the stack keeps the stored
    # values and the Volume carries the map: normalization applies it after the resize, on 16x fewer pixels.
    linear = _one_linear_map(headers, [frames[int(k)].rescale for k in keep])
    stack = np.empty((len(keep), rows, cols), dtype=np.float32)
    per_file: list[list[tuple[int, Frame]]] = [[] for _ in headers]
    for s, k in enumerate(keep):
        per_file[frames[int(k)].file].append((s, frames[int(k)]))
    for path, wanted in zip(series.files, per_file, strict=True):
        if not wanted:
            continue
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception as e:
            raise ValueError(f"corrupt file: {clean(e, path)}") from e
        raw = _decode(ds)
        frame_shape = raw.shape[-2:] if number(ds, "SamplesPerPixel", 1) == 1 else raw.shape[-3:-1]
        if frame_shape != (rows, cols):
            raise ValueError(f"image size differs within the series (expected {rows}x{cols})")
        for s, f in wanted:
            frame = raw if f.frame is None else raw[f.frame]
            stack[s] = frame if linear else _to_float(frame, ds, f.rescale)
        del ds, raw  # the pixel bytes go before the next file: peak memory stays near one volume
    stored_as = {text(ds, "PhotometricInterpretation").strip() for ds in headers}
    if "MONOCHROME1" in stored_as:
        some = "" if len(stored_as) == 1 else f" ({len(stored_as)} photometric interpretations in the series)"
        notes.append(f"MONOCHROME1 inverted so higher values are brighter{some}")
    for colour in sorted(stored_as & set(_COLOUR)):
        notes.append(f"colour ({colour}) converted to luminance")
    if "MOSAIC" in series.label_tags.get("ImageType", "").upper():
        notes.append("Siemens MOSAIC kept as one 2-D image (tiles not unpacked)")

    # [slices, rows, cols] -> [cols, rows, slices]: X follows the row direction, Y the column direction (a view).
    array = stack.transpose(2, 1, 0)
    row_sp, col_sp = frames[int(keep[0])].spacing
    volume_key = pseudonym("series:" + series.key)
    scale = linear or (1.0, 0.0)
    if geometric:
        affine = np.eye(4)
        affine[:3, 0], affine[:3, 1], affine[:3, 2] = row_dir * col_sp, col_dir * row_sp, normal * step
        affine[:3, 3] = frames[int(keep[0])].ipp
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # DICOM LPS -> NIfTI RAS
        ornt = orientations.io_orientation(affine)
        # A lone sagittal/coronal slice would land on axis 0 or 1; it is kept as a 2-D image in its stored layout.
        if len(keep) > 1 or int(ornt[2, 0]) == 2:
            canon = orientations.apply_orientation(array, ornt)
            new_affine = affine @ orientations.inv_ornt_aff(ornt, array.shape)
            spacing = tuple(float(v) for v in np.linalg.norm(new_affine[:3, :3], axis=0))
            if int(ornt[2, 0]) == 2:  # the slice axis stays axis 2: report the measured positions, gaps included
                positions = np.sort(np.array([frames[int(k)].ipp[2] for k in keep]))
            else:
                positions = new_affine[2, 3] + np.arange(canon.shape[2]) * new_affine[2, 2]
            return Volume(canon, spacing, series.modality, patient, volume_key, positions, notes, *scale)
        notes.append("single non-axial slice kept as a 2-D image in its stored orientation")
    # Stored (display) layout: both axes reversed, so the normalizer's display flip shows the image as stored.
    return Volume(array[::-1, ::-1], (col_sp, row_sp, step), series.modality, patient, volume_key,
                  np.arange(array.shape[2]) * step, notes, *scale)  # fmt: skip
