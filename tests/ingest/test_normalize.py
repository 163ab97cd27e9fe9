"""Normalization: HU windows, percentile scaling, display orientation, spacing-aware resize, selection, mask classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medgan.config import IngestConfig
from medgan.ingest.nifti import read_mask, read_nifti
from medgan.ingest.normalize import (
    WINDOWS_HU,
    box_mean,
    normalize_image2d,
    normalize_volume,
    parse_window,
    resize,
    window_to_unit,
)
from medgan.ingest.volume import Volume
from tests.conftest import require


@pytest.mark.parametrize(
    "name, hu, expected",
    [
        ("abdomen", [-160, 40, 240, -1000, 3000], [-1, 0, 1, -1, 1]),  # W400/L40
        ("brain", [0, 40, 80, 60], [-1, 0, 1, 0.5]),  # W80/L40
        ("lung", [-1350, -600, 150], [-1, 0, 1]),  # W1500/L-600
        ("bone", [-500, 400, 1300], [-1, 0, 1]),  # W1800/L400
    ],
)
def test_windows_map_known_hu(name, hu, expected):
    c, w = parse_window(name, IngestConfig())
    np.testing.assert_allclose(window_to_unit(np.array(hu, np.float32), c, w), expected, atol=1e-6)


def test_custom_and_explicit_windows():
    cfg = IngestConfig(ct_window="custom", window_center_hu=100, window_width_hu=200)
    assert parse_window("", cfg) == (100, 200)
    assert parse_window("50:300", cfg) == (50, 300)
    assert parse_window("percentile", cfg) is None
    with pytest.raises(ValueError, match="unknown"):
        parse_window("liver", cfg)
    assert set(WINDOWS_HU) == {"abdomen", "brain", "lung", "bone"}


def _ct(shape=(64, 64, 6), spacing=(1.0, 1.0, 2.0), fill=40.0) -> Volume:
    return Volume(np.full(shape, fill, np.float32), spacing, modality="CT")


def test_ct_volume_window_values_after_resize():
    vol = _ct()
    vol.array[:, :, 3] = 240.0  # top of the abdomen window
    s = normalize_volume(vol, IngestConfig())
    assert s.images.shape == (6, 1, 128, 128) and s.images.dtype == np.float16
    np.testing.assert_allclose(s.images[0], 0.0, atol=1e-3)
    np.testing.assert_allclose(s.images[3], 1.0, atol=1e-3)
    assert s.normalization.startswith("CT window abdomen W400/L40")


def test_percentile_scaling_for_mr():
    rng = np.random.default_rng(0)
    arr = rng.uniform(0, 1000, size=(128, 128, 4)).astype(np.float32)  # native 128: no resampling
    cfg = IngestConfig(mr_percentiles=[10.0, 90.0], min_foreground_fraction=0.0)
    s = normalize_volume(Volume(arr.copy(), (1.0, 1.0, 1.0), modality="MR"), cfg)
    lo, hi = np.percentile(arr, [10, 90])
    expected = np.clip((arr - lo) / (hi - lo) * 2 - 1, -1, 1)
    got = s.images.astype(np.float32)
    # Display flips reorder pixels but keep each slice's values.
    np.testing.assert_allclose(np.sort(got.ravel()), np.sort(expected.ravel()), atol=2e-3)
    assert (got == -1).mean() == pytest.approx(0.1, abs=0.01) and (got == 1).mean() == pytest.approx(0.1, abs=0.01)
    assert s.normalization == "percentile clip p10-p90 per volume"


def test_anisotropic_spacing_keeps_physical_aspect_and_pads():
    # 100 x 50 voxels of 1 x 2 mm: a 100 mm square field -> fills 128 x 128 with no padding.
    vol = Volume(np.full((100, 50, 3), 500.0, np.float32), (1.0, 2.0, 1.0), modality="CT")
    s = normalize_volume(vol, IngestConfig())
    assert s.images.shape == (3, 1, 128, 128)
    assert (s.images == 1).all()
    assert s.spacing_mm == pytest.approx(100 / 128)
    # 100 x 50 at 1 x 1 mm: a 100 x 50 mm field -> 64 rows of content, padded with -1 above and below.
    vol = Volume(np.full((100, 50, 3), 500.0, np.float32), (1.0, 1.0, 1.0), modality="CT")
    img = normalize_volume(vol, IngestConfig()).images[0, 0].astype(np.float32)
    rows = np.flatnonzero(img.max(axis=1) > 0)
    assert len(rows) == 64 and rows[0] == 32
    assert (img[:32] == -1).all() and (img[:, :] == 1).sum() == 64 * 128


def test_axial_display_orientation_is_radiological():
    vol = _ct(shape=(40, 40, 4), fill=-1000.0)
    vol.array[30:40, 30:40, :] = 240.0  # patient's right (high x) and anterior (high y)
    img = normalize_volume(vol, IngestConfig(min_foreground_fraction=0.0)).images[0, 0].astype(np.float32)
    # Radiological axial view: patient right on the image's left, anterior at the top.
    assert img[:20, :20].mean() > 0.5 and img[64:, :].max() < -0.9 and img[:, 64:].max() < -0.9


@pytest.mark.parametrize(
    "axis, corner", [("coronal", (slice(0, 20), slice(0, 20))), ("sagittal", (slice(0, 20), slice(0, 20)))]
)
def test_coronal_and_sagittal_orientation(axis, corner):
    vol = Volume(np.full((40, 40, 40), -1000.0, np.float32), (1.0, 1.0, 1.0), modality="CT")
    vol.array[30:, 30:, 30:] = 240.0  # right, anterior, superior corner
    s = normalize_volume(vol, IngestConfig(slice_axis=axis, min_foreground_fraction=0.0))
    img = s.images[-1, 0].astype(np.float32)
    # Coronal: superior at top, patient right on the left; sagittal: superior at top, anterior on the left.
    assert img[corner].mean() > 0.5 and img[64:, :].max() < -0.9


def test_near_empty_slices_are_dropped():
    vol = _ct(shape=(64, 64, 5), fill=-1000.0)
    vol.array[10:50, 10:50, 1] = 40.0  # ~39% of the slice
    vol.array[30:33, 30:33, 3] = 40.0  # 0.2%: near-empty
    s = normalize_volume(vol, IngestConfig(min_foreground_fraction=0.05))
    assert s.slice_index == [1] and s.n_total == 5 and len(s.images) == 1


def test_mask_classes_largest_area_minimum_and_background():
    vol = _ct(shape=(64, 64, 4))
    mask = np.zeros((64, 64, 4), np.int32)
    mask[0:32, :, 0] = 5  # liver, large
    mask[40:44, 0:4, 0] = 1  # spleen, small
    mask[0:8, 0:8, 1] = 2  # kidney id 2 ...
    mask[10:18, 0:8, 1] = 3  # ... plus id 3: one class "kidney" (area adds up)
    mask[0:3, 0:3, 2] = 5  # below the minimum area -> background
    cfg = IngestConfig(mask_labels={"5": "liver", "1": "spleen", "2": "kidney", "3": "kidney"}, mask_min_area_px=300)
    s = normalize_volume(vol, cfg, mask=mask)
    assert s.classes == ["liver", "kidney"] and s.slice_index == [0, 1]
    cfg.mask_background_class = "none"
    assert normalize_volume(vol, cfg, mask=mask).classes == ["liver", "kidney", "none", "none"]
    with pytest.raises(ValueError, match="mask shape"):
        normalize_volume(vol, cfg, mask=mask[:, :, :2])


def test_real_ct_with_organ_mask(shared_data):
    base = shared_data / "nifti/totalsegmentator_ct_mr_with_labels"
    vol = read_nifti(require(base / "example_ct_sm.nii.gz"), modality="CT")
    mask = read_mask(require(base / "example_seg.nii.gz"))
    cfg = IngestConfig(mask_labels={"5": "liver", "2": "kidney", "3": "kidney", "1": "spleen"})
    s = normalize_volume(vol, cfg, mask=mask)
    assert len(s.images) > 10 and set(s.classes) <= {"liver", "kidney", "spleen"} and "liver" in s.classes
    assert s.images.min() >= -1 and s.images.max() <= 1


def test_image2d_aspect_and_minmax():
    img = np.tile(np.linspace(10, 200, 100, dtype=np.float32), (50, 1))  # 50 rows x 100 cols
    out, fg = normalize_image2d(img, IngestConfig())
    assert out.shape == (1, 1, 128, 128)
    x = out[0, 0].astype(np.float32)
    assert (x[:32] == -1).all() and (x[96:] == -1).all()  # padded top and bottom to a square
    assert x[32:96, 0].max() < -0.95 and x[32:96, -1].min() > 0.95
    assert 0.4 < fg < 0.5


def test_flipped_views_from_readers_match_contiguous_arrays():
    # DICOM readers hand over [X, Y, Z] as flipped views of a [Z, rows, cols] buffer; the result must not depend on it.
    base = np.random.default_rng(1).normal(40, 150, (3, 96, 80)).astype(np.float32)
    view = np.transpose(base, (2, 1, 0))[::-1, ::-1, :]
    cfg = IngestConfig(min_foreground_fraction=0.0)
    a = normalize_volume(Volume(view, (0.8, 0.8, 2.0), modality="CT"), cfg).images.astype(np.float32)
    b = normalize_volume(Volume(np.ascontiguousarray(view), (0.8, 0.8, 2.0), modality="CT"), cfg).images
    np.testing.assert_allclose(a, b.astype(np.float32), atol=2e-3)


def test_many_slices_without_resize_keep_their_own_pixels():
    """Slices converted piecewise through the reused scratch buffer never alias each other (no-resize case)."""
    n = 80  # more slices than fit one conversion piece at 256x256
    stored = np.empty((256, 256, n), np.int16)
    for k in range(n):
        stored[:, :, k] = k * 10 - 400  # stored value per slice
    vol = Volume(stored, (1.0, 1.0, 1.0), modality="CT", slope=1.0, intercept=-24.0)
    s = normalize_volume(vol, IngestConfig(resolution=256, min_foreground_fraction=0.0, ct_window="0:2000"))
    assert s.images.shape == (n, 1, 256, 256)
    hu = np.arange(n) * 10 - 424.0
    np.testing.assert_allclose(s.images[:, 0, 100, 100].astype(np.float32), hu / 1000.0, atol=2e-3)


@pytest.mark.parametrize(("shape", "fr", "fc"), [((3, 1, 512, 512), 4, 4), ((2, 1, 12, 18), 3, 2), ((2, 1, 8, 8), 1, 4),
                                                 ((2, 1, 8, 8), 4, 1), ((1, 1, 1024, 512), 8, 4)])  # fmt: skip
def test_box_mean_is_avg_pool(shape, fr, fc):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 1000
    out = box_mean(x, fr, fc)
    torch.testing.assert_close(out, F.avg_pool2d(x, (fr, fc)), rtol=1e-6, atol=1e-4)
    assert out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()  # never a view of the input
    assert resize(x, (shape[2] // fr, shape[3] // fc)).shape == out.shape
