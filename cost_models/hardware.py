"""Hardware profiles: the figures of a device that decide what a kernel costs.

Peak figures are the vendors' published dense numbers (no 2:4 sparsity doubling). The
`efficiency` fields say which fraction of a peak a good kernel reaches in practice; they start at
values from published measurements (FlashAttention-2/3 and the Triton tutorial on H100 reach
~47-60% of the bf16 tensor peak in attention forward) and are what measured autotuning refits
(cost_models/calibration.py stores the refit profile per device name).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["EXECUTORS", "HardwareProfile", "PROFILES", "get_profile", "profile_for_device"]

log = logging.getLogger(__name__)

EXECUTORS = ("triton", "cpu")  # the attention kernels a profile can price


@dataclass(frozen=True, slots=True, kw_only=True)
class HardwareProfile:
    name: str
    sm_count: int                       # streaming multiprocessors (cores for "cpu")
    tensor_flops: dict[str, float]      # dense matmul FLOP/s by dtype name ("bf16", "f16", "f32")
    vector_flops: float                 # non-matmul fp32 FLOP/s (softmax, masking arithmetic)
    exp_per_s: float                    # exponentials per second (SFU / MUFU throughput)
    memory_bandwidth: float             # bytes/s of main memory (HBM or DRAM)
    shared_memory_per_sm: int           # bytes
    l2_bytes: int
    launch_overhead_s: float            # host + device cost of one kernel launch
    programs_per_sm: int = 1            # attention programs resident per SM at the default tiles
    matmul_efficiency: float = 0.5      # fraction of tensor_flops reached by attention/GEMM inner loops
    memory_efficiency: float = 0.8      # fraction of memory_bandwidth reached by streaming loads
    mask_cost_per_pair: float = 6.0     # vector FLOPs spent per masked (i, j) element of a partial block
    block_overhead_s: float = 0.0       # Triton: fixed cost per visited key block of a program
    # Which kernels the profile prices (attention_cost): "triton" (key tiles, partial tiles masked)
    # or "cpu" (codegen/attention_cpu.py: a query block's exact keys, as SDPA calls).
    executor: str = "triton"
    call_overhead_s: float = 0.0        # cpu: fixed cost of one SDPA call of the executor's plan
    gather_bytes_per_s: float = 2.5e9   # cpu: speed of copying gathered K/V rows (one thread)
    # cpu: what a query row costs a call beyond its pairs, on one core (the fused kernel's softmax
    # finish and output row): ~200 ns of the 2-core machine's time, as much as ~40 pairs at D = 64,
    # which is what narrow patterns (a few diagonals, frame-transposed heads) mostly pay.
    row_overhead_s: float = 0.0
    # cpu: how torch's fused attention kernel's per-pair speed grows with a call's query rows (it
    # splits them in larger chunks): speed ~ (rows / 128) ** query_rows_exponent, up to 768 rows
    # (cost_models.attention_cost.query_rows_speed). 0.1 on the 2-core AVX2 machine (32 rows at
    # 0.88 of 128's speed, 256 at 1.1).
    query_rows_exponent: float = 0.1
    # Speed of the N:M linear kernel relative to the model of it (cost_models: the bytes it reads;
    # linear_cost_cpu: its expansion and arithmetic): the CPU executor measured 1-6x slower than
    # dense (bench/results/linear_cpu_*.json), so on "cpu" it is priced never to beat dense.
    nm_kernel_efficiency: float = 1.0
    # The same for the block-sparse (BSR) kernel's arithmetic (cpu: and its reads of the kept
    # blocks, which the panels' 64-row GEMMs run at 0.8 of the dense path's speeds).
    bsr_kernel_efficiency: float = 1.0
    # The fraction of tensor_flops dense GEMMs reach in linear layers (0: matmul_efficiency); cpu
    # (cost_models/linear_cost_cpu.py): the speed at which a GEMM of 2+ token rows copies its weight
    # into packed panels (on every call: weights are not prepacked), and one GEMM call's fixed cost.
    gemm_efficiency: float = 0.0
    gemm_pack_bytes_per_s: float = 0.0
    gemv_tokens: int = 1  # cpu: up to this many token rows torch's dense linear streams the weight once
    # cpu: where set, torch's bfloat16 linear streams its weight at this speed once a call and adds
    # its arithmetic (AMX tiles: no per-call packing as float32's GEMM; 0: priced as float32's)
    bf16_gemm_bytes_per_s: float = 0.0
    gemm_call_overhead_s: float = 0.0
    # cpu: the share of the streaming bandwidth torch's BSR tensors (MKL's sparse kernels) reach
    # reading a block-sparse weight at a few tokens (codegen.linear_cpu.FEW_TOKENS).
    torch_bsr_stream_share: float = 0.5
    # cpu: per-pair speed of the native interval kernel (codegen/attention_cpu_native.py: BLAS GEMMs
    # on 256-row tiles, its own vectorized softmax) relative to torch's fused kernel at 128 rows, and
    # what its masked pairs (band edges, on 32-row sub-tiles: shorter GEMMs) cost beyond that, in
    # vector FLOPs a pair as mask_cost_per_pair.
    native_pair_speed: float = 1.0
    native_mask_cost_per_pair: float = 16.0
    # cpu: what a pattern run on a native kernel pays once (its operands, cached, and one call), in
    # place of launch_overhead_s, which plans and runs SDPA calls. 100 us: measured on the AVX-512
    # machine (4 heads of 64 tokens: ~100-125 us, the plan on torch's kernel ~160 us). A fit on
    # cache-flushed timings takes 221 us but picks worse: top-1 regret 9.8% against 5.5% on
    # bench/results/cost_model_cpu_20261206_225318.json (with the launch overhead instead: 11.9%
    # on cost_model_cpu_20261206_223100.json).
    native_overhead_s: float = 100e-6
    # cpu: what a lane of a vertical-slash's slash costs the native kernel on one core (16 rows
    # against a slash's 16 consecutive keys at a time, apart from the tiles' pairs): a fixed part
    # and a part per unit of D + Dv (the lane's dot product and its share of the products); and
    # what each distinct K / V row the lanes of a group read costs beyond that (slashes closer than
    # 16 apart share rows): per unit of D + Dv, times the share of a kv head's K and V (Sk x (D +
    # Dv) floats) that does not fit in a core's cache (core_cache_bytes), read from further out
    # (cost_models.attention_cost.native_lane_seconds, native_row_seconds). On the AVX-512
    # machine, least squares of the relative error over 96 kernel timings (S 1024-8192, D 32-128,
    # 5% and 15% density, causal or not, with and without columns, 2 threads): 1.5 ns + 0.061 ns a
    # unit a lane, 0.11 ns a unit a row beyond the cache (D = 64: 9.3 ns a lane; D = 128 at S =
    # 8192: 35 ns where the rows are distinct). rms log error 0.20 where one figure for all (7.2 ns,
    # fitted at D = 64) had 0.60: it priced D = 128 lanes at a third of their time. Not measured
    # on AVX2.
    native_fetch_seconds: float = 1.5e-9
    native_fetch_width_seconds: float = 6.1e-11
    native_fetch_spill_seconds: float = 1.1e-10
    core_cache_bytes: int = 2 * 2**20   # cpu: the cache of one core (its L2)
    # cpu: the native sparse linear kernels (codegen/native/sparse_linear.cpp, priced by
    # cost_models/linear_cost_cpu.py), per core. Masked rows and block rows: per 16 inputs of a row
    # the kernel computes (kept or not, for masked rows), a fixed part (expanding the kept values,
    # the row's bookkeeping) and a part per token (the product); the weight's bytes stream at
    # native_stream_share of the streaming bandwidth, and the kernel takes the longer of the two.
    # Segments: per kept value, a part per 64-token tile (reading it and its column) and a part per
    # 16 tokens (the product with its input's row of the tile). On the AVX-512 machine, least
    # squares of the log error over 336 kernel timings (4 layers, 384-4096 x 1024-11008; scattered
    # 10-60%, 2:4, 64 x 64 and 32 x 32 blocks at 10-60%; 1-256 tokens; caches flushed; 2 threads):
    # rms log error 0.19 (the AVX-512 Xeon profile, _AVX512_XEON); after the masked and block-rows kernels'
    # far prefetch, their three terms refitted on the 224 timings of those two kernels (same grid):
    # rms log error 0.13 (the old terms: 0.25 on them). The defaults here, for machines without
    # AVX-512 (not measured: no such machine was at hand), are twice its per-core costs (half the
    # vector width; the masked kernel expands values with a loop there).
    # Each call also pays native_linear_call_s (the call, its buffers, waking the threads).
    native_chunk_seconds: float = 1.0e-9
    native_chunk_token_seconds: float = 1.2e-9
    native_stream_share: float = 0.67
    native_value_seconds: float = 1.7e-9
    native_value_lanes_seconds: float = 4.4e-10
    native_linear_call_s: float = 51e-6
    calibrated_from: str = field(default="published figures")

    def __post_init__(self):
        if self.executor not in EXECUTORS:
            raise ValueError(f"hardware profile {self.name!r}: executor must be one of {EXECUTORS}, "
                             f"got {self.executor!r}")

    @property
    def shared_memory_per_block(self) -> int:
        """The most shared memory one block may use: the SM's, less the 1 KB the driver keeps per
        block (H100: 227 of 228 KB; A100: 163 of 164 KB)."""
        return self.shared_memory_per_sm - 1024

    def flops(self, dtype: str) -> float:
        try:
            return self.tensor_flops[dtype]
        except KeyError:
            raise ValueError(f"hardware profile {self.name!r} has no matmul throughput for dtype {dtype!r}; "
                             f"known: {sorted(self.tensor_flops)}") from None

    def replace(self, **changes) -> HardwareProfile:
        return dataclasses.replace(self, **changes)

    def with_cores(self, cores: int) -> HardwareProfile:
        """The same machine with `cores` cores at work ("cpu": torch's intra-op threads): the
        throughput figures (matmul and vector FLOP/s, exponentials) are totals over sm_count cores
        and scale with the count; memory bandwidth and one-thread copies do not."""
        if cores < 1:
            raise ValueError(f"hardware profile {self.name!r}: cores must be >= 1, got {cores}")
        if cores == self.sm_count:
            return self
        scale = cores / self.sm_count
        return self.replace(sm_count=cores, tensor_flops={k: v * scale for k, v in self.tensor_flops.items()},
                            vector_flops=self.vector_flops * scale, exp_per_s=self.exp_per_s * scale)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> HardwareProfile:
        data = json.loads(text)
        if "masks_whole_query_block" in data:  # profiles stored before `executor` existed
            data["executor"] = "cpu" if data.pop("masks_whole_query_block") else "triton"
        names = {f.name for f in dataclasses.fields(HardwareProfile)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"hardware profile JSON has unknown fields {sorted(unknown)}")
        return HardwareProfile(**data)


TERA = 1e12

PROFILES: dict[str, HardwareProfile] = {
    "h100": HardwareProfile(
        name="h100", sm_count=132,
        tensor_flops={"bf16": 989 * TERA, "f16": 989 * TERA, "f32": 494.7 * TERA / 4},  # f32: exact (ieee) dots run on
        vector_flops=67 * TERA, exp_per_s=3.9 * TERA,                                    # FMA units, not tf32 cores
        memory_bandwidth=3.35 * TERA, shared_memory_per_sm=228 * 1024, l2_bytes=50 * 2**20,
        launch_overhead_s=4e-6, programs_per_sm=1, block_overhead_s=30e-9),
    "h200": HardwareProfile(
        name="h200", sm_count=132,
        tensor_flops={"bf16": 989 * TERA, "f16": 989 * TERA, "f32": 494.7 * TERA / 4},
        vector_flops=67 * TERA, exp_per_s=3.9 * TERA,
        memory_bandwidth=4.8 * TERA, shared_memory_per_sm=228 * 1024, l2_bytes=50 * 2**20,
        launch_overhead_s=4e-6, programs_per_sm=1, block_overhead_s=30e-9),
    "a100": HardwareProfile(
        name="a100", sm_count=108,
        tensor_flops={"bf16": 312 * TERA, "f16": 312 * TERA, "f32": 19.5 * TERA},
        vector_flops=19.5 * TERA, exp_per_s=1.7 * TERA,
        memory_bandwidth=2.039 * TERA, shared_memory_per_sm=164 * 1024, l2_bytes=40 * 2**20,
        launch_overhead_s=5e-6, programs_per_sm=1, matmul_efficiency=0.6, block_overhead_s=40e-9),
    # The 2-core machine sparsec's CPU executor runs on; refit by measured autotuning. Its
    # coefficients are rounded from a fit on that machine at two threads, caches flushed before
    # every call (bench/results/cost_model_cpu_20261202_081416.json, 438 candidates, with the launch
    # overhead, a plan's fixed cost, held at 400 us; a later grid with a plan a head ("mixed"
    # candidates) finds 500 us and checks the whole profile: Spearman 0.997, rms log error 0.094,
    # cost_model_cpu_20261202_092826.json); the throughput figures are totals for both cores.
    # get_profile gives it for torch's current thread count (with_cores).
    "cpu": HardwareProfile(
        name="cpu", sm_count=2,
        tensor_flops={"f32": 200e9, "bf16": 60e9, "f16": 60e9},
        vector_flops=40e9, exp_per_s=1.6e9,
        memory_bandwidth=15e9, shared_memory_per_sm=2 * 2**20, l2_bytes=32 * 2**20,
        launch_overhead_s=400e-6, programs_per_sm=1, matmul_efficiency=0.28, mask_cost_per_pair=18.0,
        row_overhead_s=0.45e-6, executor="cpu", call_overhead_s=130e-6, gather_bytes_per_s=3.3e9,
        # linear layers: cost_models/linear_cost_cpu.py, fitted to bench/results/linear_cpu_20261202_083016.json
        # and _091530.json
        nm_kernel_efficiency=0.5, bsr_kernel_efficiency=0.8, gemm_efficiency=0.33, gemm_pack_bytes_per_s=3.4e9,
        gemm_call_overhead_s=39e-6,
        # the native interval kernel: not measured on AVX2 (its speed relative to torch's kernel
        # taken as on the AVX-512 machine, below)
        native_pair_speed=1.23, native_mask_cost_per_pair=17.5),
}

# The published "cpu" profile by the instruction set torch's CPU kernels use
# (torch.backends.cpu.get_cpu_capability()): the one above was fitted on an AVX2 machine (2-thread
# AMD EPYC); on a 2-thread AVX-512 Xeon (with AMX) torch's fused attention kernel runs ~3.5x faster
# and its dense GEMM ~5x, and that profile's estimates are 3.7x too high (rms log error 1.3 on
# attention, 1.4 on linear layers). The AVX512 one is fitted there: fp32 peak 400 GF/s for two
# cores; attention terms from bench/results/cost_model_cpu_20261206_220148.json (534 candidates, 72
# of them on the native interval kernel, 2 threads; rms log error 0.113, Spearman 0.994; with them
# the executor's choice between the native kernel and torch's is right in 108 of 108 cases of
# bench/results/cpu_native_20261206_215645.json; with block-sparse layouts on the native kernels
# too, 142 of 144 in cpu_native_20261206_222834.json, and the profile fits a later grid with them
# at rms log error 0.131 (cost_model_cpu_20261206_223100.json: a refit moves no term by more than
# 10%); its block and split choices replay as before:
# mean loss 2.4% and 1.2% on cpu_blocks_20261206_204804 and cpu_split_20261206_205637), linear
# terms (and the streaming bandwidth) by least squares of the log error on
# bench/results/linear_cpu_20261206_160126.json (135 timings, rms log error 1.42 ->
# 0.27; fitted without the 4096 x 4096 layer, the choice there is right in 18 of 20 points, mean
# loss 3.5%). torch's BSR tensors stream a block-sparse weight at a few tokens at 0.18 of the dense
# GEMV's speed there (the AVX2 machine: 0.5), fitted by `bench/cost_model.py` with the linear grid
# (cost_model_cpu_20261206_201452.json: with it, the sparse-or-dense choice is right in 94 of 100
# layers and token counts, mean loss 1.2%, where the profile without it got 90, 4.4%). A stored
# calibration replaces either.
# Half-precision GEMMs there (F.linear, 2 threads, 512-2048 tokens, 1024-4096 features): fp16 at
# fp32's speed (270-310 GF/s: converted, no AMX-FP16), bf16 on AMX tiles at 1.6-2.1 TF/s; bf16
# without AMX is set at fp32's peak (not measured: AVX-512 cores convert it at worst).
_AMX_BF16_FLOPS = 2.2e12
# torch's bfloat16 linear there streams its weight at 17-23 GB/s (5 layers 384-11008 wide, 1-1024
# tokens, caches flushed, 2 threads: flat from 1 to 16 tokens, then its AMX arithmetic adds)
_AMX_BF16_STREAM = 21e9
_AVX512_XEON = PROFILES["cpu"].replace(
        tensor_flops={"f32": 400e9, "bf16": 400e9, "f16": 340e9}, memory_bandwidth=44e9,
        matmul_efficiency=0.41, exp_per_s=9.9e10, mask_cost_per_pair=7.0, row_overhead_s=0.19e-6,
        launch_overhead_s=280e-6, call_overhead_s=55e-6, gather_bytes_per_s=4.5e9, query_rows_exponent=0.124,
        native_pair_speed=1.23, native_mask_cost_per_pair=17.5,
        gemm_efficiency=0.73, gemm_pack_bytes_per_s=17.9e9, gemm_call_overhead_s=11e-6, bsr_kernel_efficiency=0.44,
        memory_efficiency=0.73, gemv_tokens=2,
        torch_bsr_stream_share=0.18, native_chunk_seconds=3.3e-10, native_chunk_token_seconds=5.0e-10,
        native_stream_share=1.0, native_value_seconds=8.5e-10, native_value_lanes_seconds=2.2e-10)
# AVX-512 without AMX tiles: fitted on a 2-thread AMD EPYC (Zen 4: AVX-512 on 256-bit units, no AMX),
# bench/results/cost_model_cpu_20261208_023910.json (582 attention candidates, 180 linear timings, 2
# threads). The Xeon's profile priced it at rms log error 0.297, mean top-1 regret 2.8% (worst 26%), the
# linear sparse-or-dense choice right in 132 of 160 (mean loss 3.2%, worst 50%); this fit: 0.135, 0.8%
# (held-out layer shapes 1.1%), 139 of 160 (2.0%). Its exponentials, GEMMs, packing and memory-bound
# terms are 1.5-2.3x slower than the Xeon's. One term is the Xeon's, not the fit's: native_linear_call_s
# (fit: 178 us a call, on the grid's cache-flushed calls) made bench/generate.py --quick's decoding
# step run 4 of its 10 2:4 layers dense, 8.55 ms a step against 6.8 ms with them sparse (51 us).
# Checked on fresh grids: cost_model_cpu_20261208_024418.json (all fitted terms: 0.174, 1.7%, 137 of
# 160, 2.4%) and _031325.json (as published: regret 1.5%, worst 12%; 134 of 160, mean loss 3.7%).
# Which AVX-512 machine without AMX a user has (Zen 4 / 5, Ice Lake) is not told apart: this is the
# one measured. bf16 is left at fp32's peak (not measured).
_AVX512_ZEN4 = _AVX512_XEON.replace(
    exp_per_s=4.3e10, launch_overhead_s=390e-6, matmul_efficiency=0.33, memory_efficiency=0.41,
    mask_cost_per_pair=8.9, gather_bytes_per_s=7.9e9, row_overhead_s=0.2e-6, query_rows_exponent=0.115,
    gemm_efficiency=0.47, gemm_pack_bytes_per_s=8.2e9, gemm_call_overhead_s=10e-6, torch_bsr_stream_share=0.13,
    native_pair_speed=1.11, native_mask_cost_per_pair=10.2, native_overhead_s=170e-6,
    native_fetch_seconds=1.14e-9, native_fetch_width_seconds=6.3e-11, native_chunk_seconds=7.7e-10,
    native_chunk_token_seconds=7.1e-10, native_stream_share=1.69, native_value_lanes_seconds=3.9e-10,
    native_linear_call_s=51e-6)
# (instruction set torch's CPU kernels use, AMX tiles) -> the published profile; the AVX2 one otherwise.
_CPU_BY_CAPABILITY = {("AVX512", True): _AVX512_XEON, ("AVX512", False): _AVX512_ZEN4}

_ALIASES = {"h100-sxm": "h100", "h100_sxm": "h100", "nvidia-h100": "h100", "nvidia-h200": "h200",
            "a100-sxm": "a100", "a100_sxm": "a100"}


def _calibrated_path(name: str) -> Path:
    from sparsec.cost_models.calibration import calibrated_profile_path
    return calibrated_profile_path(name)


def get_profile(target: str | HardwareProfile, *, calibrated: bool = True) -> HardwareProfile:
    """The profile named `target` ("h100", "h200", "a100", "cpu"), refit from measurements when a
    calibrated profile for it is stored on disk and `calibrated`. "cpu" describes this machine's
    cores as torch uses them: its core count is torch.get_num_threads()."""
    if isinstance(target, HardwareProfile):
        return target
    key = _ALIASES.get(target.lower(), target.lower())
    if key not in PROFILES:
        raise ValueError(f"unknown hardware target {target!r}; known: {sorted(PROFILES)}")
    profile = _published_cpu() if key == "cpu" else PROFILES[key]
    if calibrated:
        path = _calibrated_path(key)
        if path.exists():
            profile = _stored_profile(path, profile)
    if profile.executor == "cpu":  # a CPU plan is for this machine: its executor runs on torch's threads
        profile = profile.with_cores(torch.get_num_threads())
    return profile


def _published_cpu() -> HardwareProfile:
    """The published "cpu" profile for the instruction set torch's CPU kernels use here and whether
    the cores have AMX tiles, with AMX's bf16 GEMM peak where they do (_AMX_BF16_FLOPS)."""
    amx_query = getattr(torch.cpu, "_is_amx_tile_supported", None)
    amx = bool(amx_query is not None and amx_query())
    profile = _CPU_BY_CAPABILITY.get((torch.backends.cpu.get_cpu_capability(), amx), PROFILES["cpu"])
    if amx:
        profile = profile.replace(tensor_flops={**profile.tensor_flops, "bf16": _AMX_BF16_FLOPS},
                                  bf16_gemm_bytes_per_s=_AMX_BF16_STREAM)
    return profile


def _stored_profile(path: Path, published: HardwareProfile) -> HardwareProfile:
    """The calibrated profile at `path`, or `published` when it was stored by an older sparsec: one
    that lacks fields the model now has was fitted to another model, so its coefficients would
    mislead (a warning says to calibrate again)."""
    text = path.read_text()
    missing = sorted({f.name for f in dataclasses.fields(HardwareProfile)} - set(json.loads(text)) - {"executor"})
    if missing:
        log.warning("calibrated profile %s was stored before the cost model had %s: ignored, using the published "
                    "%r profile; run `sparsec tune --measure` (or bench/cost_model.py) to calibrate again",
                    path, ", ".join(missing), published.name)
        return published
    return HardwareProfile.from_json(text)


def profile_for_device(device: torch.device | str) -> HardwareProfile:
    """The profile that best describes `device` (by CUDA device name), for run-time choices."""
    device = torch.device(device)
    if device.type != "cuda":
        return get_profile("cpu")
    name = torch.cuda.get_device_name(device).lower()
    for key in ("h200", "h100", "a100"):
        if key in name:
            return get_profile(key)
    return get_profile("h100")
