"""Weight sparsity through backend="sparsec": models pruned with sparsec.prune (2:4, blocks,
scattered) compiled with weight_sparsity "always" / "auto" / "off" give the float64 result of
their current weights, and the sparse kernels really run (linear_dispatch.kernel_calls counts
the executors). Also: the IR dumps show the encodings and the choice, in-place weight changes
after compiling (re-pack, or dense once the structure is gone), "auto" against the cost model at
static and symbolic token counts, and the Triton kernels under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import functools
import gc
import weakref

import pytest
import torch
from torch import nn

import sparsec
from sparsec import linear_dispatch
from sparsec.backend import sparsec_backend
from sparsec.codegen.linear_cpu_native import native_linear_available
from sparsec.config import parse_options
from sparsec.cost_models import estimate_linear_seconds
from sparsec.dump import recording
from sparsec.explain import explain
from sparsec.ir.ops import Linear
from sparsec.ir.types import DENSE, BlockSparse, NMSparse, Unstructured
from sparsec.passes.choose_linear_kernels import SPARSE_MARGIN

SPECS = {"2:4": "2:4", "block32": {"block": (32, 32), "density": 0.5}, "scattered": {"density": 0.3}}
EXECUTOR = {"2:4": "nm_linear_cpu", "block32": "bsr_linear_cpu", "scattered": "unstructured_linear_cpu"}


class MLP(nn.Module):
    def __init__(self, features: int = 128, hidden: int = 64, bias: bool = True):
        super().__init__()
        self.up = nn.Linear(features, hidden, bias=bias)
        self.down = nn.Linear(hidden, features, bias=bias)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def reference(model: MLP, x: torch.Tensor) -> torch.Tensor:
    """float64, from the model's current weights."""
    def layer(linear, h):
        y = h @ linear.weight.double().T
        return y + linear.bias.double() if linear.bias is not None else y

    return layer(model.down, torch.relu(layer(model.up, x.double())))


def check(got, model, x):
    torch.testing.assert_close(got.double(), reference(model, x), atol=1e-4, rtol=1e-4)


def pruned(spec: str, bias: bool = True, **sizes) -> MLP:
    return sparsec.prune(MLP(bias=bias, **sizes).eval(), SPECS[spec])


def compiled(model, dynamic=None, **options):
    options = {"inner": "eager", "fallback": "raise", "verify": True, "weight_sparsity": "always", **options}
    return torch.compile(model, backend=functools.partial(sparsec_backend, options=options), dynamic=dynamic)


def sparse_calls() -> int:
    return sum(n for name, n in linear_dispatch.kernel_calls.items() if name != "dense")


@pytest.fixture(autouse=True)
def fresh():
    torch._dynamo.reset()  # the same MLP code compiled by an earlier test would be reused
    linear_dispatch.kernel_calls.clear()
    torch.manual_seed(0)


@pytest.mark.parametrize("spec, bias, shape", [
    ("2:4", True, (2, 3, 128)), ("block32", False, (5, 128)), ("scattered", True, (2, 3, 128)),
])
def test_always_runs_the_sparse_kernel_and_gives_the_reference(spec, bias, shape):
    model, x = pruned(spec, bias), torch.randn(shape)
    with torch.no_grad(), recording() as records:
        check(compiled(model)(x), model, x)
    record = records[0]
    layers = (model.up, model.down)
    for op, layer in zip(record.stage("analyze_weights").ops_of(Linear), layers):
        assert_exact_encoding(op.weight.type.sparsity, layer.weight, spec)
    kernels = [op.kernel for op in record.final_ir.ops_of(Linear)]
    assert kernels == [kernel_for(op.weight.type.sparsity) for op in record.final_ir.ops_of(Linear)]
    if spec == "scattered" and not native_linear_available():  # only the native kernels skip scattered zeros
        assert kernels == ["dense", "dense"] and sparse_calls() == 0
    else:
        assert linear_dispatch.kernel_calls == {EXECUTOR[spec]: 2}
        assert all(record.rewritten_code.count(f"'{k}'") for k in kernels)


def kernel_for(encoding) -> str:
    if isinstance(encoding, BlockSparse):
        return f"bsr{encoding.block[0]}x{encoding.block[1]}"
    if isinstance(encoding, Unstructured) and native_linear_available():
        return "unstructured"
    return f"nm{encoding.n}:{encoding.m}" if isinstance(encoding, NMSparse) else "dense"


def assert_exact_encoding(encoding, weight, spec):
    """What the pruning made, checked on the weight itself."""
    nonzero = weight.detach() != 0
    if spec == "2:4":
        assert encoding == NMSparse(n=2, m=4, density=0.5)
    elif spec == "scattered":
        assert encoding == Unstructured(density=nonzero.float().mean().item())
    else:  # 32x32 blocks, half kept; a larger block may describe the same zeros (ties: the larger)
        (bo, bi), (N, K) = encoding.block, weight.shape
        assert isinstance(encoding, BlockSparse) and bo % 32 == 0 and bi % 32 == 0
        kept = nonzero.view(N // bo, bo, K // bi, bi).any(dim=3).any(dim=1)
        assert encoding.density == kept.float().mean().item() == 0.5


def test_dumps_and_explain_show_the_encoding_and_the_choice(tmp_path):
    model, x = pruned("block32"), torch.randn(4, 128)
    report = explain(model, x, options={"inner": "eager", "weight_sparsity": "always", "dump_dir": str(tmp_path)})
    text = str(report)
    up = report.graphs[0].final_ir.ops_of(Linear)[0]
    encoding, kernel = up.weight.type.sparsity, up.kernel
    assert kernel == kernel_for(encoding) != "dense"
    block = f"<block {encoding.block[0]}x{encoding.block[1]} density=0.5>"
    assert f"linear up: weight f32[64, 128]{block}, kernel {kernel}\n" in text
    assert f'{{kernel = "{kernel}", module = "up"}}' in text
    (folder,) = tmp_path.iterdir()
    analyzed = (folder / "4_ir_analyze_weights.txt").read_text()
    assert f'{block} = param "up.weight"' in analyzed and "kernel" not in analyzed
    assert f'kernel = "{kernel}"' in (folder / "5_ir_choose_linear_kernels.txt").read_text()


@pytest.mark.parametrize("spec, inner", [("2:4", "eager"), ("block32", "eager"), ("block32", "inductor"),
                                         ("scattered", "eager")])
def test_weights_changed_in_place_after_compiling(spec, inner):
    if spec == "scattered" and not native_linear_available():
        pytest.skip("scattered zeros run on the native kernels only")
    model, x = pruned(spec), torch.randn(2, 3, 128)
    run = compiled(model, inner=inner)
    executor = EXECUTOR[spec]
    with torch.no_grad():
        check(run(x), model, x)
        assert linear_dispatch.kernel_calls == {executor: 2}
        model.up.weight.mul_(-1.5)  # the same zeros: re-packed, still sparse
        check(run(x), model, x)
        assert linear_dispatch.kernel_calls == {executor: 4}
        structured = model.up.weight.clone()
        model.up.weight.copy_(torch.randn(64, 128))  # no structure left: dense for this layer
        check(run(x), model, x)
        assert linear_dispatch.kernel_calls == {executor: 5, "dense": 1}
        model.up.weight.copy_(structured)  # structured again: sparse again
        check(run(x), model, x)
        assert linear_dispatch.kernel_calls == {executor: 7, "dense": 1}


@pytest.mark.parametrize("spec, inner", [("2:4", "eager"), ("block32", "inductor")])
def test_packs_live_as_long_as_their_weights(spec, inner):
    gc.collect()
    before = linear_dispatch.packed_weight_count()
    model, x = pruned(spec), torch.randn(2, 3, 128)
    with torch.no_grad():
        check(compiled(model, inner=inner)(x), model, x)
        torch._dynamo.reset()  # a recompiled model: new sites, the same weights and packs
        check(compiled(model, inner=inner)(x), model, x)
    assert sparse_calls() == 4
    packs = [packed for layer in (model.up, model.down)
             for packed in linear_dispatch.packed_weights(layer.weight).values()]
    assert [packed.packs for packed in packs] == [1, 1]
    assert linear_dispatch.packed_weight_count() == before + 2
    packs, model = [weakref.ref(packed) for packed in packs], None
    torch._dynamo.reset()  # and whatever compiled graphs Dynamo still caches
    gc.collect()
    assert [packed() for packed in packs] == [None, None]
    assert linear_dispatch.packed_weight_count() == before


def test_off_never_runs_a_sparse_kernel():
    model, x = pruned("2:4"), torch.randn(2, 3, 128)
    with torch.no_grad(), recording() as records:
        check(compiled(model, weight_sparsity="off")(x), model, x)
    assert sparse_calls() == 0
    ir = records[0].final_ir
    assert all(op.kernel == "dense" and not op.weight.type.is_dense for op in ir.ops_of(Linear))
    assert "'nm2:4'" not in records[0].rewritten_code


def _priced(encoding):
    """The encoding the kernel is priced at: an N:M kernel reads n/m of the weight."""
    if isinstance(encoding, NMSparse):
        return NMSparse(n=encoding.n, m=encoding.m, density=encoding.n / encoding.m)
    return encoding


@pytest.mark.parametrize("spec, tokens", [("2:4", 6), ("block32", 6), ("block32", 96), ("scattered", 2),
                                          ("scattered", 300)])
def test_auto_follows_the_cost_model(spec, tokens):
    model, x = pruned(spec), torch.randn(tokens, 128)
    with torch.no_grad(), recording() as records:
        check(compiled(model, weight_sparsity="auto")(x), model, x)
    hardware = parse_options({}).hardware()  # this machine
    chosen = 0
    for op in records[0].final_ir.ops_of(Linear):
        (N, K), sparsity = op.weight.type.shape, _priced(op.weight.type.sparsity)
        sparse = estimate_linear_seconds(tokens, N, K, "f32", sparsity, hardware, bias=True)
        dense = estimate_linear_seconds(tokens, N, K, "f32", DENSE, hardware, bias=True)
        assert (op.kernel != "dense") == (sparse < (1 - SPARSE_MARGIN) * dense)
        assert op.kernel in (kernel_for(op.weight.type.sparsity), "dense")
        chosen += op.kernel != "dense"
    assert sparse_calls() == chosen


def test_auto_with_dynamic_shapes_dispatches_by_the_crossover():
    # 16x16 tiles: a finite crossover (1024 x 1024: large enough to win by SPARSE_MARGIN at a few tokens)
    model = sparsec.prune(MLP(features=1024, hidden=1024).eval(), {"block": 16, "density": 0.5})
    run = compiled(model, dynamic=True, weight_sparsity="auto", target="h100")
    small, large = torch.randn(2, 3, 1024), torch.randn(4, 64, 1024)  # (no size 1 or equal sizes: specialized)
    with torch.no_grad(), recording() as records:
        check(run(small), model, x=small)
        assert linear_dispatch.kernel_calls == {"bsr_linear_cpu": 2}
        check(run(large), model, x=large)
        assert linear_dispatch.kernel_calls == {"bsr_linear_cpu": 2, "dense": 2}
    assert len(records) == 1  # one graph, symbolic token count
    hardware = parse_options({"target": "h100"}).hardware()
    for op in records[0].final_ir.ops_of(Linear):
        assert isinstance(op.x.type.shape[0], str) and op.kernel == "bsr16x16" and op.min_tokens == 0
        (N, K), enc = op.weight.type.shape, op.weight.type.sparsity

        def wins(t):
            return (estimate_linear_seconds(t, N, K, "f32", enc, hardware, bias=True)
                    < (1 - SPARSE_MARGIN) * estimate_linear_seconds(t, N, K, "f32", DENSE, hardware, bias=True))

        assert 4 <= op.max_tokens < 256 and wins(op.max_tokens) and not wins(op.max_tokens + 1)


@pytest.mark.triton
def test_triton_kernels_run_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("SPARSEC_LINEAR_BACKEND", "triton")
    model = MLP(features=32, hidden=32).eval()
    sparsec.prune(model, {"block": 16, "density": 0.5}, filter=lambda name, _: name == "up")
    sparsec.prune(model, "2:4", filter=lambda name, _: name == "down")
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        check(compiled(model)(x), model, x)
    assert linear_dispatch.kernel_calls == {"bsr_linear_triton": 1, "nm_linear_triton": 1}


def test_grad_mode_runs_sparse_forward_and_dense_backward():
    model, x = pruned("2:4"), torch.randn(2, 3, 128, requires_grad=True)
    got = compiled(model)(x)
    check(got, model, x)
    grad_out = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, [x, model.up.weight], grad_out)
    x64, w64 = x.detach().double().requires_grad_(), model.up.weight.detach().double().requires_grad_()
    h = torch.relu(x64 @ w64.T + model.up.bias.double())
    y = h @ model.down.weight.double().T + model.down.bias.double()
    want = torch.autograd.grad(y, [x64, w64], grad_out.double())
    for g, w in zip(got_grads, want):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)
    assert linear_dispatch.kernel_calls["nm_linear_cpu"] == 2


def test_the_op_dispatches_by_token_range_and_repacks_on_change():
    x_rows = {t: torch.randn(t, 64) for t in (1, 3, 5)}
    weight = sparsec.prune(nn.Linear(64, 32), "2:4").weight.detach().clone()
    bias = torch.randn(32)
    for tokens, expected in ((1, "dense"), (3, "nm_linear_cpu"), (5, "dense")):
        linear_dispatch.kernel_calls.clear()
        y = torch.ops.sparsec.linear(x_rows[tokens], weight, bias, "nm2:4", 2, 4, "unit-site")
        torch.testing.assert_close(y.double(), x_rows[tokens].double() @ weight.double().T + bias.double(),
                                   atol=1e-5, rtol=1e-5)
        assert linear_dispatch.kernel_calls == {expected: 1}
    weight.mul_(3.0)
    y = torch.ops.sparsec.linear(x_rows[3], weight, bias, "nm2:4", 2, 4, "unit-site")
    torch.testing.assert_close(y.double(), x_rows[3].double() @ weight.double().T + bias.double(),
                               atol=1e-5, rtol=1e-5)
    packed = linear_dispatch.packed_weights(weight)[("nm2:4", "cpu")]
    assert packed.packs == 2
    packed, weight = weakref.ref(packed), None
    gc.collect()
    assert packed() is None  # the pack went with its weight


def test_the_op_keeps_its_fake_implementation_and_autograd():
    weight = sparsec.prune(nn.Linear(64, 32), {"block": 16, "density": 0.5}).weight.detach().clone()
    args = (torch.randn(3, 64, requires_grad=True), weight.requires_grad_(), torch.randn(32, requires_grad=True),
            "bsr16x16", 0, None, "opcheck-site")
    torch.library.opcheck(torch.ops.sparsec.linear.default, args)
