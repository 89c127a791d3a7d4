"""Test setup: without a GPU, Triton kernels run through Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, so this happens at conftest load.
"""
import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("SPARSEC_VERIFY", "1")  # verify the IR after every pass in tests
# Never the user's stored profiles or kernels: a calibrated "cpu" profile would change the
# executor's choices (codegen.attention_cpu_choice prices them with it) and the tests' estimates.
os.environ["SPARSEC_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparsec-tests-")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module's tests (pytestmark = pytest.mark.usefixtures("one_thread")):
    the test machine's cores are shared, and torch's thread pool spins and slows small ops 100x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def torch_kernel_only(monkeypatch):
    """The CPU executor without its native interval kernel (SPARSEC_CPU_NATIVE=0): for tests of
    the choices among torch SDPA plans (block size, parts, frame order)."""
    monkeypatch.setenv("SPARSEC_CPU_NATIVE", "0")


def _interpreter_incompatibility() -> str | None:
    """Why the `triton` tests cannot run here, or None.

    They build CPU tensors and run the kernels through Triton's interpreter, which is only set up
    without a GPU (above): on a CUDA machine bench/cuda_check.py checks the compiled kernels.

    Triton 3.6's interpreter turns loop bounds computed from loaded scalars into Python ints with
    int(ndarray of shape (1,)), which numpy >= 2.3 refuses ("only 0-dimensional arrays can be
    converted to Python scalars"); compiled kernels on a GPU are not affected."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return ("the triton tests run CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set "
                "only without a GPU); on a GPU, bench/cuda_check.py checks the compiled kernels")
    import numpy
    import triton

    def version(text: str) -> tuple[int, ...]:
        return tuple(int(part) for part in text.split("+")[0].split(".")[:2])

    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 3):
        return (f"Triton {triton.__version__}'s interpreter cannot run these kernels with numpy "
                f"{numpy.__version__} (needs numpy < 2.3)")
    return None


def pytest_collection_modifyitems(config, items):
    reason = _interpreter_incompatibility()
    if reason is None:
        return
    for item in items:
        if "triton" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(params=["one block", "a row a block"])
def grad_blocks(request, monkeypatch):
    """The attention backward over all query rows at once (small tests' default) or one row a
    block (sparsec.attention_grads.ROWS_ELEMENTS), where each block gathers its own keys."""
    if request.param == "a row a block":
        monkeypatch.setattr("sparsec.attention_grads.ROWS_ELEMENTS", 1)
    return request.param
