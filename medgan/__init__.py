"""medgan: class-conditional GANs for 128x128 medical image slices."""

__version__ = "0.1.0"
