"""Training: the loop, losses, augmentation, checkpoints, device/DDP setup and the health watch."""
