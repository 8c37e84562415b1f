"""weightkit: kernels for memory-efficient training and compression of LLM weights."""

__version__ = "0.1.0"

from . import backend, ops  # noqa: E402
from .backend import use_backend  # noqa: E402
from .nn.swap import swap  # noqa: E402

__all__ = ["backend", "ops", "use_backend", "swap", "__version__"]
