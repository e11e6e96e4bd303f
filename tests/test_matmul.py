"""The half-precision matmul path decision (injected capabilities and timings, no wall clock) and the
numerics of both paths against a float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tandem.layers import matmul
from tandem.layers.matmul import NATIVE, UPCAST, CpuCapability, choose_path, cpuinfo_flags, shape_class

BF16 = torch.bfloat16
FP16 = torch.float16


def capability(kernel: bool, native_flags: bool, dtype=BF16) -> CpuCapability:
    flags = {"avx2", "fma"} | (set(matmul.NATIVE_FLAGS[dtype]) if native_flags else set())
    return CpuCapability("AVX512", kernel, kernel, frozenset(flags))


def timings(native_s: float, upcast_s: float):
    calls = []

    def measure():
        calls.append(1)
        return native_s, upcast_s

    return measure, calls


def test_without_a_onednn_kernel_the_upcast_is_taken_unmeasured():
    measure, calls = timings(native_s=1.0, upcast_s=100.0)  # even a (bogus) fast native time does not matter
    assert choose_path(capability(kernel=False, native_flags=True), BF16, measure) == UPCAST
    assert calls == []


@pytest.mark.parametrize("native_s, upcast_s, expected", [
    (0.3, 1.0, NATIVE),   # native much faster
    (1.0, 0.9, NATIVE),   # upcast a little faster: within the switch ratio, stay native
    (1.0, 0.79, UPCAST),  # upcast clearly faster: leave the preferred native path
])
def test_native_instructions_prefer_native_unless_the_upcast_is_clearly_faster(native_s, upcast_s, expected):
    measure, calls = timings(native_s, upcast_s)
    assert choose_path(capability(kernel=True, native_flags=True), BF16, measure) == expected
    assert len(calls) == 1


@pytest.mark.parametrize("native_s, upcast_s, expected", [
    (1.0, 0.3, UPCAST),   # upcast much faster
    (0.9, 1.0, UPCAST),   # native a little faster: emulated bf16 stays on the preferred upcast
    (0.79, 1.0, NATIVE),  # native clearly faster (e.g. oneDNN's AVX512 emulation): take it
])
def test_emulated_half_precision_prefers_the_upcast_unless_native_is_clearly_faster(native_s, upcast_s, expected):
    measure, _ = timings(native_s, upcast_s)
    assert choose_path(capability(kernel=True, native_flags=False), BF16, measure) == expected


def test_native_instructions_are_per_dtype():
    bf16_cpu = capability(kernel=True, native_flags=True, dtype=BF16)  # avx512_bf16 says nothing about fp16
    assert bf16_cpu.has_native_instructions(BF16) and not bf16_cpu.has_native_instructions(FP16)
    measure, _ = timings(native_s=0.9, upcast_s=1.0)
    assert choose_path(bf16_cpu, FP16, measure) == UPCAST
    assert choose_path(capability(kernel=True, native_flags=True, dtype=FP16), FP16, measure) == NATIVE


def test_shape_classes():
    assert shape_class(1) == shape_class(matmul.DECODE_MAX_ROWS) == matmul.DECODE
    assert shape_class(matmul.DECODE_MAX_ROWS + 1) == shape_class(4096) == matmul.PREFILL


def test_each_class_is_measured_once_per_process(monkeypatch):
    measured = []
    monkeypatch.setattr(matmul, "detected_capability", lambda: capability(kernel=True, native_flags=True))
    monkeypatch.setattr(matmul, "measure_paths", lambda dtype, cls: measured.append((dtype, cls)) or
                        ((1.0, 0.5) if cls == matmul.PREFILL else (0.5, 1.0)))
    matmul.cpu_path.cache_clear()
    try:
        w = torch.randn(8, 16).to(BF16)
        for _ in range(3):
            assert matmul.uses_native_kernel(w, 4)
            assert not matmul.uses_native_kernel(w, 1000)
        assert sorted(measured, key=str) == [(BF16, matmul.DECODE), (BF16, matmul.PREFILL)]
        assert matmul.uses_native_kernel(w.float(), 1000)  # float32 weights never take the upcast
    finally:
        matmul.cpu_path.cache_clear()


def test_cpuinfo_flags_are_read_from_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    assert cpuinfo_flags(str(info)) == {"fpu", "avx2", "avx512_bf16", "amx_tile"}
    assert cpuinfo_flags(str(tmp_path / "missing")) == frozenset()


@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("rows, out_features", [(3, 40), (70, 300), (5, 70000)])  # the last one is upcast in blocks
def test_upcast_and_native_agree_with_a_float64_reference(dtype, rows, out_features):
    torch.manual_seed(0)
    in_features = 64 if out_features > 1000 else 96
    x = torch.randn(rows, in_features).to(dtype)
    w = (torch.randn(out_features, in_features) * 0.1).to(dtype)
    b = torch.randn(out_features).to(dtype)
    reference = F.linear(x.double(), w.double(), b.double())
    eps = torch.finfo(dtype).eps
    tolerance = 4 * eps * (reference.abs() + 1)  # a few roundings of the output, with fp32 accumulation
    upcast = matmul._upcast_linear(x, w, b)
    native = F.linear(x, w, b)
    assert upcast.dtype == native.dtype == dtype
    assert ((upcast.double() - reference).abs() <= tolerance).all()
    assert ((native.double() - reference).abs() <= tolerance).all()


@pytest.mark.parametrize("rows", [1, matmul.GEMV_MAX_ROWS, matmul.GEMV_MAX_ROWS + 1])
def test_few_row_bf16_products_take_torchs_kernel_with_fp32_accumulation(monkeypatch, rows):
    """Up to GEMV_MAX_ROWS rows a bf16 product is torch's own (even where the class's path is the upcast),
    accurate to a few bf16 roundings of the output over 4096 inputs (float32 accumulation); above, the class's."""
    monkeypatch.setattr(matmul, "uses_native_kernel", lambda weight, rows: False)  # as on AVX2 without oneDNN bf16
    torch.manual_seed(0)
    x, w = torch.randn(rows, 4096).to(BF16), torch.randn(300, 4096).to(BF16)
    out = matmul.linear(x, w)
    expected = F.linear(x, w) if rows <= matmul.GEMV_MAX_ROWS else matmul._upcast_linear(x, w, None)
    assert torch.equal(out, expected)
    reference = F.linear(x.double(), w.double())
    assert ((out.double() - reference).abs() <= 4 * torch.finfo(BF16).eps * (reference.abs() + 1)).all()
    assert torch.equal(matmul.linear(x.half(), w.half()), matmul._upcast_linear(x.half(), w.half(), None))
