"""DICOM reader: ordering, modality LUT, MONOCHROME1, orientation, grouping, skips, on written and real files."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medgan.ingest.dicom import SeriesRef, discover_series, read_series
from tests.conftest import require

SHAPE_RAS = (6, 5, 4)  # phantom extent along R, A, S (1 mm voxels)
PHI = ("Doe^Jane", "PHI-ID-12345", "19700101", "ACC998877")


def pseudonym(text: str) -> str:
    return hashlib.sha256(b"test-key" + text.encode()).hexdigest()[:16]


def phantom(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Stored value at RAS integer coordinates: unique per voxel, so any flip or swap shows."""
    return (x + 10 * y + 100 * z).astype(np.uint16)


def write_series(folder: Path, iop: list[float], *, mono1: bool = False, seed: int = 0) -> tuple[Path, str]:
    """Write the phantom as a CT series with orientation `iop` (LPS), shuffled files, disagreeing InstanceNumbers.

    Stored value v = phantom, RescaleSlope 2, RescaleIntercept -1000, so HU = 2 v - 1000.
    """
    folder.mkdir(parents=True)
    row, col = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row, col)
    # LPS box of the phantom: L = -x in [-5, 0], P = -y in [-4, 0], S = z in [0, 3].
    lo, hi = np.array([-(SHAPE_RAS[0] - 1), -(SHAPE_RAS[1] - 1), 0]), np.array([0, 0, SHAPE_RAS[2] - 1])
    origin = np.where(row + col + normal > 0, lo, hi).astype(float)
    extent = lambda d: int(abs(d) @ (hi - lo)) + 1  # noqa: E731
    n_cols, n_rows, n_slices = extent(row), extent(col), extent(normal)
    series_uid, order = generate_uid(), list(range(n_slices))
    random.Random(seed).shuffle(order)
    for file_no, k in enumerate(order):
        r, c = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
        lps = origin[:, None, None] + row[:, None, None] * c + col[:, None, None] * r + (normal * k)[:, None, None]
        pixels = phantom(-lps[0], -lps[1], lps[2])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber = PHI
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), series_uid, generate_uid()
        ds.Modality, ds.SeriesDescription, ds.SeriesNumber, ds.ImageType = "CT", "phantom", 3, ["ORIGINAL", "PRIMARY"]
        ds.InstanceNumber = n_slices - file_no  # disagrees with position on purpose
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [float(v) for v in origin + normal * k]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
        ds.Rows, ds.Columns, ds.SamplesPerPixel = n_rows, n_cols, 1
        ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 2, -1000
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"IM{file_no:04d}", enforce_file_format=True)
    return folder, series_uid


def expected_hu() -> np.ndarray:
    x, y, z = np.meshgrid(*[np.arange(n) for n in SHAPE_RAS], indexing="ij")
    return 2.0 * phantom(x, y, z) - 1000.0


def read_one(source: Path) -> tuple[SeriesRef, object]:
    refs, skips = discover_series(source)
    assert len(refs) == 1, (refs, skips)
    return refs[0], read_series(refs[0], pseudonym)


AXIAL, AXIAL_FLIPPED, FEET_FIRST = [1, 0, 0, 0, 1, 0], [-1, 0, 0, 0, -1, 0], [1, 0, 0, 0, -1, 0]
SAGITTAL, CORONAL = [0, 1, 0, 0, 0, -1], [1, 0, 0, 0, 0, -1]


@pytest.mark.parametrize("iop", [AXIAL, AXIAL_FLIPPED, FEET_FIRST, SAGITTAL, CORONAL])
def test_written_series_ordered_by_position_in_hu_and_canonical(tmp_path: Path, iop: list[float]) -> None:
    folder, _ = write_series(tmp_path / "s", iop, seed=len(tmp_path.name))
    ref, vol = read_one(folder)
    assert ref.n_slices == len(ref.files) and ref.modality == "CT" and ref.label_tags["SeriesDescription"] == "phantom"
    assert vol.array.dtype == np.float32 and vol.array.shape == SHAPE_RAS
    np.testing.assert_array_equal(vol.array, expected_hu())  # same RAS+ array whatever the stored orientation
    np.testing.assert_allclose(vol.spacing_mm, (1.0, 1.0, 1.0))
    np.testing.assert_allclose(vol.positions_mm, np.arange(SHAPE_RAS[2]))
    assert vol.notes == []


def test_monochrome1_inverted_within_value_range(tmp_path: Path) -> None:
    _, mono2 = read_one(write_series(tmp_path / "m2", AXIAL)[0])
    _, mono1 = read_one(write_series(tmp_path / "m1", AXIAL, mono1=True)[0])
    lo, hi = 2 * 0 - 1000, 2 * 4095 - 1000  # 12-bit stored range through the rescale
    np.testing.assert_array_equal(mono1.array, (lo + hi) - mono2.array)
    assert any("MONOCHROME1" in n for n in mono1.notes)


def test_a_file_with_its_own_rescale_keeps_its_own_units(tmp_path: Path) -> None:
    """One series-wide slope/intercept is carried only when every file shares it (a PET series rescales per file)."""
    folder, _ = write_series(tmp_path / "s", AXIAL)
    _, shared = read_one(folder)
    assert (shared.slope, shared.intercept) == (2.0, -1000.0)  # stored values kept; the map applied on use
    odd = folder / "IM0000"
    ds = pydicom.dcmread(odd)
    ds.RescaleSlope = 4
    ds.save_as(odd, enforce_file_format=True)
    _, vol = read_one(folder)
    want = expected_hu()
    k = int(round(float(ds.ImagePositionPatient[2])))  # axial, feet to head: the file's slice along canonical S
    want[:, :, k] = 4.0 * phantom(*np.meshgrid(*[np.arange(n) for n in SHAPE_RAS[:2]], indexing="ij"), k) - 1000.0
    np.testing.assert_array_equal(vol.array, want)


def test_files_of_one_series_in_different_pixel_layouts_keep_their_own(tmp_path: Path) -> None:
    """Files of one series stored MONOCHROME1 beside MONOCHROME2 ones are each mirrored (or not) on their own."""
    folder, _ = write_series(tmp_path / "s", AXIAL)
    flipped = []
    for f in sorted(folder.iterdir())[:2]:
        ds = pydicom.dcmread(f)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(f, enforce_file_format=True)
        flipped.append(int(round(float(ds.ImagePositionPatient[2]))))
    _, vol = read_one(folder)
    want = expected_hu()
    lo, hi = 2 * 0 - 1000, 2 * 4095 - 1000  # 12-bit stored range through the rescale
    want[:, :, flipped] = (lo + hi) - want[:, :, flipped]
    np.testing.assert_array_equal(vol.array, want)
    assert any("MONOCHROME1 inverted" in n and "2 photometric interpretations" in n for n in vol.notes), vol.notes


def test_single_frame_enhanced_file_keeps_every_row(tmp_path: Path) -> None:
    """An enhanced MR object holding one frame (NumberOfFrames 1, functional groups) reads as that one 4x4 frame."""
    from pydicom.sequence import Sequence

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.PatientID = "MR", generate_uid(), generate_uid(), "x"
    ds.Rows = ds.Columns = 4
    ds.NumberOfFrames, ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    orient, measures, position = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient, measures.PixelSpacing, position.ImagePositionPatient = (
        [1, 0, 0, 0, 1, 0],
        [1, 1],
        [0, 0, 0],
    )
    shared, frame = Dataset(), Dataset()
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = Sequence([orient]), Sequence([measures])
    frame.PlanePositionSequence = Sequence([position])
    ds.SharedFunctionalGroupsSequence, ds.PerFrameFunctionalGroupsSequence = Sequence([shared]), Sequence([frame])
    stored = np.arange(16, dtype=np.uint16).reshape(4, 4)
    ds.PixelData = stored.tobytes()
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    _, vol = read_one(tmp_path / "a.dcm")
    assert sorted(np.unique(vol.array).tolist()) == list(range(16))  # every stored value, no row repeated
    got = vol.array[:, :, 0]
    assert any(np.array_equal(c, stored) for c in (got[::-1, ::-1].T, got.T, got[::-1].T, got[:, ::-1].T))


def test_private_values_never_leave(tmp_path: Path) -> None:
    folder, series_uid = write_series(tmp_path / "p", AXIAL)
    ref, vol = read_one(folder)
    fields = " ".join([vol.patient, vol.volume, *vol.notes, *ref.label_tags.values()])
    for secret in (*PHI, series_uid):
        assert secret not in fields
    assert vol.patient == pseudonym("patient:" + PHI[1]) and vol.volume == pseudonym("series:" + ref.key)


def test_scout_rule_and_non_dicom(tmp_path: Path) -> None:
    folder, _ = write_series(tmp_path / "scout", AXIAL)
    for extra in sorted(folder.iterdir())[2:]:
        extra.unlink()  # 2 slices left
    (folder / "notes.bin").write_bytes(b"hello, not DICOM")
    (folder / "README.md").write_text("ignored")
    refs, skips = discover_series(folder)
    assert refs == []
    reasons = sorted(s.reason for s in skips)
    assert reasons == ["not a DICOM file", "scout/localiser: 2 slices < min_series_slices (4)"]
    assert len(discover_series(folder, min_series_slices=2)[0]) == 1


def test_truncated_and_non_image_objects_are_skipped(shared_data: Path) -> None:
    from pydicom.data import get_testdata_file

    reasons = {}
    for name in ("rtstruct.dcm", "test-SR.dcm", "MR_truncated.dcm", "waveform_ecg.dcm"):
        refs, skips = discover_series(Path(get_testdata_file(name)))
        assert refs == [] and len(skips) == 1
        reasons[name] = skips[0].reason
    assert reasons["rtstruct.dcm"] == "no pixel data (RT Structure Set Storage)"
    assert reasons["test-SR.dcm"].startswith("no pixel data (") and "SR" in reasons["test-SR.dcm"]
    assert reasons["waveform_ecg.dcm"].startswith("no pixel data (")
    assert (
        reasons["MR_truncated.dcm"].startswith("truncated: ")
        and "pixel bytes its header declares" in reasons["MR_truncated.dcm"]
    )
    odd = require(shared_data / "dicom/odd/pydicom_data_selection")
    refs, skips = discover_series(odd / "emri_small_jpeg_2k_lossless_too_short.dcm")
    with pytest.raises(ValueError, match="truncated or corrupt pixel data"):
        read_series(refs[0], pseudonym)
    refs, skips = discover_series(odd / "liver.dcm")
    assert refs == [] and skips[0].reason == "not an image: Segmentation Storage (SEG)"


def test_missing_decoder_plugin_names_the_package(shared_data: Path, tmp_path: Path) -> None:
    """Without the decoder plugins (removed through pydicom's public `remove_plugin`, in a fresh process), a JPEG 2000
    series is skipped with the package to install; a transfer syntax pydicom cannot decode at all says so."""
    import os
    import subprocess
    import sys

    folder = require(shared_data / "dicom/ct_totalsegmentator_j2k_20slices/series")
    script = f"""
import json
from pathlib import Path
from pydicom.pixels import get_decoder
from pydicom.uid import JPEG2000Lossless
from medgan.ingest.dicom import discover_series, read_series
ref = discover_series(Path({str(folder)!r}))[0][0]
decoder = get_decoder(JPEG2000Lossless)
for plugin in list(decoder.available_plugins):
    decoder.remove_plugin(plugin)
refs, skips = discover_series(Path({str(folder)!r}))
try:
    read_series(ref, str)
    error = ""
except ValueError as e:
    error = str(e)
print(json.dumps([len(refs), len(skips), skips[0].reason, error]))
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    n_refs, n_skips, reason, error = json.loads(out.stdout.splitlines()[-1])
    assert n_refs == 0 and n_skips == 20
    assert "no decoder plugin (install pylibjpeg-openjpeg)" in reason and "pylibjpeg-openjpeg" in error
    from pydicom.uid import MPEG2MPML

    ds = pydicom.dcmread(folder / sorted(p.name for p in folder.iterdir())[0])
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.save_as(tmp_path / "mpeg.dcm")
    refs, skips = discover_series(tmp_path / "mpeg.dcm")
    assert refs == [] and "pydicom has no decoder for this transfer syntax" in skips[0].reason


def test_kits_ct_in_hu(shared_data: Path) -> None:
    ref, vol = read_one(require(shared_data / "dicom/ct_tcia_kits00072_18slices"))
    assert vol.array.shape == (512, 512, 18) and ref.n_slices == 18
    np.testing.assert_allclose(vol.spacing_mm, (0.6641, 0.6641, 2.5), atol=1e-3)
    np.testing.assert_allclose(vol.positions_mm, np.linspace(-48.5, -6.0, 18), atol=1e-3)
    corner = vol.array[:20, :20]  # outside the body
    assert abs(float(np.median(corner)) + 1000) < 60 or float(corner.max()) <= -1000
    body = vol.array[200:300, 200:300]
    assert 0 < float(np.median(body)) < 120  # soft tissue
    assert vol.patient == pseudonym("patient:KiTS-00072") and "KiTS" not in " ".join(vol.notes)


def test_empty_uid_fallback_and_orientation_matches_label_nifti(shared_data: Path) -> None:
    base = require(shared_data / "dicom/ct_totalsegmentator_j2k_20slices")
    refs, skips = discover_series(base)  # labels/*.nii.gz ignored, 20 J2K files without UIDs -> one series
    assert len(refs) == 1 and skips == [] and len(refs[0].files) == 20
    vol = read_series(refs[0], pseudonym)
    labels = np.asarray(nib.as_closest_canonical(nib.load(base / "labels/example_seg_dicom.nii.gz")).dataobj)
    assert vol.array.shape == labels.shape == (512, 512, 20)
    liver = lambda a: float(a[labels == 5].mean())  # noqa: E731
    assert 40 < liver(vol.array) < 150  # enhanced liver HU where the NIfTI says liver
    assert liver(vol.array) > liver(vol.array[::-1]) + 30 and liver(vol.array) > liver(vol.array[:, ::-1]) + 30


def test_decubitus_series_share_one_orientation(shared_data: Path) -> None:
    refs, _ = discover_series(require(shared_data / "dicom/mr_decubitus_t1_4positions"))
    assert len(refs) == 4
    vols = [read_series(r, pseudonym) for r in refs]
    assert len({v.patient for v in vols}) == 1 and len({v.volume for v in vols}) == 4
    down = [v.array[:, ::4, ::4].astype(np.float64) for v in vols]

    def match(a: np.ndarray, b: np.ndarray) -> float:  # best correlation over all shifts (heads move in the FOV)
        a, b = (a - a.mean()) / a.std(), (b - b.mean()) / b.std()
        size = [x + y for x, y in zip(a.shape, b.shape, strict=True)]
        spectrum = np.fft.rfftn(a, size, (0, 1, 2)) * np.fft.rfftn(b[::-1, ::-1, ::-1], size, (0, 1, 2))
        return float(np.fft.irfftn(spectrum, size, (0, 1, 2)).max() / a.size)

    ref = down[[r.files[0].parent.name.startswith("HFS") for r in refs].index(True)]
    for d in down:
        same = match(ref, d)
        assert (
            same > match(ref, d[:, ::-1]) and same > match(ref, d[:, :, ::-1]) and same > match(ref, d[:, ::-1, ::-1])
        )
    for secret in ("crlab", "19700606"):
        assert all(secret not in " ".join([v.patient, v.volume, *v.notes]) for v in vols)


def test_nine_transfer_syntaxes_decode_equal(shared_data: Path) -> None:
    folder = require(shared_data / "dicom/odd/transfer_syntaxes_same_image")
    arrays = []
    for i in range(1, 10):
        _, vol = read_one(folder / f"{i}.dcm")
        arrays.append(vol.array)
        assert all(s not in " ".join([vol.patient, vol.volume, *vol.notes]) for s in ("stc_test", "crlab", "19800707"))
    assert arrays[0].shape == (384, 384, 1) and arrays[0].max() == 2362
    for a in arrays[1:]:
        np.testing.assert_array_equal(a, arrays[0])


def test_bits_stored_12_signed_and_unsigned(shared_data: Path) -> None:
    folder = require(shared_data / "dicom/odd/bits_stored_12")
    signed = read_one(folder / "12bitSigned_0x0F0F.dcm")[1].array
    unsigned = read_one(folder / "12bitUnsigned_0x0F0F.dcm")[1].array
    assert {-241.0, -1.0} <= set(np.unique(signed).tolist()) and signed.min() >= -2048 and signed.max() <= 2047
    assert {3855.0, 4095.0} <= set(np.unique(unsigned).tolist()) and unsigned.min() >= 0


def test_duplicates_and_gaps_noted(shared_data: Path) -> None:
    _, vol = read_one(require(shared_data / "dicom/odd/duplicate_and_missing_positions"))
    assert vol.array.shape[2] == 10  # 11 files, two at one position
    assert np.all(np.diff(vol.positions_mm) > 0)
    assert any("duplicate positions" in n for n in vol.notes) and any("gap" in n for n in vol.notes)


def test_multiframe_and_scout(shared_data: Path) -> None:
    odd = require(shared_data / "dicom/odd")
    ref, vol = read_one(odd / "enhanced_multiframe_mr/philips_IM_0027_fMAP.dcm")
    assert ref.n_slices == 64 and vol.array.shape == (64, 64, 32)  # magnitude + field map share 32 positions
    np.testing.assert_allclose(vol.spacing_mm, (4.0, 4.0, 4.0), atol=1e-3)
    assert any("duplicate" in n for n in vol.notes)
    ref, vol = read_one(odd / "pydicom_data_selection/emri_small_RLE.dcm")
    assert ref.n_slices == 10 and vol.array.shape == (64, 64, 10)
    refs, skips = discover_series(odd / "mr_scout_3slices")
    assert refs == [] and skips[0].reason == "scout/localiser: 3 slices < min_series_slices (4)"


def test_radiograph_monochrome1_and_modality_lut(shared_data: Path) -> None:
    odd = require(shared_data / "dicom/odd/pydicom_data_selection")
    ds = pydicom.dcmread(odd / "RG3_J2KI.dcm")
    _, vol = read_one(odd / "RG3_J2KI.dcm")
    assert vol.array.shape == (ds.Columns, ds.Rows, 1)
    stored = ds.pixel_array.astype(np.float32)
    np.testing.assert_array_equal(vol.array[::-1, ::-1, 0].T, (2**ds.BitsStored - 1) - stored)
    ds = pydicom.dcmread(odd / "mlut_18.dcm")
    _, vol = read_one(odd / "mlut_18.dcm")
    lut = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)
    np.testing.assert_array_equal(vol.array[::-1, ::-1, 0].T, lut)


def test_the_reader_equals_plain_pydicom_on_every_pydicom_test_file_it_reads() -> None:
    """Every pydicom test file that medgan reads gives, value for value, ``pixel_array`` through
    ``apply_modality_lut`` (MONOCHROME1 mirrored, colour as BT.601 luminance), in the reader's own layout."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    from tests.ingest.test_corpus import pydicom_test_files

    checked = 0
    for f in pydicom_test_files():
        if not f.is_file():
            continue
        refs, _ = discover_series(f, min_series_slices=1)
        if len(refs) != 1:
            continue
        try:
            vol = read_series(refs[0], pseudonym)
        except ValueError:
            continue  # a reason, tested elsewhere (the corpus test)
        ds = pydicom.dcmread(f)
        if "PerFrameFunctionalGroupsSequence" in ds or ds.get("NumberOfFrames", 1) not in (1, None):
            continue  # per-frame rescale and frame ordering: the multi-frame tests
        raw = ds.pixel_array
        photometric = ds.PhotometricInterpretation
        if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR"):
            rgb = apply_color_lut(raw, ds) if photometric == "PALETTE COLOR" else raw
            want = (np.asarray(rgb, np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.float32)
        else:
            want = np.asarray(apply_modality_lut(raw, ds), np.float64)  # physical values, rounded once below
            if photometric == "MONOCHROME1":
                bits, signed = int(ds.BitsStored), int(ds.get("PixelRepresentation", 0))
                ends = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1])
                lo, hi = np.asarray(apply_modality_lut(ends, ds), np.float64)
                want = lo + hi - want
            want = want.astype(np.float32)
        got = vol.array[:, :, 0]
        # The reader's layout: [columns, rows] with both axes reversed, or the canonical axial slice (flips only).
        candidates = [got[::-1, ::-1].T, got.T, got[::-1].T, got[:, ::-1].T]
        assert any(c.shape == want.shape and np.array_equal(c, want) for c in candidates), f.name
        checked += 1
    print(f"held against pydicom: {checked} files")
    assert checked >= 60, checked
