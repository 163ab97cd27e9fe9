"""NIfTI reader: every format variant loads, scaling is applied, and anatomy comes out in canonical RAS+ whatever the
stored orientation."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medgan.config import IngestConfig
from medgan.ingest.nifti import read_mask, read_nifti, read_nifti_grid
from medgan.ingest.normalize import normalize_volume
from tests.conftest import require

FORMATS = "nifti/format_variety"


def _marked(shape=(20, 24, 16)) -> np.ndarray:
    """A volume with distinct values so any flip or transpose is visible."""
    return np.arange(np.prod(shape), dtype=np.int16).reshape(shape)


@pytest.mark.parametrize(
    "name, shape",
    [
        ("nibabel_anatomical.nii", (33, 41, 25)),  # big-endian >i2, uncompressed
        ("nibabel_example4d.nii.gz", (128, 96, 24)),  # 4-D -> first volume
        ("nibabel_example_nifti2.nii.gz", (32, 20, 12)),  # NIfTI-2
        ("nibabel_functional.nii", (17, 21, 3)),  # float64, 4-D
        ("vtkdata_avg152T1_RL_nifti.nii.gz", (91, 109, 91)),  # sform-only, right-to-left
    ],
)
def test_format_variety_matches_nibabel_canonical(shared_data, name, shape):
    path = require(shared_data / FORMATS / name)
    vol = read_nifti(path, modality="MR")
    ref = nib.as_closest_canonical(nib.load(path))
    expected = np.asarray(ref.dataobj[..., 0] if len(ref.shape) == 4 else ref.dataobj, dtype=np.float32)
    assert vol.array.dtype == np.float32 and vol.array.shape == shape
    np.testing.assert_array_equal(vol.array, expected)
    assert np.allclose(vol.spacing_mm, ref.header.get_zooms()[:3], atol=1e-4)


def test_volume_index_selects_the_fourth_axis(shared_data):
    path = require(shared_data / FORMATS / "nibabel_example4d.nii.gz")
    v0, v1 = read_nifti(path, volume_index=0), read_nifti(path, volume_index=1)
    ref = np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj[..., 1], dtype=np.float32)
    np.testing.assert_array_equal(v1.array, ref)
    assert not np.array_equal(v0.array, v1.array)
    with pytest.raises(ValueError, match="volume_index=2 is out of range"):
        read_nifti(path, volume_index=2)


def test_right_to_left_template_comes_out_like_a_left_to_right_copy(shared_data, tmp_path):
    path = require(shared_data / FORMATS / "vtkdata_avg152T1_RL_nifti.nii.gz")
    img = nib.load(path)
    data = np.asarray(img.dataobj)
    # Store the same anatomy with the first axis reversed (left-to-right) and a matching affine.
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, data.shape[0] - 1
    lr = nib.Nifti1Image(data[::-1].copy(), img.affine @ flip)
    nib.save(lr, tmp_path / "lr.nii.gz")
    assert nib.aff2axcodes(img.affine) != nib.aff2axcodes(lr.affine)
    a, b = read_nifti(path), read_nifti(tmp_path / "lr.nii.gz")
    np.testing.assert_array_equal(a.array, b.array)
    # Same way up after normalization too: the same axial slices (up to float16 rounding of the filter sums).
    cfg = IngestConfig(min_foreground_fraction=0.0)
    sa, sb = normalize_volume(a, cfg).images.astype(np.float32), normalize_volume(b, cfg).images.astype(np.float32)
    np.testing.assert_allclose(sa, sb, atol=2e-3)
    assert np.abs(sa - sb[:, :, :, ::-1]).max() > 0.5  # a left-right mirror would not pass


def test_lps_affine_comes_out_in_ras_order(tmp_path):
    data = _marked()
    lps = np.diag([-2.0, -2.0, 3.0, 1.0])  # LPS storage: +i toward the patient's Left, +j toward Posterior
    nib.save(nib.Nifti1Image(data, lps), tmp_path / "lps.nii.gz")
    vol, shape, affine = read_nifti_grid(tmp_path / "lps.nii.gz", modality="MR")
    assert shape == data.shape
    # RAS+: axis 0 must increase toward Right, so the stored axis 0 (toward Left) and axis 1 (toward Posterior) flip.
    np.testing.assert_array_equal(vol.array, data[::-1, ::-1, :].astype(np.float32))
    assert vol.spacing_mm == (2.0, 2.0, 3.0)
    np.testing.assert_allclose(np.diff(vol.positions_mm), 3.0)


def test_transposed_storage_is_reordered(tmp_path):
    data = _marked((10, 12, 14))
    # Stored axes: i -> Superior, j -> Right, k -> Anterior.
    aff = np.array([[0, 1.0, 0, 0], [0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, aff), tmp_path / "sra.nii")
    vol = read_nifti(tmp_path / "sra.nii", modality="MR")
    np.testing.assert_array_equal(vol.array, np.transpose(data, (1, 2, 0)).astype(np.float32))


def test_scaling_is_applied_and_ct_is_guessed(tmp_path):
    raw = np.full((8, 8, 4), 100, dtype=np.int16)
    raw[0, 0, 0] = -24  # -> -1048 HU
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(2.0, -1000.0)
    nib.save(img, tmp_path / "scaled.nii.gz")
    vol = read_nifti(tmp_path / "scaled.nii.gz")
    assert vol.array[1, 1, 1] == pytest.approx(-800.0)
    assert vol.array.min() == pytest.approx(-1048.0)


def test_sform_only_file_uses_the_sform(tmp_path):
    data = _marked((6, 7, 8))
    img = nib.Nifti1Image(data, np.diag([-1.0, 1.0, 1.0, 1.0]))
    img.set_qform(None, code=0)
    img.set_sform(np.diag([-1.0, 1.0, 1.0, 1.0]), code=4)
    nib.save(img, tmp_path / "sform.nii.gz")
    np.testing.assert_array_equal(read_nifti(tmp_path / "sform.nii.gz").array, data[::-1].astype(np.float32))


def test_truncated_file_fails_with_its_name(tmp_path, shared_data):
    src = require(shared_data / "nifti/totalsegmentator_ct_mr_with_labels/example_mr_sm.nii.gz")
    (tmp_path / "cut.nii.gz").write_bytes(src.read_bytes()[:5000])
    with pytest.raises(ValueError, match="cut.nii.gz"):
        read_nifti(tmp_path / "cut.nii.gz")


def test_mask_aligns_with_lps_image(shared_data):
    base = shared_data / "nifti/totalsegmentator_ct_mr_with_labels"
    vol = read_nifti(require(base / "example_mr_sm.nii.gz"), modality="MR")
    mask = read_mask(require(base / "example_seg_mr.nii.gz"))
    assert mask.shape == vol.array.shape and mask.dtype == np.int32
    # The liver (5) lies on the patient's right: in RAS+ that is the high end of axis 0.
    xs = np.nonzero(mask == 5)[0]
    assert xs.mean() > mask.shape[0] / 2


def test_stored_values_scaled_lazily_match_nibabel(tmp_path):
    """Integer voxels stay stored (no float32 copy of the volume); the physical array is nibabel's get_fdata and
    normalizing the stored values with the scaling gives the slices of the eager float32 volume."""
    from medgan.config import IngestConfig
    from medgan.ingest.normalize import normalize_volume
    from medgan.ingest.volume import Volume

    rng = np.random.default_rng(0)
    raw = rng.integers(-1200, 2000, size=(96, 80, 12)).astype(np.int16)
    img = nib.Nifti1Image(raw, np.diag([-0.7, 0.7, 2.0, 1.0]))
    img.header.set_slope_inter(0.5, -24.0)
    nib.save(img, tmp_path / "s.nii.gz")
    vol = read_nifti(tmp_path / "s.nii.gz", modality="CT")
    assert vol.data.dtype == np.int16 and (vol.slope, vol.intercept) == (0.5, -24.0)
    expected = nib.as_closest_canonical(nib.load(tmp_path / "s.nii.gz")).get_fdata().astype(np.float32)
    np.testing.assert_array_equal(vol.array, expected)
    eager = Volume(vol.array, vol.spacing_mm, "CT", positions_mm=vol.positions_mm)
    for window in ("abdomen", "percentile"):
        cfg = IngestConfig(min_foreground_fraction=0.0, ct_window=window)
        a, b = normalize_volume(vol, cfg).images, normalize_volume(eager, cfg).images
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3)


def test_multi_member_gzip_and_zero_padding(tmp_path):
    """bgzip-style files (several gzip members) and zero padding after the stream decode whole."""
    import gzip

    data = _marked((9, 8, 7))
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "one.nii")
    raw = (tmp_path / "one.nii").read_bytes()
    (tmp_path / "multi.nii.gz").write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]) + b"\0" * 16)
    np.testing.assert_array_equal(read_nifti(tmp_path / "multi.nii.gz").array, data.astype(np.float32))
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(raw)[:-40])
    with pytest.raises(ValueError, match=r"cut.nii.gz: gzip stream is corrupt or truncated \(Compressed file ended"):
        read_nifti(tmp_path / "cut.nii.gz")


def test_gzip_layouts_read_like_the_plain_file(tmp_path):
    """gzip members split inside the header, header extensions before the voxels and bytes after the voxels read as
    the plain file; a stream shorter than its header says is an error naming the file."""
    import gzip

    data = _marked((9, 8, 7))
    img = nib.Nifti1Image(data, np.diag([-1.0, 1.0, 2.0, 1.0]))
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"an extension before the voxels"))
    nib.save(img, tmp_path / "ext.nii")
    raw = (tmp_path / "ext.nii").read_bytes()
    assert int(nib.load(tmp_path / "ext.nii").dataobj.offset) > 352
    files = {
        "split_in_header.nii.gz": gzip.compress(raw[:100]) + gzip.compress(raw[100:400]) + gzip.compress(raw[400:]),
        "trailing.nii.gz": gzip.compress(raw + b"bytes after the voxels"),
    }
    for name, blob in files.items():
        (tmp_path / name).write_bytes(blob)
        np.testing.assert_array_equal(read_nifti(tmp_path / name).array, data[::-1].astype(np.float32))
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(raw[:-50]))
    with pytest.raises(ValueError, match="short.nii.gz: voxel data is truncated"):
        read_nifti(tmp_path / "short.nii.gz")


def test_isal_inflate_reads_what_the_stdlib_reads(shared_data, tmp_path):
    """The ISA-L path (``ingest.fast_gunzip``, the default) gives every gzipped NIfTI the shipped data has, and the
    odd gzip layouts, the same volume as nibabel's stdlib gzip; a cut stream gets the same one-line reason."""
    import gzip

    pytest.importorskip("isal")
    files = sorted(require(shared_data / "nifti").rglob("*.nii.gz"))
    assert len(files) >= 8
    raw_path = tmp_path / "one.nii"
    nib.save(nib.Nifti1Image(_marked((9, 8, 7)), np.diag([-1.0, 1.0, 2.0, 1.0])), raw_path)
    raw = raw_path.read_bytes()
    (tmp_path / "multi.nii.gz").write_bytes(gzip.compress(raw[:100]) + gzip.compress(raw[100:]) + b"\0" * 16)
    for path in [*files, tmp_path / "multi.nii.gz"]:
        fast, plain = (read_nifti_grid(path, fast_gunzip=f) for f in (True, False))
        assert fast[0].data.dtype == plain[0].data.dtype, path.name
        np.testing.assert_array_equal(fast[0].data, plain[0].data, err_msg=path.name)
        assert (fast[0].slope, fast[0].intercept, fast[0].modality) == (plain[0].slope, plain[0].intercept,
                                                                        plain[0].modality)  # fmt: skip
        np.testing.assert_array_equal(fast[0].positions_mm, plain[0].positions_mm)
        assert (fast[0].spacing_mm, fast[0].notes) == (plain[0].spacing_mm, plain[0].notes)
        assert fast[1] == plain[1] and np.array_equal(fast[2], plain[2])
    seg = require(shared_data / "nifti" / "totalsegmentator_ct_mr_with_labels" / "example_seg.nii.gz")
    np.testing.assert_array_equal(read_mask(seg, fast_gunzip=True), read_mask(seg, fast_gunzip=False))
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(raw)[:-40])
    reasons = set()
    for f in (True, False):
        with pytest.raises(ValueError) as e:
            read_nifti(tmp_path / "cut.nii.gz", fast_gunzip=f)
        reasons.add(str(e.value))
    assert len(reasons) == 1 and "cut.nii.gz: gzip stream is corrupt or truncated" in reasons.pop()
