"""weightkit: kernels for memory-efficient training and compression of LLM weights."""

from . import backend, ops
from .backend import use_backend
from .nn.swap import swap
from .ops._checks import debug_checks, set_debug_checks

__version__ = "0.1.0"

__all__ = ["backend", "ops", "use_backend", "swap", "debug_checks", "set_debug_checks", "__version__"]
