"""Training data: a slice dataset's train split resident on the training device, with batches drawn on-device.

The whole split lives on the device as float16 (100k slices are 3.3 GB), so a batch is one index + gather, with no
host round trip. Data order is a pure function of (seed, images seen): a global stream walks one seeded permutation
per epoch, and each DDP rank takes its own disjoint slice of every global batch, so a resumed run sees exactly the
images the uninterrupted run would have.
"""

from __future__ import annotations

import numpy as np
import torch

from medgan.dataset import SliceDataset

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant to spread seeds


def step_seed(seed: int, rank: int, images_seen: int, stream: int = 0) -> int:
    """A 63-bit seed from (seed, rank, images seen, stream): every step's randomness is reproducible from counters."""
    h = seed * _MIX + rank * 0x632BE59BD9B4E019 + images_seen * 0x8CB92BA72F3D8DD7 + stream * 0xD6E8FEB86659FD93
    h %= 1 << 64
    h ^= h >> 31
    return (h * 0xBF58476D1CE4E5B9 % (1 << 64)) >> 1


class DeviceFeeder:
    """The train split of a slice dataset on `device`, sampled without a DataLoader.

    Args:
        ds: an opened slice dataset.
        device: where the images live and batches are made.
        seed: data-order seed.
        rank: this process's DDP rank.
        world_size: number of DDP processes.
        split: which split to train on.

    Raises:
        ValueError: the split is empty or the images are not [N, 1, 128, 128].

    Example:
        >>> feeder = DeviceFeeder(SliceDataset.open("datasets/demo"), torch.device("cpu"), seed=0)
        >>> x, y = feeder.batch(images_seen=0, batch_per_rank=32)   # float32 [32, 1, 128, 128], int64 [32]
    """

    def __init__(
        self,
        ds: SliceDataset,
        device: torch.device,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
    ):
        idx = ds.indices(split)
        if len(idx) == 0:
            raise ValueError(f"{ds.path}: the {split!r} split is empty; re-ingest with train split fractions > 0")
        if ds.images.shape[1:] != (1, 128, 128):
            raise ValueError(f"{ds.path}: expected [N, 1, 128, 128] slices, got {tuple(ds.images.shape)}")
        self.device, self.seed, self.rank, self.world_size = device, seed, rank, world_size
        self.images = torch.from_numpy(np.ascontiguousarray(ds.images[idx], dtype=np.float16)).to(device)
        self.labels = torch.from_numpy(ds.labels[idx]).to(device)
        self.num_classes = len(ds.classes)
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.images)

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator(device=self.device).manual_seed(step_seed(self.seed, 0, epoch, stream=1))
            self._perms = {k: v for k, v in self._perms.items() if k >= epoch - 1}  # keep at most two epochs
            self._perms[epoch] = torch.randperm(len(self.images), device=self.device, generator=g)
        return self._perms[epoch]

    def indices(self, images_seen: int, batch_per_rank: int) -> torch.Tensor:
        """Dataset rows for this rank's share of the global batch that starts at `images_seen` (global count)."""
        n = len(self.images)
        start = images_seen + self.rank * batch_per_rank
        pos = torch.arange(start, start + batch_per_rank, device=self.device)
        first, last = start // n, (start + batch_per_rank - 1) // n
        perm = self._perm(first) if first == last else torch.cat([self._perm(e) for e in range(first, last + 1)])
        return perm[pos - first * n]

    def batch(self, images_seen: int, batch_per_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images float32 [b, 1, 128, 128] in [-1, 1], labels int64 [b]) for this rank at `images_seen`."""
        i = self.indices(images_seen, batch_per_rank)
        return self.images[i].float(), self.labels[i]

    def class_frequencies(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.num_classes).float() / len(self.labels)
