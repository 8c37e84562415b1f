"""weightkit: kernels for memory-efficient training and compression of LLM weights."""

__version__ = "0.1.0"

from . import backend, ops  # noqa: E402
from .backend import use_backend  # noqa: E402
from .nn.swap import swap  # noqa: E402
from .ops._checks import debug_checks, set_debug_checks  # noqa: E402

__all__ = ["backend", "ops", "use_backend", "swap", "debug_checks", "set_debug_checks", "__version__"]
