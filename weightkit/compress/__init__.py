"""Post-training weight compression: calibration-guided dictionary learning and SVD baselines."""

__all__ = []
