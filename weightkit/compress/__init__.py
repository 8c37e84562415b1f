"""Post-training weight compression: calibration-guided dictionary learning and SVD baselines."""

from .dictionary import CompressionReport, compress, dictionary, svd  # noqa: E402

__all__ = ["dictionary", "svd", "compress", "CompressionReport"]
