"""Test setup: without a GPU, Triton kernels run through Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, so this happens at conftest load.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("SPARSEC_VERIFY", "1")  # verify the IR after every pass in tests
