"""2-D sources: grey, RGB-stored grey and 16-bit images decode to one grey plane."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medgan.config import IngestConfig
from medgan.ingest.image2d import read_image2d
from medgan.ingest.normalize import normalize_image2d
from tests.conftest import require


def test_rgb_stored_grey_equals_grey(tmp_path):
    grey = (np.arange(60 * 80) % 251).astype(np.uint8).reshape(60, 80)
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "rgb.png")
    a, b = read_image2d(tmp_path / "g.png"), read_image2d(tmp_path / "rgb.png")
    assert a.shape == (60, 80) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-3)


def test_colour_uses_luminance_and_16bit_keeps_range(tmp_path):
    Image.fromarray(np.full((4, 4, 3), (255, 0, 0), np.uint8)).save(tmp_path / "red.png")
    assert read_image2d(tmp_path / "red.png")[0, 0] == pytest.approx(0.299 * 255, abs=0.01)
    deep = (np.arange(16 * 16, dtype=np.uint16) * 250).reshape(16, 16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert read_image2d(tmp_path / "deep.png").max() == pytest.approx(deep.max())


def test_not_an_image_is_named(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match="bad.jpg"):
        read_image2d(tmp_path / "bad.jpg")


def test_real_brain_jpeg_to_slice(shared_data):
    path = next(iter(sorted(require(shared_data / "labelled_2d/brain_tumor_mri/Training/pituitary").glob("*.jpg"))))
    img = read_image2d(path)
    assert img.ndim == 2 and img.shape == (224, 224)
    out, fg = normalize_image2d(img, IngestConfig())
    assert out.shape == (1, 1, 128, 128) and out.dtype == np.float16
    assert out.min() == -1 and out.max() == pytest.approx(1, abs=1e-3) and fg > 0.1
    pct, _ = normalize_image2d(img, IngestConfig(image_normalization="percentile", mr_percentiles=[1, 99]))
    assert (pct == 1).mean() > (out == 1).mean()  # the top percentile is clipped
