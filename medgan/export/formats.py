"""Image file formats of an export: one encoder per format (image in [-1, 1] -> bytes) and the matching reader.

Intensity mappings (all linear, documented in every export's README and ``dataset.json``):

- ``png`` 8-bit: ``q = round((x + 1) * 127.5)`` in 0..255, back ``x = q / 127.5 - 1`` (error <= 0.5 / 127.5).
- ``png`` 16-bit: ``q = round((x + 1) * 32767.5)`` in 0..65535, back ``x = q / 32767.5 - 1`` (error <= 0.5 / 32767.5).
- ``npy``: 2-D float32 [128, 128] in [-1, 1], exact; element [i, j] = pixel (row j, column i), the x-first order in
  which MONAI's readers give PNG, NIfTI and DICOM, so ``LoadImage`` gives the same array for all four formats.
- ``nifti``: 2-D float32 in [-1, 1], exact; voxel [i, j] = pixel (row j, column i) (the NIfTI/MONAI x-first order,
  so MONAI loads a NIfTI and a PNG of the same image as the same array); affine ``diag(-s, -s, s, 1)``: columns run
  toward patient left and rows toward posterior (the usual radiological axial display, LPS-aligned like DICOM's
  ImageOrientationPatient ``1\\0\\0\\0\\1\\0``), ``s`` the in-plane spacing in mm.
- ``dicom``: unsigned 16-bit stored values as in 16-bit PNG, with RescaleSlope ``1 / 32767.5`` and RescaleIntercept
  ``-1`` so the modality LUT gives back [-1, 1] (see `medgan.export.dicom`).

Every encoder is deterministic: the same pixels give the same bytes (gzip without a timestamp, no dates in headers).
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np

from medgan.viz import to_uint8

FORMATS = ("png", "npy", "nifti", "dicom")
EXTENSIONS = {"png": "png", "npy": "npy", "nifti": "nii.gz", "dicom": "dcm"}
# Largest round-trip error of each encoding for values in [-1, 1] (half a quantization step; 0 = exact).
QUANTIZATION = {"png8": 0.5 / 127.5, "png16": 0.5 / 32767.5, "npy": 0.0, "nifti": 0.0, "dicom": 0.5 / 32767.5}


def _plane(image: np.ndarray) -> np.ndarray:
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 2:
        raise ValueError(f"expected one image [1, H, W] or [H, W], got shape {tuple(np.shape(image))}")
    return x


def to_uint16(image: np.ndarray) -> np.ndarray:
    """Map values in [-1, 1] to 0..65535 (clipped): the 16-bit PNG and DICOM mapping."""
    return np.clip(np.rint((np.asarray(image, dtype=np.float32) + 1.0) * 32767.5), 0, 65535).astype(np.uint16)


def png_bytes(image: np.ndarray, bits: int = 8) -> bytes:
    """A grayscale PNG (8- or 16-bit) of one image in [-1, 1]."""
    from PIL import Image

    x = _plane(image)
    if bits == 8:
        pil = Image.fromarray(to_uint8(x), mode=None)
    elif bits == 16:
        pil = Image.fromarray(to_uint16(x))  # mode "I;16": a 16-bit grayscale PNG
    else:
        raise ValueError(f"png bits must be 8 or 16, got {bits}")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def npy_bytes(image: np.ndarray) -> bytes:
    """A ``.npy`` file holding float32 [W, H] in [-1, 1]: x first, as MONAI reads the other formats."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(_plane(image).T), allow_pickle=False)  # [i = column, j = row]
    return buf.getvalue()


def nifti_affine(spacing_mm: float) -> np.ndarray:
    """The export's NIfTI affine: columns toward patient left, rows toward posterior, `spacing_mm` per pixel."""
    return np.diag([-spacing_mm, -spacing_mm, spacing_mm, 1.0])


def nifti_bytes(image: np.ndarray, spacing_mm: float = 1.0, description: str = "SYNTHETIC medgan") -> bytes:
    """A gzipped 2-D NIfTI-1 (float32, exact) with the affine of `nifti_affine` and `description` in ``descrip``."""
    import nibabel as nib

    data = np.ascontiguousarray(_plane(image).T)  # [i = column, j = row]
    affine = nifti_affine(float(spacing_mm))
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=2)  # 2 = aligned to an anatomical truth (no scanner: the image is synthetic)
    img.header.set_sform(affine, code=2)
    img.header["descrip"] = description.encode("ascii", "replace")[:79]
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def encode(fmt: str, image: np.ndarray, *, png_bits: int = 8, spacing_mm: float = 1.0) -> bytes:
    """Encode one image for the non-DICOM formats (DICOM needs series context: `medgan.export.dicom`)."""
    if fmt == "png":
        return png_bytes(image, png_bits)
    if fmt == "npy":
        return npy_bytes(image)
    if fmt == "nifti":
        return nifti_bytes(image, spacing_mm)
    raise ValueError(f"format {fmt!r} is not one of {FORMATS[:3]} (DICOM is encoded by medgan.export.dicom)")


def read_image(path: str | Path) -> np.ndarray:
    """Read one exported image back to float32 [1, H, W] in [-1, 1] (inverse of the mappings above).

    Args:
        path: a ``.png``, ``.npy``, ``.nii.gz`` or ``.dcm`` file written by ``medgan export``.

    Returns:
        float32 [1, H, W], within `QUANTIZATION` of the exported values.

    Raises:
        ValueError: the extension is not one of an export's, or a PNG has an unexpected mode.

    Example:
        >>> x = read_image("synthetic/demo/images/tumor/00000.png")   # (1, 128, 128)
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".png"):
        from PIL import Image

        with Image.open(path) as pil:
            mode, q = pil.mode, np.asarray(pil)
        if mode == "L":
            x = q.astype(np.float32) / 127.5 - 1.0
        elif mode.startswith("I"):
            x = q.astype(np.float32) / 32767.5 - 1.0
        else:
            raise ValueError(f"{path}: PNG mode {mode!r}; medgan exports 8-bit (L) or 16-bit (I;16) grayscale")
    elif name.endswith(".npy"):
        x = np.load(path, allow_pickle=False).astype(np.float32).T  # back to [row, column]
    elif name.endswith((".nii.gz", ".nii")):
        import nibabel as nib

        x = np.asarray(nib.load(path).get_fdata(dtype=np.float32)).T  # back to [row, column]
    elif name.endswith(".dcm"):
        import pydicom
        from pydicom.pixels import apply_modality_lut

        ds = pydicom.dcmread(path)
        x = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
    else:
        raise ValueError(f"{path}: unknown extension; expected one of {sorted(EXTENSIONS.values())}")
    x = np.asarray(x, dtype=np.float32)
    return x if x.ndim == 3 else x[None]
