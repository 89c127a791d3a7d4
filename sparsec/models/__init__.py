"""Small models bundled with sparsec for the demo and examples (random weights, CPU-sized)."""
from sparsec.models.tiny_dit import TinyDiT, TinyDiTConfig, example_inputs, positional_dit, tiny_dit, with_roles

__all__ = ["TinyDiT", "TinyDiTConfig", "example_inputs", "positional_dit", "tiny_dit", "with_roles"]
