"""Drop-in replacements for nn.Linear. Each provides ``from_linear(linear, **opts)``, used by weightkit.swap."""

from .dictionary import DictLinear
from .int8 import Int8Linear, Int8Weight
from .memoryformer import MemoryFFN, MemoryFormerBlock, MemoryLinear, MemoryQKV
from .swap import SwapReport, swap

__all__ = ["DictLinear", "Int8Linear", "Int8Weight", "MemoryLinear", "MemoryQKV", "MemoryFFN", "MemoryFormerBlock", "swap",
           "SwapReport"]
