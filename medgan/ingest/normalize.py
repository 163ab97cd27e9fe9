"""Normalization: CT windows / MR percentiles -> [-1, 1], display orientation, spacing-aware resize to 128, selection.

Everything after reading is batched over the slices of one volume with torch (one antialiased ``interpolate`` call per
chunk of slices), which is ~10x faster than resizing slice by slice with scikit-image. Like a viewer, the slices are
resampled in physical units first and the window / percentile mapping is applied to the resampled 128x128 pixels
(16x fewer values to map at 512x512); display flips are applied at 128x128 too.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from medgan.config import IngestConfig
from medgan.ingest.volume import Volume

# Named CT windows in HU: (center/level, width).
WINDOWS_HU: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "brain": (40.0, 80.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}
# Slice axis name -> (RAS axis sliced through, row axis, column axis). Rows and columns are both reversed for display:
# axial/coronal in radiological convention (patient right on image left; anterior/superior at top), sagittal with
# anterior on the left and superior at top.
AXES = {"axial": (2, 1, 0), "coronal": (1, 2, 0), "sagittal": (0, 2, 1)}
CHUNK_SLICES = 64  # slices mapped, flipped and selected together (at the output size: small)
RESIZE_BYTES = 4 << 20  # float32 bytes converted and resized at a time: stays in cache (~1.3x faster than 32 MB)
MAX_SAMPLES = 2_000_000  # voxels a volume's percentiles are taken from (`percentile_range`)
_SCRATCH_MAX = 256 << 20  # bytes of float32 scratch kept per thread between volumes
_scratch = threading.local()


@dataclass
class Slices:
    """The kept slices of one volume.

    Attributes:
        images: float16 [n, 1, R, R] in [-1, 1].
        slice_index: index of each slice along the slice axis of the canonical volume.
        position_mm: position of each slice along that axis (mm).
        spacing_mm: pixel size of the output grid (mm), isotropic.
        classes: per-slice class names from a mask (None when labels come from elsewhere).
        normalization: what intensity mapping was used, e.g. "CT window abdomen W400/L40".
        n_total: slices in the volume before selection.
    """

    images: np.ndarray
    slice_index: list[int]
    position_mm: list[float]
    spacing_mm: float
    classes: list[str] | None = None
    normalization: str = ""
    n_total: int = 0
    notes: list[str] = field(default_factory=list)


def parse_window(name: str, cfg: IngestConfig) -> tuple[float, float] | None:
    """Resolve a window name to (center, width) in HU; None means percentile scaling.

    Args:
        name: a preset (abdomen | brain | lung | bone), ``custom`` (``cfg.window_center_hu``/``window_width_hu``),
            ``CENTER:WIDTH`` in HU (e.g. ``40:400``), or ``percentile``.
        cfg: the ingest config.

    Raises:
        ValueError: an unknown name or a non-positive width.
    """
    name = (name or cfg.ct_window).strip().lower()
    if name == "percentile":
        return None
    if name == "custom":
        c, w = float(cfg.window_center_hu), float(cfg.window_width_hu)
    elif name in WINDOWS_HU:
        c, w = WINDOWS_HU[name]
    elif ":" in name:
        try:
            c, w = (float(v) for v in name.split(":"))
        except ValueError:
            raise ValueError(f"window {name!r}: expected CENTER:WIDTH in HU, e.g. 40:400") from None
    else:
        raise ValueError(
            f"window {name!r} is unknown; use one of {sorted(WINDOWS_HU)}, custom, percentile or CENTER:WIDTH (HU)"
        )
    if w <= 0:
        raise ValueError(f"window {name!r}: width must be > 0 HU, got {w}")
    return c, w


def window_to_unit(x: np.ndarray | torch.Tensor, center: float, width: float):
    """Map HU to [-1, 1]: ``center - width/2 -> -1``, ``center + width/2 -> 1``, clipped outside."""
    lo = center - width / 2.0
    if isinstance(x, torch.Tensor):
        return ((x - lo) * (2.0 / width) - 1.0).clamp_(-1.0, 1.0)
    return np.clip((np.asarray(x, dtype=np.float32) - lo) * (2.0 / width) - 1.0, -1.0, 1.0)


def percentile_range(
    array: np.ndarray, percentiles: list[float], max_samples: int = MAX_SAMPLES, scale: tuple[float, float] = (1.0, 0.0)
) -> tuple[float, float]:
    """Per-volume intensity percentiles, on a deterministic strided subsample of at most `max_samples` voxels.

    ``scale`` = (slope, intercept) maps stored values to physical ones first (see `Volume`).
    """
    step = sample_step(array.shape, max_samples)
    return sample_percentiles(array[(slice(None, None, step),) * array.ndim], percentiles, scale)


def sample_step(shape: tuple[int, ...], max_samples: int = MAX_SAMPLES) -> int:
    """The stride, along every axis, of `percentile_range`'s subsample of an array of `shape`."""
    return max(1, int(np.ceil((int(np.prod(shape)) / max_samples) ** (1.0 / len(shape)))))


def sample_percentiles(
    sample: np.ndarray, percentiles: list[float], scale: tuple[float, float] = (1.0, 0.0)
) -> tuple[float, float]:
    """The two `percentiles` of a sample of stored values, scaled to physical ones by (slope, intercept)."""
    if scale != (1.0, 0.0):
        sample = sample.astype(np.float64) * scale[0] + scale[1]
    lo, hi = np.percentile(sample, [float(percentiles[0]), float(percentiles[1])])
    return float(lo), float(hi)


def range_to_unit(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Map [lo, hi] to [-1, 1] (clipped); a constant volume maps to -1."""
    if hi <= lo:
        return torch.full_like(x, -1.0)
    return ((x - lo) * (2.0 / (hi - lo)) - 1.0).clamp_(-1.0, 1.0)


def fit_size(height: int, width: int, row_mm: float, col_mm: float, resolution: int) -> tuple[int, int, float]:
    """Output (h, w) that keeps the physical aspect ratio inside a square of `resolution` pixels, and its pixel size."""
    extent = max(height * row_mm, width * col_mm)
    px = extent / resolution
    h = max(1, min(resolution, round(height * row_mm / px)))
    w = max(1, min(resolution, round(width * col_mm / px)))
    return h, w, px


def resize(stack: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize [n, 1, H, W] to `size`: antialiased for images (area when shrinking both axes, else bilinear with
    antialias), nearest for label maps."""
    if tuple(stack.shape[-2:]) == tuple(size):
        return stack
    if mode == "nearest":
        return F.interpolate(stack, size=size, mode="nearest-exact")
    if size[0] <= stack.shape[-2] and size[1] <= stack.shape[-1]:
        # Area averaging is an exact box antialias filter and ~1.5x cheaper than antialiased bilinear; for whole
        # factors (512 -> 128) it is a mean over fixed blocks (`box_mean`).
        (rows, cols), (h, w) = stack.shape[-2:], size
        if rows % h == 0 and cols % w == 0:
            return box_mean(stack, rows // h, cols // w)
        return F.interpolate(stack, size=size, mode="area")
    return F.interpolate(stack, size=size, mode="bilinear", antialias=True, align_corners=False)


def box_mean(stack: torch.Tensor, fr: int, fc: int) -> torch.Tensor:
    """Mean over fr x fc blocks of [n, 1, H, W] (H, W multiples of fr, fc): ``F.avg_pool2d(stack, (fr, fc))``.

    Written as whole-row adds (rows of a block, contiguous), then strided adds over the 4x smaller result, which
    streams memory instead of walking each window: ~2x faster than torch's CPU avg_pool2d for 512 -> 128. The float32
    sums run in another order than avg_pool2d's, so the two agree to rounding. Never returns a view of `stack`.
    """
    n, _, rows, cols = stack.shape
    if (fr, fc) == (1, 1):
        return stack.clone()
    x = stack.reshape(n, rows // fr, fr, cols)
    acc = x[:, :, 0] + x[:, :, 1] if fr > 1 else x[:, :, 0]
    for j in range(2, fr):
        acc += x[:, :, j]
    if fc > 1:
        y = acc.view(n, rows // fr, cols // fc, fc)
        acc = y[..., 0] + y[..., 1]
        for j in range(2, fc):
            acc += y[..., j]
    return acc.mul_(1.0 / (fr * fc)).unsqueeze(1)


def pad_square(stack: torch.Tensor, resolution: int, fill: float) -> torch.Tensor:
    """Pad [n, 1, h, w] centred to [n, 1, resolution, resolution] with `fill`."""
    h, w = stack.shape[-2:]
    top, left = (resolution - h) // 2, (resolution - w) // 2
    if (h, w) != (resolution, resolution):
        stack = F.pad(stack, (left, resolution - w - left, top, resolution - h - top), value=fill)
    return stack


def slice_axes(axis: str) -> tuple[int, int, int]:
    """(RAS axis sliced through, row axis, column axis) of a slice axis name (see `AXES`).

    Raises:
        ValueError: an unknown slice axis.
    """
    if axis not in AXES:
        raise ValueError(f"ingest.slice_axis={axis!r}; use one of {sorted(AXES)}")
    return AXES[axis]


def display_stack(array: np.ndarray, axis: str) -> tuple[np.ndarray, int, int]:
    """View a canonical [X, Y, Z] array as slices [n, rows, cols], before the display flip of rows and columns.

    ``np.flip(view, (1, 2))`` is the display orientation (see `AXES`); the flip is applied after resizing.

    Returns:
        (the [n, rows, cols] view, the RAS axis of rows, the RAS axis of columns).

    Raises:
        ValueError: an unknown slice axis.
    """
    s, r, c = slice_axes(axis)
    return np.transpose(array, (s, r, c)), r, c


def mask_classes(mask: torch.Tensor, cfg: IngestConfig) -> list[str | None]:
    """Per-slice class from a resized label stack [n, 1, R, R]: the mapped label with the largest area >= the minimum.

    Several label ids may map to one class (their areas add up). Slices where no mapped class reaches
    ``cfg.mask_min_area_px`` get ``cfg.mask_background_class`` (None = drop when that is empty).
    """
    by_class: dict[str, list[int]] = {}
    for k, name in cfg.mask_labels.items():
        by_class.setdefault(str(name), []).append(int(k))
    names = sorted(by_class)
    if not names:
        raise ValueError("a mask column needs ingest.mask_labels (label id -> class name), e.g. {'5': 'liver'}")
    areas = torch.stack(
        [torch.isin(mask, torch.tensor(by_class[c], dtype=mask.dtype)).sum(dim=(1, 2, 3)) for c in names], dim=1
    )  # [n, classes]
    best_area, best = areas.max(dim=1)
    out: list[str | None] = []
    for a, b in zip(best_area.tolist(), best.tolist(), strict=True):
        out.append(names[b] if a >= cfg.mask_min_area_px else (cfg.mask_background_class or None))
    return out


def _tensor(a: np.ndarray, *, scratch: bool = False) -> torch.Tensor:
    """float32 tensor of `a` (any real dtype and strides), copying only when needed.

    Float32 C-contiguous input with positive strides is used in place (torch rejects negative strides, which
    np.ascontiguousarray keeps on size-1 axes). Anything else is converted into a new array or, with `scratch`, into a
    per-thread buffer reused across chunks and volumes, so no new memory is touched per volume (a fresh 100 MB float32
    copy of a CT volume costs more in page faults than the conversion itself). A scratch tensor is valid until the
    next scratch conversion in the same thread.
    """
    if a.dtype == np.float32 and a.flags.c_contiguous and min(a.strides, default=0) >= 0:
        return torch.from_numpy(a)
    need = int(np.prod(a.shape))
    buf = getattr(_scratch, "buf", None) if scratch else None
    if buf is None or buf.size < need:
        buf = np.empty(need, np.float32)
        if scratch and need * 4 <= _SCRATCH_MAX:
            _scratch.buf = buf
    out = buf[:need].reshape(a.shape)
    np.copyto(out, a, casting="unsafe")
    return torch.from_numpy(out)


def _resized(slices: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """[k, rows, cols] of any dtype -> float32 [k, 1, h, w], never aliasing the scratch buffer (it is reused)."""
    x = _tensor(slices, scratch=True).unsqueeze(1)
    out = resize(x, size)
    return out.clone() if out.data_ptr() == x.data_ptr() else out


def _resize_into(out: torch.Tensor, first: int, stack: np.ndarray, size: tuple[int, int]) -> tuple[int, ...]:
    """Resize slices [k, rows, cols] (any dtype and strides) into ``out[first : first + k]`` ([n, 1, h, w] float32), a
    few MB at a time, and return the dims of the display flip still to apply at the output size.

    Readers often hand over flipped views (negative strides). The un-flipped memory is resized without a copy and
    those flips are folded into the display flip (the resize filters are mirror-symmetric, so this is exact).
    """
    flips = tuple(d + 1 for d in (1, 2) if stack.strides[d] > 0)
    stack = stack[:, :: -1 if stack.strides[1] < 0 else 1, :: -1 if stack.strides[2] < 0 else 1]
    k, rows, cols = stack.shape
    step = max(1, RESIZE_BYTES // (4 * rows * cols))
    for i in range(0, k, step):
        out[first + i : first + min(k, i + step)] = _resized(stack[i : i + step], size)
    return flips


def normalize_volume(volume: Volume, cfg: IngestConfig, *, window: str = "", mask: np.ndarray | None = None) -> Slices:
    """Turn a canonical volume into kept 128x128 slices in [-1, 1].

    Steps: intensity mapping (CT: HU window; other modalities: per-volume percentile clip), display orientation,
    in-plane resample to isotropic pixels with the physical aspect kept, centred padding to a square, antialiased
    resize to ``cfg.resolution``, then selection: slices whose fraction of pixels above ``cfg.foreground_level`` is
    below ``cfg.min_foreground_fraction`` are dropped, and with a mask each slice gets its class (or is dropped).

    Args:
        volume: a canonical RAS+ `Volume` (its stored values and slope/intercept; ``volume.array`` is not made).
        cfg: the ingest config.
        window: a window override for CT (see `parse_window`); "" = ``cfg.ct_window``.
        mask: int label map with the same shape as ``volume.array`` (canonical), or None.

    Returns:
        The kept `Slices`.

    Raises:
        ValueError: a mask whose shape differs from the volume's, an unknown window or slice axis.

    Example:
        >>> s = normalize_volume(read_nifti("ct.nii.gz", modality="CT"), IngestConfig())
        >>> s.images.shape   # (n, 1, 128, 128)
    """
    res = int(cfg.resolution)
    shape = tuple(volume.shape)
    if mask is not None and mask.shape != shape:
        raise ValueError(f"mask shape {mask.shape} differs from the image shape {shape}")
    s_axis, r_ax, c_ax = slice_axes(cfg.slice_axis)
    n, height, width = shape[s_axis], shape[r_ax], shape[c_ax]
    h, w, px = fit_size(height, width, volume.spacing_mm[r_ax], volume.spacing_mm[c_ax], res)
    mstack = display_stack(mask, cfg.slice_axis)[0] if mask is not None else None
    if s_axis == 2 and volume.positions_mm is not None and len(volume.positions_mm) == n:
        positions = np.asarray(volume.positions_mm, dtype=np.float64)
    else:
        positions = np.arange(n) * float(volume.spacing_mm[s_axis])
    win = parse_window(window, cfg) if volume.modality == "CT" else None  # a bad window fails before any reading

    # Stage 1: every slice resized to (h, w) in float32, stored values (the scaling is linear: applied after).
    resized = torch.empty((n, 1, h, w))
    with torch.inference_mode():
        if win is None:
            lo, hi = percentile_range(volume.data, cfg.mr_percentiles, scale=(volume.slope, volume.intercept))
        flips = _resize_into(resized, 0, display_stack(volume.data, cfg.slice_axis)[0], (h, w))
    if win is not None:
        c, ww = win
        normalization = f"CT window {window or cfg.ct_window} W{ww:g}/L{c:g} HU"
    else:
        normalization = f"percentile clip p{cfg.mr_percentiles[0]:g}-p{cfg.mr_percentiles[1]:g} per volume"

    kept_images: list[np.ndarray] = []
    kept_index: list[int] = []
    kept_classes: list[str] = []
    # Stage 2: intensities to [-1, 1], display orientation, padding and selection, a chunk of slices at a time.
    with torch.inference_mode():
        for start in range(0, n, CHUNK_SLICES):
            chunk = resized[start : start + CHUNK_SLICES]  # [k, 1, h, w]
            if volume.scaled:  # to physical units (HU for CT), on 16x fewer pixels than the stored slices
                chunk = chunk * volume.slope + volume.intercept
            chunk = window_to_unit(chunk, *win) if win is not None else range_to_unit(chunk, lo, hi)
            chunk = chunk.flip(dims=flips) if flips else chunk
            out = pad_square(chunk, res, -1.0)  # [k, 1, R, R], display orientation
            fg = (out > cfg.foreground_level).sum(dim=(1, 2, 3)) / float(res * res)
            keep = (fg >= cfg.min_foreground_fraction).tolist()
            classes: list[str | None] = [None] * len(keep)
            if mstack is not None:
                m = _tensor(mstack[start : start + CHUNK_SLICES])
                m = resize(m.unsqueeze(1), (h, w), "nearest").flip(dims=(2, 3))
                m = pad_square(m, res, 0.0).round().to(torch.int32)
                classes = mask_classes(m, cfg)
                keep = [k and c is not None for k, c in zip(keep, classes, strict=True)]
            idx = [i for i, k in enumerate(keep) if k]
            if idx:
                kept = out if len(idx) == len(out) else out[idx]  # no gather copy when every slice is kept
                kept_images.append(kept.to(torch.float16).numpy())
                kept_index.extend(start + i for i in idx)
                kept_classes.extend(str(classes[i]) for i in idx)
    images = np.concatenate(kept_images) if kept_images else np.zeros((0, 1, res, res), np.float16)
    return Slices(
        images=images,
        slice_index=kept_index,
        position_mm=[float(positions[i]) for i in kept_index],
        spacing_mm=float(px),
        classes=kept_classes if mask is not None else None,
        normalization=normalization,
        n_total=n,
    )


def normalize_image2d(image: np.ndarray, cfg: IngestConfig) -> tuple[np.ndarray, float]:
    """A 2-D grey image [rows, cols] -> float16 [1, 1, R, R] in [-1, 1] and its foreground fraction.

    Intensities: ``cfg.image_normalization`` = ``minmax`` (the image's min..max) or ``percentile``
    (``cfg.mr_percentiles``); the aspect ratio is kept by padding with -1 to a square.
    """
    res = int(cfg.resolution)
    x = _tensor(image)[None, None]
    with torch.inference_mode():
        h, w, _ = fit_size(image.shape[0], image.shape[1], 1.0, 1.0, res)
        x = resize(x, (h, w))
        # Intensity range from the resized image, so min-max output spans exactly [-1, 1].
        if cfg.image_normalization == "percentile":
            lo, hi = percentile_range(x.numpy(), cfg.mr_percentiles)
        elif cfg.image_normalization == "minmax":
            lo, hi = float(x.min()), float(x.max())
        else:
            raise ValueError(f"ingest.image_normalization={cfg.image_normalization!r}; use minmax or percentile")
        out = pad_square(range_to_unit(x, lo, hi), res, -1.0)
        fg = float((out > cfg.foreground_level).float().mean())
    return out.to(torch.float16).numpy(), fg
