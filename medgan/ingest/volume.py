"""Volume: what every reader hands to normalization (a float32 array in canonical anatomy plus geometry and keys)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Volume:
    """One image volume after reading, before normalization.

    Attributes:
        array: float32 [X, Y, Z] in physical units (HU for CT after the modality LUT), in canonical RAS+ orientation
            (nibabel's ``as_closest_canonical``): index along axis 0 increases toward the patient's Right, axis 1 toward
            Anterior, axis 2 toward Superior. A 2-D image without patient geometry (radiograph, secondary capture,
            PNG) is [columns, rows, 1] with both axes reversed relative to storage order, so the normalizer's display
            flip (the one that turns an axial RAS slice into radiological view) shows it exactly as stored.
        spacing_mm: voxel size along the three array axes.
        modality: "CT", "MR", "XR", ... ("OT" when unknown).
        patient: keyed pseudonym of the patient (never a clear identifier).
        volume: keyed pseudonym of the series/volume.
        positions_mm: position of each slice along axis 2 (mm), for the slice table.
        notes: human-readable remarks (gaps, duplicates dropped, frames used) for the ingest report.
    """

    array: np.ndarray
    spacing_mm: tuple[float, float, float]
    modality: str = "OT"
    patient: str = ""
    volume: str = ""
    positions_mm: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"Volume array must be 3-D [X, Y, Z], got shape {self.array.shape}")
        if len(self.spacing_mm) != 3:
            raise ValueError(f"spacing_mm must have 3 values, got {self.spacing_mm}")
