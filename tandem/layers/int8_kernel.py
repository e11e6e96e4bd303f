"""The int8 weight-only matrix product of decode-sized batches on CPU, over weights in an interleaved layout:
out [M, N] = (x [M, K] . q [N, K]^T) * scale [N], x float32, q int8, accumulated in float32.

Why a layout and a kernel of our own: at one row, torch 2.13's `_weight_int8pack_mm` streams cold weights
at 7-11 GB/s on one core of this project's machines (and scales every weight before its FMA; on AVX2-only CPUs
it is compute-bound at about 3 G weights/s), where llama.cpp streams about 28 GB/s. llama.cpp repacks its
weights so that consecutive channels' blocks are interleaved: one sequential stream feeds several outputs,
instead of one stream per channel. `pack` does the same: [N, K] -> [N/4, K/16, 4, 16], so the 16-weight
blocks of 4 channels at the same inputs fill one 64-byte cache line, and the kernel walks the weight once, in
order. Measured on the seventh session's machine (AMD EPYC, cold weights, one thread, bench numbers in
bench/results/profile.md): [8192, 1024] 393 us (21 GB/s) against `_weight_int8pack_mm`'s 1105 us,
[2048, 1024] 114 against 299, [1024, 4096] 350 against 379.

The kernel is a few dozen lines of C with AVX2 / FMA intrinsics (it runs on AVX512 CPUs too), compiled at
first use with the machine's C compiler (`cc -O3 -mavx2 -mfma`) into a per-user cache keyed by its source
(`TANDEM_CACHE_DIR`, default ~/.cache/tandem) and called through ctypes, which releases the GIL; one thread,
as a rank runs. Rows go two at a time (each packed block widened once for both). Where it is not available
(a CPU without AVX2, no C compiler, a failed build: logged once), `available()` is False and the caller keeps
the plain [N, K] layout and torch's kernels. Every process of a machine gets the same answer, so every rank of
a one-node run takes the same path for the same step."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger("tandem")

CHANNELS, BLOCK = 4, 16  # the packed layout: [N / CHANNELS, K / BLOCK, CHANNELS, BLOCK]
_FLAGS = ["-O3", "-mavx2", "-mfma", "-shared", "-fPIC", "-std=c11"]
_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* R activation rows (1 or 2) against packed weights [N/4][K/16][4][16]: each 64-byte line holds 16 weights
   of 4 channels; it is widened once and FMA'd with every row, two chains per channel and row. */
#define PACKED_ROWS(R)                                                                                       \
    static void rows_##R(const float *x, const int8_t *w, const float *scale, float *out, int64_t N,        \
                         int64_t K) {                                                                       \
        for (int64_t g = 0; g < N / 4; g++) {                                                               \
            const int8_t *p = w + g * 4 * K;                                                                \
            __m256 acc[R][4][2];                                                                            \
            for (int r = 0; r < R; r++)                                                                     \
                for (int c = 0; c < 4; c++) acc[r][c][0] = acc[r][c][1] = _mm256_setzero_ps();              \
            for (int64_t k = 0; k < K; k += 16, p += 64) {                                                  \
                for (int c = 0; c < 4; c++) {                                                               \
                    __m128i q = _mm_loadu_si128((const __m128i *)(p + 16 * c));                             \
                    __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));                                \
                    __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));             \
                    for (int r = 0; r < R; r++) {                                                           \
                        acc[r][c][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * K + k), acc[r][c][0]);   \
                        acc[r][c][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * K + k + 8), acc[r][c][1]); \
                    }                                                                                       \
                }                                                                                           \
            }                                                                                               \
            for (int r = 0; r < R; r++)                                                                     \
                for (int c = 0; c < 4; c++)                                                                 \
                    out[r * N + g * 4 + c] = hsum(_mm256_add_ps(acc[r][c][0], acc[r][c][1])) * scale[g * 4 + c]; \
        }                                                                                                   \
    }
PACKED_ROWS(1)
PACKED_ROWS(2)

/* out[m * N + n] = scale[n] * sum_k w(n, k) * x[m * K + k]; N % 4 == 0, K % 16 == 0, rows contiguous. */
void int8_packed_matmul(const float *x, const int8_t *w, const float *scale, float *out,
                        int64_t M, int64_t N, int64_t K) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) rows_2(x + m * K, w, scale, out + m * N, N, K);
    if (m < M) rows_1(x + m * K, w, scale, out + m * N, N, K);
}
"""


def _cache_dirs() -> list[Path]:
    """Where the built library may live: TANDEM_CACHE_DIR, else ~/.cache/tandem, then a per-user folder in the
    temporary directory (a home that cannot be written to must not cost the kernel)."""
    first = os.environ.get("TANDEM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tandem")
    return [Path(first), Path(tempfile.gettempdir()) / f"tandem-cache-{os.getuid()}"]


def _build(target: Path) -> None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc / gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source, built = Path(tmp) / "int8_packed_matmul.c", Path(tmp) / target.name
        source.write_text(_SOURCE)
        done = subprocess.run([compiler, *_FLAGS, str(source), "-o", str(built)], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(built, target)  # atomic: a concurrent rank sees the whole library or none


@functools.lru_cache(maxsize=1)
def _library():
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    digest = hashlib.sha256((_SOURCE + " ".join(_FLAGS)).encode()).hexdigest()[:16]
    problems = []
    for folder in _cache_dirs():
        target = folder / f"int8_packed_matmul-{digest}.so"
        try:
            if not target.exists():
                _build(target)
            lib = ctypes.CDLL(str(target))
            break
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            problems.append(f"{folder}: {exc}")
    else:
        logger.warning("int8 weight-only kernel unavailable (%s): int8wo keeps torch's kernels", "; ".join(problems))
        return None
    fn = lib.int8_packed_matmul
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    fn.restype = None
    return fn


def available() -> bool:
    return _library() is not None


def packable(out_features: int, in_features: int) -> bool:
    return out_features % CHANNELS == 0 and in_features % BLOCK == 0


def pack(q: torch.Tensor) -> torch.Tensor:
    """[N, K] int8 -> the interleaved layout [N/4, K/16, 4, 16] (same bytes)."""
    n, k = q.shape
    return q.view(n // CHANNELS, CHANNELS, k // BLOCK, BLOCK).transpose(1, 2).contiguous()


def unpack_rows(packed: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Rows [start, start + count) of the [N, K] weight (start and count multiples of 4), as a new tensor."""
    groups, blocks = packed.shape[0], packed.shape[1]
    if start % CHANNELS or count % CHANNELS or start + count > groups * CHANNELS:
        raise ValueError(f"rows {start}..{start + count} of a packed weight of {groups * CHANNELS} rows")
    part = packed[start // CHANNELS:(start + count) // CHANNELS]  # [count/4, K/16, 4, 16]
    return part.transpose(1, 2).reshape(count, blocks * BLOCK)


def int8_packed_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32, `packed` (`pack` of an [N, K] int8 weight), scales [N] float32, all contiguous on the
    CPU. Returns [M, N] float32. Call only where `available()`."""
    if not (x.dtype == scales.dtype == torch.float32 and packed.dtype == torch.int8):
        raise TypeError(f"int8_packed_matmul takes float32 x and scales and int8 weights, got {x.dtype}, "
                        f"{scales.dtype}, {packed.dtype}")
    if not (x.is_contiguous() and packed.is_contiguous() and scales.is_contiguous()):
        raise ValueError("int8_packed_matmul takes contiguous tensors")
    if packed.dim() != 4 or packed.shape[2:] != (CHANNELS, BLOCK):
        raise ValueError(f"not a packed weight: shape {tuple(packed.shape)}")
    m, k = x.shape
    n = packed.shape[0] * CHANNELS
    if k != packed.shape[1] * BLOCK or scales.shape != (n,):
        raise ValueError(f"int8_packed_matmul: x {tuple(x.shape)}, weight of {n} x {packed.shape[1] * BLOCK}, "
                         f"scales {tuple(scales.shape)}")
    out = torch.empty(m, n, dtype=torch.float32)
    _library()(x.data_ptr(), packed.data_ptr(), scales.data_ptr(), out.data_ptr(), m, n, k)
    return out
