"""The compiled int8 weight-only product (`tandem.layers.int8_kernel`) against a float64 product of the same
int8 values and scales, at the shapes its loops split differently (one row; two to nine rows in passes of
four; channels not a multiple of four; inputs not a multiple of sixteen), and its fallback when it cannot be
built."""

from __future__ import annotations

import shutil

import pytest
import torch

from tandem.layers import int8_kernel


def test_the_kernel_is_built_where_the_machine_can_build_it():
    can = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and shutil.which("cc") is not None
    assert int8_kernel.available() == can


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("out_features,in_features", [(64, 256), (67, 200), (5, 15), (1, 1)])
def test_int8_matmul_equals_the_float64_product(rows, out_features, in_features):
    if not int8_kernel.available():
        pytest.fail("the int8 kernel could not be built on this machine (see the test above)")
    gen = torch.Generator().manual_seed(rows * 1000 + out_features + in_features)
    q = torch.randint(-127, 128, (out_features, in_features), generator=gen, dtype=torch.int8)
    scales = torch.rand(out_features, generator=gen) * 0.01 + 1e-4
    x = torch.randn(rows, in_features, generator=gen)
    expected = x.double() @ (q.double() * scales.double()[:, None]).T
    out = int8_kernel.int8_matmul(x, q, scales)
    assert out.shape == (rows, out_features) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_bad_inputs_are_refused():
    q, scales = torch.zeros(4, 8, dtype=torch.int8), torch.ones(4)
    with pytest.raises(TypeError):
        int8_kernel.int8_matmul(torch.zeros(1, 8, dtype=torch.bfloat16), q, scales)
    with pytest.raises(ValueError):
        int8_kernel.int8_matmul(torch.zeros(1, 9), q, scales)
    with pytest.raises(ValueError):
        int8_kernel.int8_matmul(torch.zeros(1, 16)[:, ::2], q, scales)


def test_without_a_compiler_it_is_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setattr(int8_kernel.shutil, "which", lambda name: None)
    int8_kernel._library.cache_clear()
    try:
        assert not int8_kernel.available()
        assert list(tmp_path.iterdir()) == []
    finally:
        int8_kernel._library.cache_clear()
