"""DICOM files and headers: regular files only, headers through ``pydicom.dcmread(stop_before_pixels=True)``, every
size a header declares checked against ``ingest.max_volume_mb`` and the file before a pixel is decoded, the identifying
values a header carries, and per-frame geometry (classic and enhanced multi-frame).

Privacy: reasons never contain file paths or UIDs (`clean`); `identifiers` lists the header values a caller must scrub
from anything it writes (`privacy.Redactor`).
"""

from __future__ import annotations

import errno
import functools
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
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

# Files a DICOM folder often carries that are certainly not DICOM; ignored silently rather than reported.
_IGNORED_SUFFIXES = (".md", ".txt", ".csv", ".json", ".xml", ".html", ".pdf", ".nii", ".nii.gz", ".png", ".jpg",
                     ".jpeg", ".zip", ".gz", ".py", ".yaml", ".yml", ".log")  # fmt: skip
# The pip package that decodes each compressed transfer syntax family (pydicom's pylibjpeg plugins).
_PLUGINS = {"1.2.840.10008.1.2.4.5": "pylibjpeg-libjpeg", "1.2.840.10008.1.2.4.7": "pylibjpeg-libjpeg",
            "1.2.840.10008.1.2.4.8": "pylibjpeg-libjpeg", "1.2.840.10008.1.2.4.9": "pylibjpeg-openjpeg",
            "1.2.840.10008.1.2.4.20": "pylibjpeg-openjpeg", "1.2.840.10008.1.2.5": "pylibjpeg-rle"}  # fmt: skip
_UID_RE = re.compile(r"\d+(\.\d+){3,}")
_PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00")
# Header values that identify a patient or an object: scrubbed from every output (see `SeriesRef.identifiers`).
IDENTIFYING = ("PatientID", "PatientName", "OtherPatientIDs", "AccessionNumber", "StudyID", "StudyInstanceUID",
               "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")  # fmt: skip
TAGS = ("Modality", "SeriesDescription", "ProtocolName", "BodyPartExamined", "ImageType", "SeriesNumber")
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
        headers: the files' headers as discovery read them (`read_series` then parses each file's header once more,
            with its pixels, instead of twice); empty for a hand-made SeriesRef.
    """

    key: str
    files: list[Path]
    modality: str
    n_slices: int
    label_tags: dict[str, str] = field(default_factory=dict)
    identifiers: set[str] = field(default_factory=set, repr=False, compare=False)
    headers: list[Dataset] = field(default_factory=list, repr=False, compare=False)  # from discovery, if kept


@dataclass
class Skip:
    """A file or series that is not ingested, with a one-line reason free of identifiers."""

    path: Path
    reason: str
    identifiers: set[str] = field(default_factory=set, repr=False, compare=False)


def clean(msg: object, path: Path | None = None) -> str:
    """One line of an exception message without the file path or anything shaped like a UID."""
    text = " ".join(str(msg).split()) or type(msg).__name__
    if path is not None:
        text = text.replace(str(path), "<file>").replace(path.name, "<file>")
    return _UID_RE.sub("<uid>", text)[:240]


def quiet(fn: Callable) -> Callable:
    """Silence pydicom's warnings inside `fn`: they can quote file names and element values (UIDs).

    pydicom's value validation on reading only ever warns, so it is switched off too (``reading_validation_mode``,
    pydicom's own setting): it is silenced anyway, and it costs about as much as converting the values. A value
    pydicom cannot convert at all still raises.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        settings = pydicom.config.settings
        mode = settings.reading_validation_mode
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            settings.reading_validation_mode = pydicom.config.IGNORE
            try:
                return fn(*args, **kwargs)
            finally:
                settings.reading_validation_mode = mode

    return wrapper


def regular_file_problem(path: Path, root: Path | None = None) -> str | None:
    """Why `path` is not a regular file medgan may read (broken or looping symlink, FIFO, device, a link leaving
    `root`), or None. Nothing is opened: a FIFO or ``/dev/zero`` would block or never end."""
    try:
        st = os.stat(path)  # follows symlinks
    except OSError as e:
        if os.path.islink(path):
            return "symlink loop" if e.errno == errno.ELOOP else "dangling symlink (its target does not exist)"
        return f"cannot stat ({os.strerror(e.errno) if e.errno else type(e).__name__})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (FIFO, socket or device): not read"
    if root is not None and not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root)):
        return "symlink leads outside --root: not read"
    return None


def candidate_name(name: str) -> bool:
    """Whether a file of this name is read as a possible DICOM file: not hidden, not DICOMDIR, not an obvious other
    format (``.md``, ``.nii.gz``, ``.png``...)."""
    return not (name.startswith(".") or name.upper() == "DICOMDIR" or name.lower().endswith(_IGNORED_SUFFIXES))


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
            if not candidate_name(name):
                continue
            path = Path(folder) / name
            problem = regular_file_problem(path, root)
            if problem:
                skips.append(Skip(path, problem))
            else:
                paths.append(path)
    return paths, skips


def decoder_problem(tsuid: UID) -> str | None:
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


def read_header(path: Path, limit_bytes: int) -> tuple[Dataset, bool, int]:
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


def number(ds: Dataset, keyword: str, default: int = 0) -> int:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def pixel_bytes(ds: Dataset, stored: bool = False) -> int:
    """Bytes the header declares for its decoded pixels: frames x rows x columns x samples x bits allocated / 8; with
    `stored`, as uncompressed Pixel Data holds them (YBR_FULL_422 keeps 2 of every 3 samples)."""
    bits = max(number(ds, "BitsAllocated", 16), 1)
    spp = number(ds, "SamplesPerPixel", 1)
    n = number(ds, "NumberOfFrames", 1) * number(ds, "Rows") * number(ds, "Columns") * spp
    if stored and spp == 3 and text(ds, "PhotometricInterpretation").strip() == "YBR_FULL_422":
        n = n * 2 // 3
    return max(n, 0) * bits // 8


def size_problem(ds: Dataset, file_size: int, offset: int, limit_bytes: int) -> str | None:
    """Why the pixels a header declares are not read: over the limit, more than the file holds (uncompressed), or an
    implausible compression ratio (a decompression bomb); None when they may be decoded."""
    declared = pixel_bytes(ds)
    dims = f"{number(ds, 'NumberOfFrames', 1)}x{number(ds, 'Rows')}x{number(ds, 'Columns')}"
    # float32 physical values are what a volume holds after reading
    decoded = declared * 4 // max(1, number(ds, "BitsAllocated", 16) // 8)
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


def cut_short(ds: Dataset) -> bool:
    """Whether the file ended inside the header's last element (its value is shorter than the length it declares):
    a truncated file. A file cut exactly between two elements cannot be told from a complete one."""
    tags = list(ds.keys())
    raw = ds.get_item(tags[-1]) if tags else None
    return isinstance(raw, RawDataElement) and raw.value is not None and len(raw.value) < raw.length


def not_image(ds: Dataset, has_pixels: bool, at_end: bool = False) -> str | None:
    """Reason a header is not an image we can use (RT objects, SR, SEG, waveforms, presentation states...), or a
    truncated file (`at_end`: the header reached the end of the file, inside an element)."""
    name = _sop_name(ds)
    if not has_pixels and at_end and cut_short(ds):
        return f"truncated: the file ends inside its header ({name or 'no known SOP class'})"
    if not has_pixels:
        return f"no pixel data ({name or 'no known SOP class'})"
    if name and "Image Storage" not in name:
        return f"not an image: {name} ({text(ds, 'Modality') or '?'})"
    if not (number(ds, "Rows") and number(ds, "Columns")):
        return "no image size (Rows/Columns) in the header" + (f" ({name})" if name else "")
    return None


def text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    return "\\".join(str(v) for v in value) if isinstance(value, pydicom.multival.MultiValue) else str(value)


def identifiers(ds: Dataset) -> set[str]:
    """The identifying values of a header (`IDENTIFYING`), and the parts of a person name."""
    out = set()
    for keyword in IDENTIFYING:
        try:
            value = text(ds, keyword).strip()
        except Exception:
            continue
        if value:
            out.add(value)
            out.update(p for p in re.split(r"[\^\\=\s]+", value) if len(p) >= 3)
    return out


def functional_group(ds: Dataset, frame: int, name: str) -> Dataset | None:
    """Functional group item `name` for a frame: the per-frame one, else the shared one, else None."""
    for seq_name, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(seq_name)
        if seq and idx < len(seq) and seq[idx].get(name):
            return seq[idx].get(name)[0]
    return None


def orientation(ds: Dataset) -> list[float] | None:
    """ImageOrientationPatient of the file, top-level or from the plane orientation functional group."""
    iop = ds.get("ImageOrientationPatient")
    if iop and len(iop) == 6:
        return [float(v) for v in iop]
    item = functional_group(ds, 0, "PlaneOrientationSequence")
    return [float(v) for v in item.ImageOrientationPatient] if item is not None else None


@dataclass
class Frame:
    """One 2-D frame: where its pixels live and where it sits in the patient."""

    file: int
    frame: int | None  # None: the file's only frame
    ipp: np.ndarray | None
    spacing: tuple[float, float]  # (row spacing, column spacing) mm
    rescale: Dataset  # the dataset/item holding RescaleSlope/Intercept or a Modality LUT


def frames_of(ds: Dataset, index: int) -> list[Frame]:
    """Per-frame geometry and value transform of one file (classic single-frame or enhanced multi-frame)."""
    n = number(ds, "NumberOfFrames", 1) or 1
    if not (ds.get("PerFrameFunctionalGroupsSequence") or ds.get("SharedFunctionalGroupsSequence")):
        spacing = next((s for s in (ds.get("PixelSpacing"), ds.get("ImagerPixelSpacing")) if s and min(s) > 0),
                       (1, 1))  # fmt: skip
        ipp = ds.get("ImagePositionPatient")
        ipp = np.array(ipp, float) if ipp and len(ipp) == 3 and n == 1 else None
        return [Frame(index, None if n == 1 else f, ipp, tuple(map(float, spacing)), ds) for f in range(n)]
    out = []
    for f in range(n):
        pos, meas = functional_group(ds, f, "PlanePositionSequence"), functional_group(ds, f, "PixelMeasuresSequence")
        ipp = np.array(pos.ImagePositionPatient, float) if pos is not None and pos.get("ImagePositionPatient") else None
        spacing = tuple(map(float, meas.PixelSpacing)) if meas is not None and meas.get("PixelSpacing") else (1.0, 1.0)
        item = functional_group(ds, f, "PixelValueTransformationSequence") or ds
        out.append(Frame(index, None if n == 1 else f, ipp, spacing, item))  # one frame: pixels are [rows, cols]
    return out
