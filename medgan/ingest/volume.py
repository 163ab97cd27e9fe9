"""Volume: what every reader hands to normalization (voxels in canonical anatomy, value scaling, geometry, keys)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np


def physical(data: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    """float32 ``data * slope + intercept``, scaled in float64 like nibabel's ``get_fdata`` (no copy when `data` is
    already float32 and unscaled)."""
    if slope == 1.0 and intercept == 0.0:
        return data if data.dtype == np.float32 else data.astype(np.float32)
    return (data.astype(np.float64) * slope + intercept).astype(np.float32)


@dataclass
class Volume:
    """One image volume after reading, before normalization.

    Readers keep the stored values when one linear map turns all of them into physical units (the usual CT series:
    int16 with one RescaleSlope/Intercept; a NIfTI with scl_slope/scl_inter): ``data`` is then the stored array and
    normalization applies ``slope``/``intercept`` chunk by chunk, so a float32 copy of the whole volume is never made.
    ``array`` gives the float32 physical values whenever a caller wants them whole.

    Attributes:
        data: [X, Y, Z] voxels (any real dtype), physical value = ``data * slope + intercept``, in canonical RAS+
            orientation (nibabel's ``as_closest_canonical``): index along axis 0 increases toward the patient's Right,
            axis 1 toward Anterior, axis 2 toward Superior. A 2-D image without patient geometry (radiograph, secondary
            capture, PNG) is [columns, rows, 1] with both axes reversed relative to storage order, so the normalizer's
            display flip (the one that turns an axial RAS slice into radiological view) shows it exactly as stored.
        spacing_mm: voxel size along the three array axes.
        modality: "CT", "MR", "XR", ... ("OT" when unknown).
        patient: keyed pseudonym of the patient (never a clear identifier).
        volume: keyed pseudonym of the series/volume.
        positions_mm: position of each slice along axis 2 (mm), for the slice table.
        notes: human-readable remarks (gaps, duplicates dropped, frames used) for the ingest report.
        slope, intercept: the linear map from ``data`` to physical units (HU for CT).
    """

    data: np.ndarray
    spacing_mm: tuple[float, float, float]
    modality: str = "OT"
    patient: str = ""
    volume: str = ""
    positions_mm: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    slope: float = 1.0
    intercept: float = 0.0

    def __post_init__(self) -> None:
        if self.data.ndim != 3:
            raise ValueError(f"Volume array must be 3-D [X, Y, Z], got shape {self.data.shape}")
        if len(self.spacing_mm) != 3:
            raise ValueError(f"spacing_mm must have 3 values, got {self.spacing_mm}")

    @property
    def scaled(self) -> bool:
        """True when ``data`` holds stored values that still need ``slope``/``intercept``."""
        return self.slope != 1.0 or self.intercept != 0.0

    @property
    def shape(self) -> tuple[int, int, int]:
        """[X, Y, Z] (canonical)."""
        return self.data.shape  # type: ignore[return-value]

    @functools.cached_property
    def array(self) -> np.ndarray:
        """float32 [X, Y, Z] physical values (`physical`, computed once)."""
        return physical(self.data, self.slope, self.intercept)
