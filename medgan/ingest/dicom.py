"""DICOM reader: find image series on disk, order slices along the normal, decode to a canonical RAS+ float32 Volume.

Two steps, so a caller can plan work before paying for pixels:

- `discover_series` walks a folder (regular files only), reads headers with ``pydicom.dcmread(stop_before_pixels=True)``
  and groups files into series (`SeriesRef`), skipping what is not a usable image with a one-line reason (`Skip`).
  Every size a header declares is checked against a limit and against the file's size before any pixel is decoded.
- `read_series` decodes one series with ``pydicom.dcmread`` + ``pydicom.pixels.pixel_array`` and
  ``apply_modality_lut``: CT in HU, MONOCHROME1 inverted, colour to luminance, enhanced multi-frame functional groups,
  slices ordered by position along the slice normal (never InstanceNumber), duplicates and gaps noted, and the array
  reoriented to the closest canonical RAS+ with nibabel, like `medgan.ingest.nifti`.

Privacy: reasons and notes never contain file paths or UIDs; `SeriesRef.identifiers` carries the header values
(PatientID, PatientName, UIDs, AccessionNumber) a caller must scrub from anything it writes (`privacy.Redactor`).

Example:
    >>> refs, skips = discover_series(Path("data/ct_series"))
    >>> vol = read_series(refs[0], pseudonym=lambda s: hashlib.sha256(s.encode()).hexdigest()[:16])
    >>> vol.array.shape, vol.spacing_mm
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import stat
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from nibabel import orientations
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medgan.ingest.volume import Volume

# Files a DICOM folder often carries that are certainly not DICOM; ignored silently rather than reported.
_IGNORED_SUFFIXES = (".md", ".txt", ".csv", ".json", ".xml", ".html", ".pdf", ".nii", ".nii.gz", ".png", ".jpg",
                     ".jpeg", ".zip", ".gz", ".py", ".yaml", ".yml", ".log")  # fmt: skip
# The pip package that decodes each compressed transfer syntax family (pydicom's pylibjpeg plugins).
_PLUGINS = {"1.2.840.10008.1.2.4.5": "pylibjpeg-libjpeg", "1.2.840.10008.1.2.4.7": "pylibjpeg-libjpeg",
            "1.2.840.10008.1.2.4.8": "pylibjpeg-libjpeg", "1.2.840.10008.1.2.4.9": "pylibjpeg-openjpeg",
            "1.2.840.10008.1.2.4.20": "pylibjpeg-openjpeg", "1.2.840.10008.1.2.5": "pylibjpeg-rle"}  # fmt: skip
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420", "PALETTE COLOR")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 luminance weights
_DUP_TOL_MM = 0.01  # slices closer than this along the normal are the same position
_UID_RE = re.compile(r"\d+(\.\d+){3,}")
_PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00")
# Header values that identify a patient or an object: scrubbed from every output (see `SeriesRef.identifiers`).
IDENTIFYING = ("PatientID", "PatientName", "OtherPatientIDs", "AccessionNumber", "StudyID", "StudyInstanceUID",
               "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")  # fmt: skip
_TAGS = ("Modality", "SeriesDescription", "ProtocolName", "BodyPartExamined", "ImageType", "SeriesNumber")
# A compressed frame rarely decodes to more than this many times its bytes; a header claiming more is a bomb.
_MAX_RATIO, _SMALL_BYTES = 1024, 64 << 20


@dataclass
class SeriesRef:
    """One DICOM series found on disk (headers only).

    Attributes:
        key: stable grouping key (SeriesInstanceUID, or a hash of geometry and description when UIDs are empty);
            internal only, never written: pass it through a keyed pseudonym.
        files: the files of the series, in scan order.
        modality: DICOM Modality ("OT" when absent).
        n_slices: frames in all files (multi-frame) or the number of files.
        label_tags: non-identifying header values for label mapping: SeriesDescription, ProtocolName, BodyPartExamined,
            ImageType (values joined by a backslash) and SeriesNumber ("" when absent).
        identifiers: the identifying header values of its files (`IDENTIFYING`), to scrub from outputs.
    """

    key: str
    files: list[Path]
    modality: str
    n_slices: int
    label_tags: dict[str, str] = field(default_factory=dict)
    identifiers: set[str] = field(default_factory=set, repr=False, compare=False)


@dataclass
class Skip:
    """A file or series that is not ingested, with a one-line reason free of identifiers."""

    path: Path
    reason: str
    identifiers: set[str] = field(default_factory=set, repr=False, compare=False)


def _clean(msg: object, path: Path | None = None) -> str:
    """One line of an exception message without the file path or anything shaped like a UID."""
    text = " ".join(str(msg).split()) or type(msg).__name__
    if path is not None:
        text = text.replace(str(path), "<file>").replace(path.name, "<file>")
    return _UID_RE.sub("<uid>", text)[:240]


def _quiet(fn: Callable) -> Callable:
    """Silence pydicom's warnings inside `fn`: they can quote file names and element values (UIDs)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)

    return wrapper


def regular_file_problem(path: Path, root: Path | None = None) -> str | None:
    """Why `path` is not a regular file medgan may read (broken or looping symlink, FIFO, device, a link leaving
    `root`), or None. Nothing is opened: a FIFO or ``/dev/zero`` would block or never end."""
    try:
        st = os.stat(path)  # follows symlinks
    except OSError as e:
        if os.path.islink(path):
            return "symlink loop" if e.errno == 40 else "dangling symlink (its target does not exist)"
        return f"cannot stat ({os.strerror(e.errno) if e.errno else type(e).__name__})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (FIFO, socket or device): not read"
    if root is not None and not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root)):
        return "symlink leads outside --root: not read"
    return None


def dicom_files(source: Path, root: Path | None = None) -> tuple[list[Path], list[Skip]]:
    """The candidate DICOM files under a folder (recursive, sorted) or the single file `source`, and the entries left
    out with a reason (`regular_file_problem`). Symlinked sub-folders are not followed. DICOMDIR, hidden files and
    obvious non-DICOM files (``.md``, ``.nii.gz``, ``.png``...) are left out silently.

    Raises:
        FileNotFoundError: `source` does not exist.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"DICOM source {source} does not exist; check the manifest path and --root")
    if not source.is_dir():
        problem = regular_file_problem(source, root)
        return ([], [Skip(source, problem)]) if problem else ([source], [])
    paths, skips = [], []
    for folder, dirs, names in os.walk(source, onerror=None):
        dirs.sort()
        for d in [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            skips.append(Skip(Path(folder) / d, "symlinked folder: not followed"))
        dirs[:] = [d for d in dirs if not d.startswith(".") and not os.path.islink(os.path.join(folder, d))]
        for name in sorted(names):
            if name.startswith(".") or name.upper() == "DICOMDIR" or name.lower().endswith(_IGNORED_SUFFIXES):
                continue
            path = Path(folder) / name
            problem = regular_file_problem(path, root)
            if problem:
                skips.append(Skip(path, problem))
            else:
                paths.append(path)
    return paths, skips


def _decoder_problem(tsuid: UID) -> str | None:
    """Why pixels in this transfer syntax cannot be decoded here, or None when they can."""
    if not tsuid.is_compressed:
        return None
    plugin = next((p for prefix, p in _PLUGINS.items() if tsuid.startswith(prefix)), "python-gdcm")
    try:
        if get_decoder(tsuid).is_available:
            return None
    except NotImplementedError:
        return f"cannot decode {tsuid.name}: pydicom has no decoder for this transfer syntax"
    return f"cannot decode {tsuid.name}: no decoder plugin (install {plugin})"


def _deflate_problem(path: Path, limit_bytes: int) -> str | None:
    """A Deflated Explicit VR file whose dataset inflates past the limit (pydicom inflates it whole), or None."""
    meta = pydicom.filereader.read_file_meta_info(path)
    length = meta.get("FileMetaInformationGroupLength")
    if length is None:
        return None  # pydicom reads it or says what is wrong
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    with open(path, "rb") as fp:
        fp.seek(132 + 12 + int(length))  # preamble, DICM, the group length element, then the File Meta group
        while (data := fp.read(1 << 20)) and not d.eof:
            try:
                while data and total <= limit_bytes:
                    total += len(d.decompress(data, 1 << 24))
                    data = d.unconsumed_tail
            except zlib.error:
                return None  # pydicom reads it or says what is wrong
            if total > limit_bytes:
                return f"deflated data inflates past ingest.max_volume_mb ({limit_bytes >> 20} MB): not read"
    return None


def _read_header(path: Path, limit_bytes: int) -> tuple[Dataset, bool, int]:
    """The header of a DICOM file (preamble or not), whether Pixel Data follows it, and where (0 where unknown).

    Raises:
        InvalidDicomError: not a DICOM file.
        ValueError: a deflated dataset over the limit.
    """
    with open(path, "rb") as fp:
        head = fp.read(132)
        fp.seek(0)
        # Files without the 128-byte preamble are accepted only if they start with a group 0002/0008 element.
        force = head[128:132] != b"DICM" and head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x08")
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=force)
        tsuid = ds.file_meta.get("TransferSyntaxUID")
        if tsuid is not None and UID(tsuid).is_deflated:
            problem = _deflate_problem(path, limit_bytes)
            if problem:
                raise ValueError(problem)
            ds = pydicom.dcmread(path, force=force)  # the offset in a deflated file is not the file's: read it all
            has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
            offset = 0
            if "PixelData" in ds:
                del ds.PixelData  # headers only from here on (the pixels are read again by `read_series`)
        else:
            offset = fp.tell()
            has_pixels = fp.read(4) in _PIXEL_TAGS
    if force and "SOPClassUID" not in ds:
        raise InvalidDicomError("no SOP Class UID")
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    return ds, has_pixels, offset


def _int(ds: Dataset, keyword: str, default: int = 0) -> int:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def pixel_bytes(ds: Dataset, stored: bool = False) -> int:
    """Bytes the header declares for its decoded pixels: frames x rows x columns x samples x bits allocated / 8; with
    `stored`, as uncompressed Pixel Data holds them (YBR_FULL_422 keeps 2 of every 3 samples)."""
    bits = max(_int(ds, "BitsAllocated", 16), 1)
    spp = _int(ds, "SamplesPerPixel", 1)
    n = _int(ds, "NumberOfFrames", 1) * _int(ds, "Rows") * _int(ds, "Columns") * spp
    if stored and spp == 3 and _text(ds, "PhotometricInterpretation").strip() == "YBR_FULL_422":
        n = n * 2 // 3
    return max(n, 0) * bits // 8


def _size_problem(ds: Dataset, file_size: int, offset: int, limit_bytes: int) -> str | None:
    """Why the pixels a header declares are not read: over the limit, more than the file holds (uncompressed), or an
    implausible compression ratio (a decompression bomb); None when they may be decoded."""
    declared = pixel_bytes(ds)
    dims = f"{_int(ds, 'NumberOfFrames', 1)}x{_int(ds, 'Rows')}x{_int(ds, 'Columns')}"
    # float32 physical values are what a volume holds after reading
    decoded = declared * 4 // max(1, _int(ds, "BitsAllocated", 16) // 8)
    if decoded > limit_bytes:
        return (f"declares {dims} pixels ({decoded >> 20} MB as float32), over ingest.max_volume_mb "
                f"({limit_bytes >> 20} MB): not read")  # fmt: skip
    tsuid = UID(ds.file_meta.TransferSyntaxUID)
    if tsuid.is_compressed or tsuid.is_deflated or not offset:
        if declared > max(_SMALL_BYTES, _MAX_RATIO * file_size):
            return f"declares {dims} pixels ({declared >> 20} MB) from a {file_size}-byte file: not read"
    elif offset + pixel_bytes(ds, stored=True) > file_size:
        have = max(file_size - offset - 12, 0)
        return (
            f"truncated: {have} of the {pixel_bytes(ds, stored=True)} pixel bytes its header declares are in the file"
        )
    return None


def _sop_name(ds: Dataset) -> str:
    sop = ds.get("SOPClassUID")
    try:
        name = UID(str(sop)).name if sop else ""
    except Exception:
        return ""
    return name if name != str(sop) and not _UID_RE.fullmatch(name) else ""


def _not_image(ds: Dataset, has_pixels: bool) -> str | None:
    """Reason a header is not an image we can use (RT objects, SR, SEG, waveforms, presentation states...)."""
    name = _sop_name(ds)
    if not has_pixels:
        return f"no pixel data ({name or 'no known SOP class'})"
    if name and "Image Storage" not in name:
        return f"not an image: {name} ({_text(ds, 'Modality') or '?'})"
    if not (_int(ds, "Rows") and _int(ds, "Columns")):
        return "no image size (Rows/Columns) in the header" + (f" ({name})" if name else "")
    return None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    return "\\".join(str(v) for v in value) if isinstance(value, pydicom.multival.MultiValue) else str(value)


def identifiers(ds: Dataset) -> set[str]:
    """The identifying values of a header (`IDENTIFYING`), and the parts of a person name."""
    out = set()
    for keyword in IDENTIFYING:
        try:
            value = _text(ds, keyword).strip()
        except Exception:
            continue
        if value:
            out.add(value)
            out.update(p for p in re.split(r"[\^\\=\s]+", value) if len(p) >= 3)
    return out


def _fg(ds: Dataset, frame: int, name: str) -> Dataset | None:
    """Functional group item `name` for a frame: the per-frame one, else the shared one, else None."""
    for seq_name, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(seq_name)
        if seq and idx < len(seq) and seq[idx].get(name):
            return seq[idx].get(name)[0]
    return None


def _orientation(ds: Dataset) -> list[float] | None:
    """ImageOrientationPatient of the file, top-level or from the plane orientation functional group."""
    iop = ds.get("ImageOrientationPatient")
    if iop and len(iop) == 6:
        return [float(v) for v in iop]
    item = _fg(ds, 0, "PlaneOrientationSequence")
    return [float(v) for v in item.ImageOrientationPatient] if item is not None else None


@dataclass
class _Frame:
    """One 2-D frame: where its pixels live and where it sits in the patient."""

    file: int
    frame: int | None  # None: the file's only frame
    ipp: np.ndarray | None
    spacing: tuple[float, float]  # (row spacing, column spacing) mm
    rescale: Dataset  # the dataset/item holding RescaleSlope/Intercept or a Modality LUT


def _frames(ds: Dataset, index: int) -> list[_Frame]:
    """Per-frame geometry and value transform of one file (classic single-frame or enhanced multi-frame)."""
    n = _int(ds, "NumberOfFrames", 1) or 1
    if not (ds.get("PerFrameFunctionalGroupsSequence") or ds.get("SharedFunctionalGroupsSequence")):
        spacing = next((s for s in (ds.get("PixelSpacing"), ds.get("ImagerPixelSpacing")) if s and min(s) > 0),
                       (1, 1))  # fmt: skip
        ipp = ds.get("ImagePositionPatient")
        ipp = np.array(ipp, float) if ipp and len(ipp) == 3 and n == 1 else None
        return [_Frame(index, None if n == 1 else f, ipp, tuple(map(float, spacing)), ds) for f in range(n)]
    out = []
    for f in range(n):
        pos, meas = _fg(ds, f, "PlanePositionSequence"), _fg(ds, f, "PixelMeasuresSequence")
        ipp = np.array(pos.ImagePositionPatient, float) if pos is not None and pos.get("ImagePositionPatient") else None
        spacing = tuple(map(float, meas.PixelSpacing)) if meas is not None and meas.get("PixelSpacing") else (1.0, 1.0)
        out.append(_Frame(index, f, ipp, spacing, _fg(ds, f, "PixelValueTransformationSequence") or ds))
    return out


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
    """

    path: Path
    group: tuple
    positions: list[float]
    n_frames: int
    tags: dict[str, str]
    identifiers: set[str]


@_quiet
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


@_quiet
def scan_files(paths: list[Path], source: Path, max_volume_mb: float = 4096) -> tuple[list[ScannedFile], list[Skip]]:
    """Parse the headers of `paths` (files under `source`, in order): the usable image files, and the skipped ones
    with a reason (not DICOM, corrupt, no pixel data, no decoder, a declared size over the limit or the file)."""
    limit = int(max_volume_mb * (1 << 20))
    skips: list[Skip] = []
    out: list[ScannedFile] = []
    for path in paths:
        try:
            ds, has_pixels, offset = _read_header(path, limit)
            tsuid = UID(ds.file_meta.TransferSyntaxUID)
            reason = (_not_image(ds, has_pixels) or _decoder_problem(tsuid)
                      or _size_problem(ds, path.stat().st_size, offset, limit))  # fmt: skip
        except InvalidDicomError:
            skips.append(Skip(path, "not a DICOM file"))
            continue
        except MemoryError:
            skips.append(Skip(path, "not enough memory to read the header"))
            continue
        except ValueError as e:
            skips.append(
                Skip(path, _clean(e, path) if "max_volume_mb" in str(e) else f"corrupt header: {_clean(e, path)}")
            )
            continue
        except Exception as e:  # pydicom raises many types on corrupt headers
            skips.append(Skip(path, f"corrupt header: {_clean(e, path)}"))
            continue
        if reason:
            skips.append(Skip(path, reason, identifiers(ds)))
            continue
        try:
            iop = _orientation(ds)
            geom = (tuple(np.round(iop, 3)) if iop else None, _int(ds, "Rows"), _int(ds, "Columns"))
            uid = _text(ds, "SeriesInstanceUID")
            if not uid:
                parts = [_text(ds, "FrameOfReferenceUID"), *map(str, geom), _text(ds, "SeriesDescription")]
                uid = "fallback:" + hashlib.sha256("|".join([*parts, _text(ds, "SeriesNumber")]).encode()).hexdigest()
            if iop is not None:
                normal = np.cross(iop[:3], iop[3:])
                positions = [float(f.ipp @ normal) if f.ipp is not None else np.nan for f in _frames(ds, 0)]
            else:
                positions = [np.nan]
            tags = {t: _text(ds, t) for t in _TAGS}
        except Exception as e:
            skips.append(Skip(path, f"corrupt header: {_clean(e, path)}", identifiers(ds)))
            continue
        # Files without geometry stay alone; their key part is the path below `source`, stable wherever data moves.
        alone = (path.relative_to(source).as_posix() if source.is_dir() else path.name) if iop is None else ""
        n_frames = max(_int(ds, "NumberOfFrames", 1), 1)
        out.append(ScannedFile(path, (uid, geom, alone), positions, n_frames, tags, identifiers(ds)))
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
            label_tags = {t: tags.get(t, "") for t in _TAGS[1:]}
            series.append(SeriesRef(key, [m.path for m in members], tags.get("Modality") or "OT", n, label_tags, ids))
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
        raise ValueError(f"cannot decode the pixels: missing image attribute ({_clean(e)})") from e
    except Exception as e:
        tsuid = UID(ds.file_meta.TransferSyntaxUID)
        problem = _decoder_problem(tsuid)
        if problem:
            raise ValueError(problem) from e
        raise ValueError(f"truncated or corrupt pixel data ({tsuid.name}): {_clean(e)}") from e


def _to_float(raw: np.ndarray, ds: Dataset, item: Dataset) -> np.ndarray:
    """One frame's physical values (float32): colour to luminance, modality LUT, MONOCHROME1 mirrored."""
    photometric = _text(ds, "PhotometricInterpretation").strip() or "MONOCHROME2"
    if photometric in _COLOUR:
        rgb = apply_color_lut(raw, ds) if photometric == "PALETTE COLOR" else raw
        return (np.asarray(rgb, np.float32) @ _LUMA).astype(np.float32)
    out = np.asarray(apply_modality_lut(raw, item), dtype=np.float32)
    if photometric == "MONOCHROME1":
        # Mirror within the stored-value range mapped through the same LUT, so the units' range is kept.
        bits, signed = _int(ds, "BitsStored", 16), _int(ds, "PixelRepresentation")
        ends = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1])
        lo, hi = np.asarray(apply_modality_lut(ends, item), np.float64)
        out = (lo + hi - out).astype(np.float32)
    return out


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


@_quiet
def read_series(series: SeriesRef, pseudonym: Callable[[str], str]) -> Volume:
    """Decode one series into a float32 Volume in physical units and canonical RAS+ orientation.

    Values: ``apply_modality_lut`` (Rescale Slope/Intercept or a Modality LUT Sequence, per frame for enhanced
    objects) so CT is in HU; MONOCHROME1 mirrored within its value range so higher is brighter; colour (RGB, YBR,
    palette) converted to BT.601 luminance. Geometry: frames ordered by ``cross(row, col) . ImagePositionPatient``;
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
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception as e:
            raise ValueError(f"corrupt header: {_clean(e, path)}") from e
        headers.append(ds)
        frames += _frames(ds, i)
    first = headers[0]
    patient_id = _text(first, "PatientID").strip()
    patient = pseudonym("patient:" + patient_id) if patient_id else ""
    photometric = _text(first, "PhotometricInterpretation").strip()
    iops = [_orientation(ds) for ds in headers]
    geometric = all(iop is not None for iop in iops) and all(f.ipp is not None for f in frames)
    rows, cols = _int(first, "Rows"), _int(first, "Columns")
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
    if any(_int(ds, "NumberOfFrames") for ds in headers) and len(frames) > 1:
        notes.append(f"multi-frame: {len(keep)} slices from {len(frames)} frames")

    # Decode file by file into one float32 stack [slices, rows, cols]; each file's pixels are released after use.
    stack = np.empty((len(keep), rows, cols), dtype=np.float32)
    per_file: list[list[tuple[int, _Frame]]] = [[] for _ in headers]
    for s, k in enumerate(keep):
        per_file[frames[int(k)].file].append((s, frames[int(k)]))
    for path, wanted in zip(series.files, per_file, strict=True):
        if not wanted:
            continue
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception as e:
            raise ValueError(f"corrupt file: {_clean(e, path)}") from e
        raw = _decode(ds)
        frame_shape = raw.shape[-2:] if _int(ds, "SamplesPerPixel", 1) == 1 else raw.shape[-3:-1]
        if frame_shape != (rows, cols):
            raise ValueError(f"image size differs within the series (expected {rows}x{cols})")
        for s, f in wanted:
            stack[s] = _to_float(raw if f.frame is None else raw[f.frame], ds, f.rescale)
        del ds, raw  # the pixel bytes go before the next file: peak memory stays near one volume
    if photometric == "MONOCHROME1":
        notes.append("MONOCHROME1 inverted so higher values are brighter")
    elif photometric in _COLOUR:
        notes.append(f"colour ({photometric}) converted to luminance")
    if "MOSAIC" in series.label_tags.get("ImageType", "").upper():
        notes.append("Siemens MOSAIC kept as one 2-D image (tiles not unpacked)")

    # [slices, rows, cols] -> [cols, rows, slices]: X follows the row direction, Y the column direction (a view).
    array = stack.transpose(2, 1, 0)
    row_sp, col_sp = frames[int(keep[0])].spacing
    volume_key = pseudonym("series:" + series.key)
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
            return Volume(canon, spacing, series.modality, patient, volume_key, positions, notes)
        notes.append("single non-axial slice kept as a 2-D image in its stored orientation")
    # Stored (display) layout: both axes reversed, so the normalizer's display flip shows the image as stored.
    return Volume(array[::-1, ::-1], (col_sp, row_sp, step), series.modality, patient, volume_key,
                  np.arange(array.shape[2]) * step, notes)  # fmt: skip
