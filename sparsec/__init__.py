"""sparsec: a sparsity compiler for PyTorch.

    import sparsec
    from sparsec import patterns as P
    out = sparsec.attention(q, k, v, [P.Window(64, 0), P.Dense(), ...], causal=True)
    compiled = torch.compile(model, backend="sparsec")
"""
from sparsec import patterns
from sparsec.attention_dispatch import attention
from sparsec.patterns import Pattern
from sparsec.pruning import prune

__all__ = ["attention", "patterns", "Pattern", "prune"]
__version__ = "0.1.0"
