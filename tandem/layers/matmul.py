"""`linear()`: F.linear, except for half-precision weights on CPUs where torch's native half-precision GEMM is
slow; there the product is computed by upcasting to float32.

Which path a CPU product takes is decided per (dtype, shape class): decode-sized inputs (a few rows per
weight, memory-bound) and prefill-sized inputs (many rows, compute-bound) can favour different paths. The
decision combines the CPU's capability (`CpuCapability`: torch's ISA level, oneDNN's bf16/fp16 support and
the cpuinfo flags of native half-precision instructions) with a small table measured once per process and
class (`measure_paths`): without a oneDNN kernel torch falls back to a reference loop that is several times
slower, so the upcast is taken unmeasured; otherwise the CPU's native instructions set the preferred path,
and the measurement overrides it only when the other path is clearly faster (`SWITCH_RATIO`), so timing
noise cannot flip a decision. Measured on a 2-core AMD EPYC with avx512_bf16 (bench shapes, 1 thread):
native bf16 is 2-5x faster than the upcast at every row count; on AVX2 machines without it, 3-10x slower.

The upcast path keeps the weights in half precision in memory and computes in float32, rounding back,
which is what a native kernel with fp32 accumulation does. Weights are upcast a block of rows at a time
so each fp32 block stays in cache (a whole LM head upcast at once would stream hundreds of MB per step).

Products of at most `GEMV_MAX_ROWS` rows with bf16 weights always take torch's own kernel: for so few rows it
runs a vectorized matrix-vector loop with float32 accumulation (no oneDNN needed), which reads the bf16
weight once. Measured on the 2-core AVX2 AMD EPYC VM (one thread, weights not in cache): the 32000 x 1024 LM
head takes 0.46x the upcast path's time at 1 row, 0.55x at 2 rows, and about the same at 3-4 rows; the upcast
is faster from 6 rows. A constant, not a measurement, so every rank takes the same path for the same step."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tandem.layers.fp8 import FP8_DTYPE, fp8_linear, is_fp8

HALF_DTYPES = (torch.bfloat16, torch.float16)
DECODE, PREFILL = "decode", "prefill"
DECODE_MAX_ROWS = 64  # inputs with at most this many rows are decode-sized
NATIVE, UPCAST = "native", "upcast"
SWITCH_RATIO = 0.8  # leave the preferred path only for one that takes at most this fraction of its time
# instructions that make oneDNN's half-precision GEMM native rather than emulated, per dtype
NATIVE_FLAGS = {torch.bfloat16: frozenset({"avx512_bf16", "amx_bf16"}),
                torch.float16: frozenset({"avx512_fp16", "amx_fp16"})}
BLOCK_BYTES = 1 << 20  # fp32 bytes of weight upcast at a time
GEMV_MAX_ROWS = 2  # bf16 products of up to this many rows take torch's matrix-vector kernel (measured above)


@dataclass(frozen=True)
class CpuCapability:
    isa: str  # torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", "DEFAULT", ...
    onednn_bf16: bool  # oneDNN has a bf16 GEMM for this CPU (else torch uses a slow reference loop)
    onednn_fp16: bool
    flags: frozenset[str]  # /proc/cpuinfo flags

    @classmethod
    def detect(cls) -> CpuCapability:
        return cls(torch.backends.cpu.get_cpu_capability(), _onednn_supports("bf16"), _onednn_supports("fp16"),
                   cpuinfo_flags())

    def has_kernel(self, dtype: torch.dtype) -> bool:
        return self.onednn_bf16 if dtype == torch.bfloat16 else self.onednn_fp16

    def has_native_instructions(self, dtype: torch.dtype) -> bool:
        return bool(self.flags & NATIVE_FLAGS[dtype])


def _onednn_supports(kind: str) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    check = getattr(torch.ops.mkldnn, f"_is_mkldnn_{kind}_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def cpuinfo_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU flags of the first processor in `path` (empty where there is no such file, e.g. macOS)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def shape_class(rows: int) -> str:
    return DECODE if rows <= DECODE_MAX_ROWS else PREFILL


def choose_path(capability: CpuCapability, dtype: torch.dtype, timings: Callable[[], tuple[float, float]]) -> str:
    """NATIVE or UPCAST for one (dtype, shape class). `timings()` returns (native, upcast) seconds of a
    representative product of that class; it is called only when a oneDNN kernel exists."""
    if not capability.has_kernel(dtype):
        return UPCAST
    native_s, upcast_s = timings()
    if capability.has_native_instructions(dtype):
        return UPCAST if upcast_s < SWITCH_RATIO * native_s else NATIVE
    return NATIVE if native_s < SWITCH_RATIO * upcast_s else UPCAST


REPRESENTATIVE_ROWS = {DECODE: 16, PREFILL: 256}


def measure_paths(dtype: torch.dtype, cls: str, features: int = 1024, repeats: int = 5) -> tuple[float, float]:
    """(native, upcast) seconds of a [rows, features] x [features, features] product of shape class `cls`,
    each the best of `repeats` runs taken alternately (the minimum is what other processes' load distorts least)."""
    x = torch.randn(REPRESENTATIVE_ROWS[cls], features).to(dtype)
    w = torch.randn(features, features).to(dtype)
    paths = (lambda: F.linear(x, w), lambda: _upcast_linear(x, w, None))
    best = [float("inf"), float("inf")]
    for fn in paths:
        fn()  # warm-up: oneDNN builds its kernel on the first call
    for _ in range(repeats):
        for i, fn in enumerate(paths):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


@functools.cache
def detected_capability() -> CpuCapability:
    return CpuCapability.detect()


@functools.cache
def cpu_path(dtype: torch.dtype, cls: str) -> str:
    """The path of this process's CPU products of `dtype` in shape class `cls`, decided on first use."""
    return choose_path(detected_capability(), dtype, lambda: measure_paths(dtype, cls))


def uses_native_kernel(weight: torch.Tensor, rows: int) -> bool:
    """Whether `linear` computes a product of `rows` input rows with `weight` by torch's own kernel for
    the weight's dtype (so batched forms of it, such as grouped GEMMs, are fast too)."""
    if is_fp8(weight):
        return False  # block-scaled FP8 (layers/fp8.py): dequantized a block of rows at a time
    if weight.dtype not in HALF_DTYPES or weight.device.type != "cpu":
        return True
    return cpu_path(weight.dtype, shape_class(rows)) == NATIVE


def takes_gemv(weight: torch.Tensor, rows: int) -> bool:
    """Whether a bf16 CPU product of `rows` rows is left to torch's matrix-vector kernel (see the docstring)."""
    return rows <= GEMV_MAX_ROWS and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"


def _upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    x32 = x.float()
    rows = max(64, BLOCK_BYTES // (4 * weight.shape[1]))
    if weight.shape[0] <= rows:
        out = F.linear(x32, weight.float())
    else:
        out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32, device=x.device)
        for start in range(0, weight.shape[0], rows):
            out[..., start:start + rows] = F.linear(x32, weight[start:start + rows].float())
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):  # a quantized weight module (layers/weight_only.py) computes itself
        return weight(x, bias)
    if weight.dtype == FP8_DTYPE:
        return fp8_linear(x, weight, bias)
    rows = x.numel() // max(1, x.shape[-1])
    if not takes_gemv(weight, rows) and not uses_native_kernel(weight, rows):
        return _upcast_linear(x, weight, bias)
    return F.linear(x, weight, bias)
