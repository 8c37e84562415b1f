"""Post-training weight compression: calibration-guided dictionary learning and SVD baselines."""

from .common import CompressionReport, LayerReport
from .dictionary import dictionary  # the function shadows the submodule's name on the package
from .methods import compress
from .svd import svd

__all__ = ["dictionary", "svd", "compress", "CompressionReport", "LayerReport"]
