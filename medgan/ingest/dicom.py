"""DICOM reader: find image series on disk, order slices along the normal, decode to a canonical RAS+ float32 Volume.

Two steps, so a caller can plan work before paying for pixels:

- `discover_series` walks a folder, reads headers only and groups files into series (`SeriesRef`), skipping what is not
  a usable image with a one-line reason (`Skip`).
- `read_series` decodes one series: modality LUT (CT in HU), MONOCHROME1 inverted, colour to luminance, enhanced
  multi-frame functional groups, slices ordered by position along the slice normal (never InstanceNumber),
  duplicates and gaps noted, and the array reoriented to the closest canonical RAS+ with nibabel, like
  `medgan.ingest.nifti`.

Privacy: reasons, notes and error messages never contain patient names, IDs, dates, accession numbers, UIDs or file
paths (file names often embed SOP Instance UIDs); the caller turns `Skip.path` into a path relative to its root.

Example:
    >>> refs, skips = discover_series(Path("data/ct_series"))
    >>> vol = read_series(refs[0], pseudonym=lambda s: hashlib.sha256(s.encode()).hexdigest()[:16])
    >>> vol.array.shape, vol.spacing_mm
"""

from __future__ import annotations

import functools
import hashlib
import io
import mmap
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from nibabel import orientations
from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import data_element_generator, read_dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medgan.ingest.volume import Volume

# Files a DICOM folder often carries that are certainly not DICOM; ignored silently rather than reported.
_IGNORED_SUFFIXES = (".md", ".txt", ".csv", ".json", ".xml", ".html", ".pdf", ".nii", ".nii.gz", ".png", ".jpg",
                     ".jpeg", ".zip", ".gz", ".py", ".yaml", ".yml", ".log")  # fmt: skip
# The pip package that decodes each compressed transfer syntax family (pydicom's pylibjpeg plugins).
_PLUGINS = {"1.2.840.10008.1.2.4.5": "pylibjpeg-libjpeg", "1.2.840.10008.1.2.4.7": "pylibjpeg-libjpeg",
            "1.2.840.10008.1.2.4.8": "pylibjpeg-libjpeg", "1.2.840.10008.1.2.4.9": "pylibjpeg-openjpeg",
            "1.2.840.10008.1.2.4.20": "pylibjpeg-openjpeg", "1.2.840.10008.1.2.5": "pylibjpeg-rle"}  # fmt: skip
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "PALETTE COLOR")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 luminance weights
_DUP_TOL_MM = 0.01  # slices closer than this along the normal are the same position
_DELIM = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # Sequence Delimitation Item closing encapsulated Pixel Data
_UID_RE = re.compile(r"\d+(\.\d+){3,}")
_HEAD_BYTES, _HEAD_MAX = 1 << 15, 1 << 20  # first read of a header parsed in memory (`_header`), and its limit
_head_bytes = _HEAD_BYTES  # the first read now: the last header's length rounded up (files of a series are alike)
_PIXEL_TAG = {True: b"\xe0\x7f\x10\x00", False: b"\x7f\xe0\x00\x10"}  # (7FE0,0010) Pixel Data; key: little endian


@dataclass
class SeriesRef:
    """One DICOM series found on disk (headers only).

    Attributes:
        key: stable grouping key (SeriesInstanceUID, or a hash of geometry and description when UIDs are empty);
            internal only, never written: pass it through a keyed pseudonym.
        files: the files of the series, sorted by path.
        modality: DICOM Modality ("OT" when absent).
        n_slices: frames in all files (multi-frame) or the number of files.
        label_tags: non-identifying header values for label mapping: SeriesDescription, ProtocolName, BodyPartExamined,
            ImageType (values joined by a backslash) and SeriesNumber ("" when absent).
        headers: (header dataset, Pixel Data byte offset) per file from discovery, so `read_series` parses each header
            once and only reads the pixel bytes; empty for a hand-made SeriesRef (files are then read in full).
    """

    key: str
    files: list[Path]
    modality: str
    n_slices: int
    label_tags: dict[str, str] = field(default_factory=dict)
    headers: list[tuple[Dataset, int]] = field(default_factory=list, repr=False, compare=False)


@dataclass
class Skip:
    """A file or series that is not ingested, with a one-line reason free of identifiers."""

    path: Path
    reason: str


def _clean(msg: object, path: Path | None = None) -> str:
    """One line of an exception message without the file path or anything shaped like a UID."""
    text = str(msg).splitlines()[0] if str(msg) else type(msg).__name__
    if path is not None:
        text = text.replace(str(path), "<file>").replace(path.name, "<file>")
    return _UID_RE.sub("<uid>", text)[:200]


def _read(path: Path, header_only: bool) -> tuple[Dataset, int]:
    """Read a DICOM file (with or without preamble); return it and the byte offset where Pixel Data starts.

    Raises:
        InvalidDicomError: not a DICOM file.
    """
    if header_only:
        with open(path, "rb", buffering=0) as fp:
            return _header(fp, path)
    with open(path, "rb") as fp:
        return _parse(fp, header_only)


def _header(fp: BinaryIO, path: Path) -> tuple[Dataset, int]:
    """The header and Pixel Data offset of the file `path`, open unbuffered as `fp`: parsed in memory from its first
    bytes by `_parse_head` when that applies, else by ``dcmread`` (`_parse`) from the file.

    The first read is as long as the last header needed (at least 32 KB: CT headers are 1-10 KB, Siemens MR with
    its private CSA headers ~130 KB); a longer header is read on in 4x steps up to 1 MB.
    """
    global _head_bytes
    want = _head_bytes
    head = fp.read(want)
    while True:
        try:
            parsed = _parse_head(head)
        except Exception:
            parsed = None  # whatever this quick path cannot read, dcmread reads or explains
        if parsed is not None:
            _head_bytes = min(max(_HEAD_BYTES, 1 << (parsed[1] + 1024).bit_length()), _HEAD_MAX)
            return parsed
        if len(head) < want or want >= _HEAD_MAX:
            break  # the whole file is read (no Pixel Data, a cut file), or a header too long to keep in memory
        want *= 4
        head += fp.read(want - len(head))
    with open(path, "rb") as buffered:
        return _parse(buffered, header_only=True)


def _not_meta(tag: int, vr: str | None, length: int) -> bool:
    return tag >> 16 != 2


def _at_pixels(tag: int, vr: str | None, length: int) -> bool:
    return tag in (0x7FE00010, 0x7FE00009, 0x7FE00008)  # where a header-only dcmread stops


def _parse_head(head: bytes) -> tuple[Dataset, int] | None:
    """A header-only ``dcmread`` of a file whose first bytes are `head`, with pydicom's own `read_dataset` on an
    in-memory buffer; None when this quick path does not apply, and the caller reads the file with ``dcmread``.

    It applies to a Part 10 file (preamble and ``DICM``) with a File Meta group naming a standard, non-deflated
    transfer syntax, no command set, and the (7FE0,0010) Pixel Data element starting inside `head`. That is nearly
    every image file; each element is the same raw element ``dcmread`` gives. What it skips is ``dcmread``'s
    per-file setup (the file-like wrapper, a ``FileDataset`` with its file attributes, a read per element on a
    buffered file, the File Meta group built twice), which costs more than parsing a typical header: ~0.15 vs
    ~0.35 ms per CT slice here. The transfer syntax is converted once per process (`_value`).
    """
    if head[128:132] != b"DICM":
        return None
    buf = io.BytesIO(head)
    buf.seek(132)
    meta = FileMetaDataset({e.tag: e for e in data_element_generator(buf, False, True, stop_when=_not_meta)})
    meta.set_original_encoding(False, True, default_encoding)  # File Meta is always explicit VR little endian
    tsuid = _value(meta, "TransferSyntaxUID")
    start = buf.tell()
    if (
        not tsuid
        or not tsuid.is_transfer_syntax
        or tsuid.is_private
        or tsuid.is_deflated
        or head[start : start + 2] == b"\0\0"
    ):
        return None  # no, unknown, private or deflated syntax; or a command set (group 0000, always implicit VR)
    implicit, little = tsuid == ImplicitVRLittleEndian, tsuid != ExplicitVRBigEndian
    ds = read_dataset(buf, implicit, little, stop_when=_at_pixels)
    offset = buf.tell()
    if head[offset : offset + 4] != _PIXEL_TAG[little]:
        return None  # the header goes on past `head`, no Pixel Data, float pixels, or stopped early
    # As dcmread: the encoding the transfer syntax names, even where read_dataset found the elements in another VR.
    ds.set_original_encoding(implicit, little, ds.original_character_set)
    ds.file_meta = meta
    return ds, offset


def _parse(fp: BinaryIO, header_only: bool) -> tuple[Dataset, int]:
    """`_read` on an open file, left positioned where Pixel Data starts."""
    head = fp.read(132)
    fp.seek(0)
    # Files without the 128-byte preamble are accepted only if they start with a group 0002/0008 element.
    force = head[128:132] != b"DICM" and head[:2] in (b"\x02\x00", b"\x08\x00")
    ds = pydicom.dcmread(fp, stop_before_pixels=header_only, force=force)
    pixel_offset = fp.tell()
    if force and "SOPClassUID" not in ds:
        raise InvalidDicomError("no SOP Class UID")
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    return ds, pixel_offset


def _cross(a: list[float], b: list[float]) -> np.ndarray:
    """Cross product of two 3-vectors."""
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


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


def _pixel_problem(fp: BinaryIO, ds: Dataset, offset: int) -> str | None:
    """Cheap truncation check after a header-only read of the open file `fp`: is Pixel Data there and complete?"""
    size = os.fstat(fp.fileno()).st_size
    if offset + 8 > size:
        return "truncated or corrupt: no Pixel Data element"
    fp.seek(offset)
    head = fp.read(12)
    implicit, little = ds.original_encoding
    length = int.from_bytes(head[8:12] if not implicit else head[4:8], "little" if little else "big")
    if length != 0xFFFFFFFF:
        expected, have = length, size - offset - (8 if implicit else 12)
        return f"truncated or corrupt: {have} of {expected} pixel bytes present" if have < expected else None
    # Encapsulated pixel data ends with a Sequence Delimitation Item; scan only when the tail is something else.
    fp.seek(max(offset, size - 8))
    if fp.read(8) == _DELIM:
        return None
    with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        found = mm.find(_DELIM, offset) >= 0
    return None if found else "truncated or corrupt: compressed pixel data ends early (no end delimiter)"


def _with_pixels(path: Path, ds: Dataset, offset: int) -> Dataset | np.ndarray:
    """A discovered file's pixels without parsing its header a second time.

    Uncompressed little-endian 8/16-bit single-sample Pixel Data (most CT and MR series) comes back as the stored-value
    array read straight from the file (`_native`); anything else as the header plus its Pixel Data element, for
    pydicom's decoders. The read is unbuffered: a buffered ``read()`` of a whole 512 KB slice costs ~8x more here.
    """
    with open(path, "rb", buffering=0) as fp:
        fp.seek(offset)
        data = fp.read()
    implicit, little = ds.original_encoding
    head = 8 if implicit else 12
    tag = data[:4] == _PIXEL_TAG[little]
    length = int.from_bytes(data[head - 4 : head], "little" if little else "big")
    if not tag or (length == 0xFFFFFFFF and not data.endswith(_DELIM)):
        return _read(path, header_only=False)[0]  # Float Pixel Data or trailing elements: let pydicom parse it all
    if length != 0xFFFFFFFF:
        native = _native(ds, memoryview(data)[head : head + length])  # a view: no second copy of the pixels
        if native is not None:
            return native
    value = data[head:-8] if length == 0xFFFFFFFF else data[head : head + length]
    vr = ("OW" if int(ds.get("BitsAllocated", 16)) > 8 else "OB") if implicit else data[4:6].decode("latin-1")
    if vr not in ("OB", "OW", "UN"):
        return _read(path, header_only=False)[0]  # an unexpected element layout: let pydicom parse the whole file
    out = Dataset(ds)  # shallow: the cached header stays free of pixel bytes
    out.file_meta = ds.file_meta
    out.add_new(0x7FE00010, vr, value)
    return out


def _stored_dtype(ds: Dataset) -> np.dtype | None:
    """Little-endian dtype of single-sample 8/16-bit stored values (what pydicom's decoders return for them); None for
    any other layout (colour, 1-bit, 32-bit, unreadable attributes)."""
    try:
        spp, bits, signed = (
            int(_value(ds, "SamplesPerPixel", 1)),
            int(_value(ds, "BitsAllocated")),
            int(_value(ds, "PixelRepresentation", 0)),
        )
    except (AttributeError, TypeError, ValueError):
        return None
    if spp != 1 or bits not in (8, 16) or signed not in (0, 1):
        return None
    return np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")


def _native_layout(ds: Dataset) -> tuple[np.dtype, tuple[int, ...], int] | None:
    """(dtype, array shape, unused high bits) of uncompressed little-endian Pixel Data that numpy can view directly;
    None when pydicom's decoders must handle it. The shape is pydicom's: (rows, cols), or (frames, rows, cols)."""
    if _value(ds.file_meta, "TransferSyntaxUID") not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        return None
    dtype = _stored_dtype(ds)
    try:
        allocated, rows, cols = int(_value(ds, "BitsAllocated")), int(_value(ds, "Rows")), int(_value(ds, "Columns"))
        stored, frames = int(_value(ds, "BitsStored") or allocated), int(_value(ds, "NumberOfFrames") or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    if dtype is None or not 0 < stored <= allocated:
        return None
    return dtype, ((frames, rows, cols) if frames > 1 else (rows, cols)), allocated - stored


def _correct_unused_bits(arr: np.ndarray, unused: int) -> np.ndarray:
    """pydicom's unused-bits correction: shift left then right by BitsAllocated - BitsStored, in place (which masks
    unsigned values and sign-extends signed ones)."""
    if unused:
        np.left_shift(arr, unused, out=arr)
        np.right_shift(arr, unused, out=arr)
    return arr


def _read_native_into(path: Path, ds: Dataset, offset: int, out: np.ndarray) -> bool:
    """Read a single-frame uncompressed slice's stored values straight into `out` (its stored dtype), if it is one.

    One kernel copy from the file into the volume, no intermediate buffer. Returns False (and reads nothing useful)
    when the file is anything else; the caller then goes through `_with_pixels`.
    """
    layout = _native_layout(ds)
    if layout is None or layout[:2] != (out.dtype, out.shape):
        return False
    head = 8 if ds.original_encoding[0] else 12  # implicit VR: tag + length; explicit: tag + VR + reserved + length
    with open(path, "rb", buffering=0) as fp:
        fp.seek(offset)
        element = fp.read(head)
        if len(element) < head or element[:4] != _PIXEL_TAG[True]:
            return False
        if int.from_bytes(element[head - 4 : head], "little") < out.nbytes:
            return False
        if fp.readinto(memoryview(out).cast("B")) != out.nbytes:
            return False
    _correct_unused_bits(out, layout[2])
    return True


def _native(ds: Dataset, value: bytes | memoryview) -> np.ndarray | None:
    """The stored values of uncompressed Pixel Data (`_native_layout`), as ``pydicom.pixels.pixel_array`` returns
    them, without the decoder's per-call setup, which costs more than the copy itself for one slice."""
    layout = _native_layout(ds)
    if layout is None:
        return None
    dtype, shape, unused = layout
    n = int(np.prod(shape))
    if len(value) < n * dtype.itemsize:
        return None  # pydicom raises its own clear error for short data
    arr = np.frombuffer(value, dtype=dtype, count=n).reshape(shape)  # a read-only view on the file's bytes
    return _correct_unused_bits(arr.copy(), unused) if unused else arr


# Converted element values by (tag, VR, raw bytes, encoding): see `_value`. Cleared when it grows past _CONVERTED_MAX.
_converted: dict[tuple, Any] = {}
_CONVERTED_MAX = 1 << 16
# VRs whose conversion depends only on the bytes and the encoding (not the character set) and gives a plain value.
_CACHEABLE_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "DS", "IS", "CS", "UI", "AS", "DA", "TM"})


@functools.lru_cache(maxsize=512)
def _tag(keyword: str) -> tuple[BaseTag, bool]:
    """(tag, whether its values may be cached by `_value`) of a DICOM keyword."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"unknown DICOM keyword {keyword}")
    return BaseTag(tag), dictionary_VR(tag) in _CACHEABLE_VRS


def _value(ds: Dataset, keyword: str, default: Any = None) -> Any:
    """``ds.get(keyword, default)``, converting each distinct raw value once per process.

    pydicom converts an element on first access, at 10-20 us each: more than parsing the header. The files of a
    series repeat most values byte for byte (size, orientation, spacing, bit depth, rescale, UIDs), so a value is
    reused across files when its tag, VR, raw bytes and encoding are equal. Only VRs whose conversion depends on
    nothing else are cached (numbers, code strings, UIDs, dates). Cached values are shared: never modify them.
    An element already converted in `ds` gives its value directly (``ds.get`` would look it up a second time).
    """
    tag, cacheable = _tag(keyword)
    elem = ds.get_item(tag)  # a BaseTag key skips pydicom's tag parsing
    if elem is None:
        return default
    if type(elem) is DataElement:
        return elem.value
    if not cacheable or not isinstance(elem, RawDataElement):
        return ds[tag].value
    key = (tag, elem.VR, elem.value, elem.is_implicit_VR, elem.is_little_endian)
    value = _converted.get(key, _converted)
    if value is _converted:
        value = ds[tag].value
        if len(_converted) >= _CONVERTED_MAX:
            _converted.clear()
        _converted[key] = value
    return value


def _has(ds: Dataset, keyword: str) -> bool:
    """``bool(ds.get(keyword))`` without converting an absent element (functional groups, LUT sequences)."""
    return bool(_value(ds, keyword))


def _fg(ds: Dataset, frame: int, name: str) -> Dataset | None:
    """Functional group item `name` for a frame: the per-frame one, else the shared one, else None."""
    for seq_name, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(seq_name)
        if seq and idx < len(seq) and seq[idx].get(name):
            return seq[idx].get(name)[0]
    return None


def _orientation(ds: Dataset) -> list[float] | None:
    """ImageOrientationPatient of the file, top-level or from the plane orientation functional group."""
    iop = _value(ds, "ImageOrientationPatient")
    if iop:
        return [float(v) for v in iop]
    item = _fg(ds, 0, "PlaneOrientationSequence")
    return [float(v) for v in item.ImageOrientationPatient] if item is not None else None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    return "\\".join(str(v) for v in value) if isinstance(value, pydicom.multival.MultiValue) else str(value)


def _not_image(ds: Dataset) -> str | None:
    """Reason a header is not an image we can use (RT objects, SR, SEG, waveforms, presentation states...)."""
    sop = _value(ds, "SOPClassUID")
    name = _sop_name(str(sop)) if isinstance(sop, UID) else ""
    if (name and "Image Storage" not in name) or not (_value(ds, "Rows") and _value(ds, "Columns")):
        return f"not an image: {name or 'unknown SOP class'} ({_text(ds, 'Modality') or '?'})"
    return None


@functools.lru_cache(maxsize=256)
def _sop_name(uid: str) -> str:
    """The SOP class name from pydicom's UID dictionary ("" when unknown); one lookup per class, not per file."""
    name = UID(uid).name
    return name if name != uid else ""


def _quiet(fn: Callable) -> Callable:
    """Silence pydicom's warnings inside `fn`: they can quote file names and element values (UIDs).

    pydicom's value validation on reading only ever warns, so it is switched off too: it is silenced anyway, and it
    costs as much as the rest of a header's conversion. A value pydicom cannot convert at all still raises.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        mode = pydicom.config.settings.reading_validation_mode
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
            try:
                return fn(*args, **kwargs)
            finally:
                pydicom.config.settings.reading_validation_mode = mode

    return wrapper


@_quiet
def read_headers(paths: list[Path]) -> list[tuple[Dataset, int]]:
    """Each file's header and Pixel Data offset, as `SeriesRef.headers` holds them (for a series planned elsewhere).

    Raises:
        ValueError: a file that is no longer a readable DICOM header, in one line without identifiers.
    """
    out = []
    for path in paths:
        try:
            out.append(_read(path, header_only=True))
        except Exception as e:
            raise ValueError(f"truncated or corrupt: {_clean(e, path)}") from e
    return out


@dataclass
class ScannedFile:
    """One usable image file found by `scan_files`: what grouping needs, and its parsed header.

    Attributes:
        path: the file.
        group: (SeriesInstanceUID or a fallback hash, geometry, path key for files without geometry); internal.
        positions: each frame's position along the slice normal (NaN without geometry).
        n_frames: frames in the file.
        offset: byte offset of Pixel Data.
        tags: Modality and the `SeriesRef.label_tags`, for the first file of each group in a scan (None otherwise).
        header: the parsed header (None once sent to another process: `without_header`).
    """

    path: Path
    group: tuple
    positions: list[float]
    n_frames: int
    offset: int
    tags: dict[str, str] | None = None
    header: Dataset | None = field(default=None, repr=False, compare=False)

    def without_header(self) -> ScannedFile:
        """A copy that pickles small (pydicom datasets do not), for returning from a worker process."""
        return ScannedFile(self.path, self.group, self.positions, self.n_frames, self.offset, self.tags)


_TAGS = ("Modality", "SeriesDescription", "ProtocolName", "BodyPartExamined", "ImageType", "SeriesNumber")


def dicom_files(source: Path) -> list[Path]:
    """The candidate DICOM files under a folder (recursive, sorted) or the single file `source`.

    DICOMDIR, hidden files and obvious non-DICOM files (``.md``, ``.nii.gz``, ``.png``...) are left out.

    Raises:
        FileNotFoundError: `source` does not exist.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"DICOM source {source} does not exist; check the manifest path and --root")
    if source.is_file():
        return [source]
    paths = []
    for folder, dirs, names in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or name.upper() == "DICOMDIR" or name.lower().endswith(_IGNORED_SUFFIXES):
                continue
            paths.append(Path(folder) / name)
    return paths


@_quiet
def discover_series(source: Path, min_series_slices: int = 4) -> tuple[list[SeriesRef], list[Skip]]:
    """Find the DICOM image series under a folder (recursively) or in a single file, reading headers only.

    Files are DICOM with or without a ``.dcm`` extension and with or without the 128-byte preamble. DICOMDIR,
    hidden files and obvious non-DICOM files (``.md``, ``.nii.gz``, ``.png``...) are ignored; other unreadable files
    are skipped. Files are grouped by SeriesInstanceUID; when it is empty, by a hash of (FrameOfReferenceUID,
    ImageOrientationPatient rounded, Rows, Columns, SeriesDescription, SeriesNumber). A series whose files disagree on
    orientation or image size is split by those. Files without patient geometry (no ImageOrientationPatient:
    radiographs, ultrasound, secondary captures) are never stacked: each file is its own series.

    Scout rule: a series with geometry is a scout/localiser and skipped when its ImageType contains LOCALIZER, or
    when it has 2 to ``min_series_slices - 1`` distinct slice positions (frames at one position, such as echoes, time
    points or copies, count once). A single image (one position: a radiograph, a secondary capture, a lone slice) is
    kept as a 2-D image.

    This is `scan_files` over `dicom_files` then `group_series`; ingest runs the scan in pieces over its workers
    when one source holds many files.

    Args:
        source: a folder or a single file.
        min_series_slices: the fewest slices a multi-slice series needs to count as a volume.

    Returns:
        (series sorted by first file path, skipped files or series with a one-line reason each).

    Raises:
        FileNotFoundError: `source` does not exist.
    """
    source = Path(source)
    scanned, skips = scan_files(dicom_files(source), source)
    series, more = group_series(scanned, min_series_slices)
    return series, skips + more


@_quiet
def scan_files(paths: list[Path], source: Path) -> tuple[list[ScannedFile], list[Skip]]:
    """Parse the headers of `paths` (files under `source`, in order): the usable image files, and the skipped ones
    with a reason (not DICOM, corrupt, truncated, not an image, no decoder)."""
    source = Path(source)
    skips: list[Skip] = []
    out: list[ScannedFile] = []
    decodable: dict[str, str | None] = {}
    seen: set[tuple] = set()
    for path in paths:
        try:
            with open(path, "rb", buffering=0) as fp:  # one open per file: header, then the Pixel Data check
                ds, offset = _header(fp, path)
                tsuid = _value(ds.file_meta, "TransferSyntaxUID")
                if tsuid not in decodable:
                    decodable[tsuid] = _decoder_problem(tsuid)
                reason = _not_image(ds) or decodable[tsuid] or _pixel_problem(fp, ds, offset)
        except InvalidDicomError:
            skips.append(Skip(path, "not a DICOM file"))
            continue
        except Exception as e:  # pydicom raises many types on corrupt headers
            skips.append(Skip(path, f"truncated or corrupt: {_clean(e, path)}"))
            continue
        if reason:
            skips.append(Skip(path, reason))
            continue
        iop = _orientation(ds)
        geom = (tuple(np.round(iop, 3)) if iop else None, int(_value(ds, "Rows")), int(_value(ds, "Columns")))
        uid = str(_value(ds, "SeriesInstanceUID") or "")
        if not uid:
            parts = [_text(ds, "FrameOfReferenceUID"), *map(str, geom), _text(ds, "SeriesDescription")]
            uid = "fallback:" + hashlib.sha256("|".join([*parts, _text(ds, "SeriesNumber")]).encode()).hexdigest()
        if iop is not None:
            normal = _cross(iop[:3], iop[3:])  # per file: numpy's cross costs more than the rest of this loop
            positions = [float(f.ipp @ normal) if f.ipp is not None else np.nan for f in _frames(ds, 0)]
        else:
            positions = [np.nan]
        # Files without geometry stay alone; their key part is the path below `source`, stable wherever data moves.
        alone = (path.relative_to(source).as_posix() if source.is_dir() else path.name) if iop is None else ""
        group = (uid, geom, alone)
        tags = None if group in seen else {t: _text(ds, t) for t in _TAGS}
        seen.add(group)
        n_frames = int(_value(ds, "NumberOfFrames") or 1)
        out.append(ScannedFile(path, group, positions, n_frames, offset, tags, ds))
    return out, skips


def group_series(scanned: list[ScannedFile], min_series_slices: int = 4) -> tuple[list[SeriesRef], list[Skip]]:
    """Group scanned files (in scan order) into series, applying the scout rule of `discover_series`.

    The scan may have run in pieces: each group's first file carries its `tags` because it is the first of its group
    in the earliest piece that holds the group.
    """
    skips: list[Skip] = []
    groups: dict[tuple, list[ScannedFile]] = {}
    for f in scanned:
        groups.setdefault(f.group, []).append(f)
    series: list[SeriesRef] = []
    n_per_uid: dict[str, int] = {}
    for uid, _, _ in groups:
        n_per_uid[uid] = n_per_uid.get(uid, 0) + 1
    for (uid, geom, single), members in groups.items():
        tags = members[0].tags or {}
        n = sum(m.n_frames for m in members)
        positions = np.sort(np.concatenate([m.positions for m in members]))
        # Frames at one position (echoes, time points, copies) count once: the scout rule is about spatial extent.
        n_unique = n if np.isnan(positions).any() else int(1 + (np.diff(positions) >= _DUP_TOL_MM).sum())
        key = uid if n_per_uid[uid] == 1 else f"{uid}|{geom}|{single}"
        image_type = tags.get("ImageType", "").upper()
        if not single and "LOCALIZER" in image_type:
            skips.append(Skip(members[0].path, f"scout/localiser: ImageType LOCALIZER ({len(members)} files)"))
        elif not single and 1 < n_unique < min_series_slices:
            reason = f"scout/localiser: {n_unique} slices < min_series_slices ({min_series_slices})"
            skips.append(Skip(members[0].path, reason))
        else:
            series.append(
                SeriesRef(
                    key,
                    [m.path for m in members],
                    tags.get("Modality") or "OT",
                    n,
                    {t: tags.get(t, "") for t in _TAGS[1:]},
                    [(m.header, m.offset) for m in members] if all(m.header is not None for m in members) else [],
                )
            )
    series.sort(key=lambda s: s.files[0])
    return series, skips


@dataclass
class _Frame:
    """One 2-D frame: where its pixels live and where it sits in the patient."""

    file: int
    frame: int | None  # None: the file's only frame
    ipp: np.ndarray | None
    spacing: tuple[float, float]  # (row spacing, column spacing) mm
    rescale: Dataset | None  # the dataset/item holding RescaleSlope/Intercept or a Modality LUT


def _frames(ds: Dataset, index: int) -> list[_Frame]:
    """Per-frame geometry and value transform of one file (classic single-frame or enhanced multi-frame)."""
    n = int(_value(ds, "NumberOfFrames") or 1)
    if not (_has(ds, "PerFrameFunctionalGroupsSequence") or _has(ds, "SharedFunctionalGroupsSequence")):
        spacing = next((s for s in (_value(ds, "PixelSpacing"), _value(ds, "ImagerPixelSpacing")) if s and min(s) > 0),
                       (1, 1))  # fmt: skip
        ipp = _value(ds, "ImagePositionPatient")
        ipp = np.array(ipp, float) if ipp and n == 1 else None
        return [_Frame(index, None if n == 1 else f, ipp, tuple(map(float, spacing)), ds) for f in range(n)]
    out = []
    for f in range(n):
        pos, meas = _fg(ds, f, "PlanePositionSequence"), _fg(ds, f, "PixelMeasuresSequence")
        ipp = np.array(pos.ImagePositionPatient, float) if pos is not None and pos.get("ImagePositionPatient") else None
        spacing = tuple(map(float, meas.PixelSpacing)) if meas is not None and meas.get("PixelSpacing") else (1.0, 1.0)
        out.append(_Frame(index, f, ipp, spacing, _fg(ds, f, "PixelValueTransformationSequence") or ds))
    return out


def _decode(ds: Dataset, path: Path) -> np.ndarray:
    """Stored values of all frames, with decoder failures turned into one-line, identifier-free ValueErrors."""
    try:
        return pydicom.pixels.pixel_array(ds)
    except AttributeError as e:
        missing = "no Pixel Data element" if "PixelData" not in ds else f"missing image attribute ({_clean(e, path)})"
        raise ValueError(f"truncated or corrupt: {missing}") from e
    except Exception as e:
        tsuid = ds.file_meta.TransferSyntaxUID
        problem = _decoder_problem(tsuid)
        if problem or "missing dependencies" in str(e) or "plugin" in str(e).lower():
            raise ValueError(problem or f"cannot decode {tsuid.name}: {_clean(e, path)}") from e
        raise ValueError(f"truncated or corrupt: {_clean(e, path)}") from e


def _to_float(raw: np.ndarray, ds: Dataset, item: Dataset, out: np.ndarray) -> None:
    """Write one frame's physical values into `out` (float32): colour to luminance, modality LUT, MONOCHROME1."""
    photometric = str(_value(ds, "PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric in _COLOUR:
        rgb = apply_color_lut(raw, ds) if photometric == "PALETTE COLOR" else raw
        np.matmul(rgb, _LUMA, out=out, casting="unsafe")
        return
    if item.get("ModalityLUTSequence"):
        out[...] = apply_modality_lut(raw, item)
    else:
        # Rescale in float32 in one pass: pydicom's apply_modality_lut makes a float64 copy, twice the memory traffic.
        slope = np.float32(float(item.get("RescaleSlope", 1) or 1))
        intercept = np.float32(float(item.get("RescaleIntercept", 0) or 0))
        if slope != 1:
            np.multiply(raw, slope, out=out)
            out += intercept
        else:
            np.add(raw, intercept, out=out)
    if photometric == "MONOCHROME1":
        # Mirror within the stored-value range mapped through the same LUT, so the units' range is kept.
        bits, signed = int(ds.BitsStored), int(ds.get("PixelRepresentation", 0))
        ends = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1])
        lo, hi = (apply_modality_lut(ends, item) if item is not None else ends).astype(np.float64)
        np.subtract(lo + hi, out, out=out)


def _stored_layout(datasets: list[Dataset], frames: list[_Frame]) -> tuple[np.dtype, float, float] | None:
    """(stored dtype, slope, intercept) when the kept frames can stay as stored integers; None when they cannot.

    That is: single-sample MONOCHROME2 with 8/16 bits allocated and the same pixel representation in every file, no
    Modality LUT Sequence, and one Rescale Slope/Intercept for every frame. The decoders (pydicom's native reader
    and the compressed-syntax plugins) return exactly this dtype for such pixels.
    """
    dtypes = set()
    for ds in datasets:
        if ds is None or str(_value(ds, "PhotometricInterpretation", "MONOCHROME2")).strip() != "MONOCHROME2":
            return None
        dtypes.add(_stored_dtype(ds))
    scales = set()
    for f in frames:
        item = f.rescale if f.rescale is not None else datasets[f.file]
        if _has(item, "ModalityLUTSequence"):
            return None
        scales.add((float(_value(item, "RescaleSlope", 1) or 1), float(_value(item, "RescaleIntercept", 0) or 0)))
    if len(dtypes) != 1 or None in dtypes or len(scales) != 1:
        return None
    (slope, intercept) = scales.pop()
    return dtypes.pop(), slope, intercept


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

    Values: the modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence, per frame for enhanced objects) so CT
    is in HU; MONOCHROME1 mirrored within its value range so higher is brighter; colour (RGB, YBR, palette) converted to
    BT.601 luminance. Geometry: frames ordered by ``cross(row, col) . ImagePositionPatient``; duplicates dropped, gaps
    noted; the LPS affine is converted to RAS and the array reoriented to the closest canonical RAS+ (axis 0 toward
    Right, 1 Anterior, 2 Superior), so one anatomy comes out the same way up whatever the patient position. Without
    geometry (radiographs, ultrasound) or for a lone non-axial slice, frames stay in stored order as [columns, rows,
    frames] with both in-plane axes reversed, so the normalizer's display flip shows the image as stored. The array
    is a view whose axis-2 slices are contiguous for axial series.

    Args:
        series: a `SeriesRef` from `discover_series`.
        pseudonym: keyed pseudonym function; patient = pseudonym("patient:" + PatientID), volume =
            pseudonym("series:" + key).

    Returns:
        The Volume; ``positions_mm`` is the Superior coordinate of each axis-2 slice (the sorted slice positions for an
        axial series) and ``notes`` lists remarks (duplicates, gaps, inversion, colour, missing geometry).

    Raises:
        ValueError: undecodable or inconsistent series, in one line without identifiers (a missing decoder plugin names
            the package to install).
    """
    notes: list[str] = []
    datasets, frames = [], []
    for i, path in enumerate(series.files):
        try:
            ds = series.headers[i][0] if series.headers else _read(path, header_only=False)[0]
        except Exception as e:
            raise ValueError(f"truncated or corrupt: {_clean(e, path)}") from e
        datasets.append(ds)
        frames += _frames(ds, i)
    first = datasets[0]
    patient, photometric = _patient(first, pseudonym), str(first.get("PhotometricInterpretation", "")).strip()
    iops = [_orientation(ds) for ds in datasets]
    geometric = all(iop is not None for iop in iops) and all(f.ipp is not None for f in frames)
    rows, cols = int(_value(first, "Rows")), int(_value(first, "Columns"))
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
    if any(_value(ds, "NumberOfFrames") for ds in datasets) and len(frames) > 1:
        notes.append(f"multi-frame: {len(keep)} slices from {len(frames)} frames")

    # Decode file by file into one stack [slices, rows, cols]; each file's pixels are released after use. Greyscale
    # series with one rescale keep their stored integers (half the memory of float32; normalization applies the
    # rescale after resizing); anything else becomes float32 physical values here.
    stored = _stored_layout(datasets, [frames[int(k)] for k in keep])
    stack = np.empty((len(keep), rows, cols), dtype=stored[0] if stored else np.float32)
    per_file: list[list[tuple[int, _Frame]]] = [[] for _ in datasets]
    for s, k in enumerate(keep):
        per_file[frames[int(k)].file].append((s, frames[int(k)]))
    for i, (ds, path, wanted) in enumerate(zip(datasets, series.files, per_file, strict=True)):
        if not wanted:
            continue
        if stored and series.headers and len(wanted) == 1 and wanted[0][1].frame is None:
            if _read_native_into(path, *series.headers[i], stack[wanted[0][0]]):
                datasets[i] = first = None
                continue
        if series.headers:
            loaded = _with_pixels(path, *series.headers[i])
            raw = loaded if isinstance(loaded, np.ndarray) else _decode(loaded, path)
        else:
            raw = _decode(ds, path)
        frame_shape = raw.shape[-2:] if int(_value(ds, "SamplesPerPixel", 1)) == 1 else raw.shape[-3:-1]
        if frame_shape != (rows, cols):
            raise ValueError(f"image size differs within the series (expected {rows}x{cols})")
        for s, f in wanted:
            if stored:
                stack[s] = raw if f.frame is None else raw[f.frame]
            else:
                _to_float(raw if f.frame is None else raw[f.frame], ds, f.rescale, stack[s])
        datasets[i] = first = None  # drop the pixel bytes early: peak memory stays near one volume
    if photometric == "MONOCHROME1":
        notes.append("MONOCHROME1 inverted so higher values are brighter")
    elif photometric in _COLOUR:
        notes.append(f"colour ({photometric}) converted to luminance")
    if "MOSAIC" in series.label_tags.get("ImageType", "").upper():
        notes.append("Siemens MOSAIC kept as one 2-D image (tiles not unpacked)")

    scale = stored[1:] if stored else (1.0, 0.0)
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
            return Volume(canon, spacing, series.modality, patient, volume_key, positions, notes, *scale)
        notes.append("single non-axial slice kept as a 2-D image in its stored orientation")
    # Stored (display) layout: both axes reversed, so the normalizer's display flip shows the image as stored.
    return Volume(array[::-1, ::-1], (col_sp, row_sp, step), series.modality, patient, volume_key,
                  np.arange(array.shape[2]) * step, notes, *scale)  # fmt: skip


def _patient(ds: Dataset, pseudonym: Callable[[str], str]) -> str:
    patient_id = _text(ds, "PatientID").strip()
    return pseudonym("patient:" + patient_id) if patient_id else ""
