"""The int8 weight-only matrix product of decode-sized batches on CPU: out [M, N] = (x [M, K] . q [N, K]^T) *
scale [N], x float32, q int8, accumulated in float32 (`int8_matmul`).

Why our own kernel: torch 2.13's `_weight_int8pack_mm` converts each int8 weight to float and multiplies it by
its channel's scale before the FMA, in blocks of 4 channels, re-converting the activation row for every block:
on one AVX2 core it runs at about 3 G weights/s, compute-bound, no faster than the bf16 matrix-vector kernel
(bench/results/profile.md, "Weight-only decode"). This one sign-extends 16 weights per load, FMAs them with
the float32 activations in independent chains (one row: four channels at a time, two chains each; up to four
rows: each channel's weights widened once for all of them) and applies the scale once per output. It is
about ninety lines of C with AVX2 / FMA intrinsics, compiled at first use
with the machine's C compiler (`cc -O3 -mavx2 -mfma`) into a per-user cache keyed by its source, and called
through ctypes (which releases the GIL); one thread, as a rank runs.

Where it is not available (a CPU without AVX2, no C compiler, a failed build: logged once), `available()` is
False and the caller keeps torch's kernel. Every process of a machine gets the same answer, so every rank of
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

/* 16 int8 weights from p as two float vectors */
static inline void widen(const int8_t *p, __m256 *lo, __m256 *hi) {
    __m128i q = _mm_loadu_si128((const __m128i *)p);
    *lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    *hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
}

/* One activation row, four channels at a time: eight independent FMA chains. */
static void one_row(const float *x, const int8_t *w, const float *scale, float *out, int64_t N, int64_t K) {
    int64_t n = 0;
    for (; n + 4 <= N; n += 4) {
        __m256 acc[4][2];
        for (int c = 0; c < 4; c++) acc[c][0] = acc[c][1] = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
            for (int c = 0; c < 4; c++) {
                __m256 w0, w1;
                widen(w + (n + c) * K + k, &w0, &w1);
                acc[c][0] = _mm256_fmadd_ps(w0, x0, acc[c][0]);
                acc[c][1] = _mm256_fmadd_ps(w1, x1, acc[c][1]);
            }
        }
        for (int c = 0; c < 4; c++) {
            float sum = hsum(_mm256_add_ps(acc[c][0], acc[c][1]));
            for (int64_t t = k; t < K; t++) sum += (float)w[(n + c) * K + t] * x[t];
            out[n + c] = sum * scale[n + c];
        }
    }
    for (; n < N; n++) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            __m256 w0, w1;
            widen(w + n * K + k, &w0, &w1);
            a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), a0);
            a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), a1);
        }
        float sum = hsum(_mm256_add_ps(a0, a1));
        for (; k < K; k++) sum += (float)w[n * K + k] * x[k];
        out[n] = sum * scale[n];
    }
}

/* Up to four activation rows against each channel: its weights widened once per pass. */
static void few_rows(const float *x, const int8_t *w, const float *scale, float *out, int64_t M, int64_t N,
                     int64_t ldo, int64_t K) {
    for (int64_t n = 0; n < N; n++) {
        const int8_t *wr = w + n * K;
        __m256 acc[4][2];
        for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            __m256 w0, w1;
            widen(wr + k, &w0, &w1);
            for (int r = 0; r < M; r++) {
                acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * K + k), acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * K + k + 8), acc[r][1]);
            }
        }
        for (int r = 0; r < M; r++) {
            float sum = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
            for (int64_t t = k; t < K; t++) sum += (float)wr[t] * x[r * K + t];
            out[r * ldo + n] = sum * scale[n];
        }
    }
}

/* out[m * N + n] = scale[n] * sum_k w[n * K + k] * x[m * K + k]; all row-major and contiguous. */
void int8_matmul(const float *x, const int8_t *w, const float *scale, float *out,
                 int64_t M, int64_t N, int64_t K) {
    if (M == 1) {
        one_row(x, w, scale, out, N, K);
        return;
    }
    for (int64_t m = 0; m < M; m += 4) {
        int64_t rows = M - m < 4 ? M - m : 4;
        few_rows(x + m * K, w, scale, out + m * N, rows, N, N, K);
    }
}
"""


def _cache_dir() -> Path:
    base = os.environ.get("TANDEM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tandem")
    return Path(base)


def _build(target: Path) -> None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc / gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source, built = Path(tmp) / "int8_matmul.c", Path(tmp) / target.name
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
    target = _cache_dir() / f"int8_matmul-{digest}.so"
    try:
        if not target.exists():
            _build(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        logger.warning("int8 weight-only kernel unavailable (%s): using torch's _weight_int8pack_mm", exc)
        return None
    fn = lib.int8_matmul
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    fn.restype = None
    return fn


def available() -> bool:
    return _library() is not None


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32, qweight [N, K] int8, scales [N] float32, all contiguous on the CPU. Returns [M, N]
    float32. Call only where `available()`."""
    if not (x.dtype == scales.dtype == torch.float32 and qweight.dtype == torch.int8):
        raise TypeError(f"int8_matmul takes float32 x and scales and int8 weights, got {x.dtype}, {scales.dtype}, "
                        f"{qweight.dtype}")
    if not (x.is_contiguous() and qweight.is_contiguous() and scales.is_contiguous()):
        raise ValueError("int8_matmul takes contiguous tensors")
    (m, k), (n, k_w) = x.shape, qweight.shape
    if k != k_w or scales.shape != (n,):
        raise ValueError(f"int8_matmul: x {tuple(x.shape)}, weight {tuple(qweight.shape)}, "
                         f"scales {tuple(scales.shape)}")
    out = torch.empty(m, n, dtype=torch.float32)
    _library()(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), out.data_ptr(), m, n, k)
    return out
