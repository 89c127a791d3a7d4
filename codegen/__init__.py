"""Kernel generation (Triton) and CPU executors."""
