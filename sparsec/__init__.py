"""sparsec: a sparsity compiler for PyTorch."""
from sparsec import patterns
from sparsec.patterns import Pattern

__all__ = ["patterns", "Pattern"]
__version__ = "0.1.0"
