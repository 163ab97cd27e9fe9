"""Ingest parts: a part file is reused only while it still holds the images its digests name."""

from __future__ import annotations

import numpy as np

from medgan.dataset import checked_float16, image_digests
from medgan.ingest.store import part_intact


def test_a_part_is_intact_only_with_its_own_images(tmp_path):
    images = np.random.default_rng(1).uniform(-1, 1, (20, 1, 16, 16)).astype(np.float16)
    path = tmp_path / "part.npy"
    np.save(path, checked_float16(images, 0, path))
    assert part_intact(path, image_digests(images))
    assert not part_intact(path, image_digests(images[1:]) + image_digests(images[:1]))  # other content
    path.write_bytes(path.read_bytes()[:-100])  # truncated
    assert not part_intact(path, image_digests(images))
    assert not part_intact(tmp_path / "missing.npy", image_digests(images))
