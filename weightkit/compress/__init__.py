"""Post-training weight compression: calibration-guided dictionary learning and SVD baselines."""

from .common import CompressionReport, LayerReport, compress  # noqa: E402
from .dictionary import dictionary  # noqa: E402  (the function shadows the submodule's name on the package)
from .svd import svd  # noqa: E402

__all__ = ["dictionary", "svd", "compress", "CompressionReport", "LayerReport"]
