"""sparsec: a sparsity compiler for PyTorch.

    import sparsec
    from sparsec import patterns as P
    out = sparsec.attention(q, k, v, [P.Window(64, 0), P.Dense(), ...], causal=True)
    compiled = torch.compile(model, backend="sparsec")
    plan = sparsec.tune(model, example_inputs, target="h100", budget=0.02)
    compiled = torch.compile(model, backend="sparsec", options={"plan": plan})
    print(sparsec.explain(model, *example_inputs))
"""
from sparsec import patterns
from sparsec.attention_dispatch import attention
from sparsec.explain import explain
from sparsec.model_tuning import tune
from sparsec.patterns import Pattern
from sparsec.plan import Plan
from sparsec.pruning import prune

__all__ = ["attention", "explain", "patterns", "Pattern", "Plan", "prune", "tune"]
__version__ = "0.1.0"
