"""Small models bundled with sparsec for the demo and examples (random weights, CPU-sized)."""
from sparsec.models.tiny_dit import TinyDiT, TinyDiTConfig, tiny_dit

__all__ = ["TinyDiT", "TinyDiTConfig", "tiny_dit"]
