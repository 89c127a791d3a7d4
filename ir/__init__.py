"""sparsec's sparsity-annotated IR: types, ops, graph, printer and parser, verifier."""
