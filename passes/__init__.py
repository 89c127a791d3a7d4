"""Compiler passes, one a file: FX -> IR lowering, analyses, IR -> FX rewrite."""
