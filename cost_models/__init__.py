"""Hardware profiles and cost estimates of the kernels sparsec emits."""
