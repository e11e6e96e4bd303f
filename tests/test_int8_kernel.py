"""The int8 weight-only kernel over interleaved weights (`tandem.layers.int8_kernel`) against a float64 product
of the same int8 values and scales, at the row counts its loops split differently (one row; pairs; an odd
row left over), the layout's round trip, and the fallback when the kernel cannot be built."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from tandem.layers import int8_kernel
from tandem.layers.weight_only import Int8WeightOnly


def machine_can_build() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and shutil.which("cc") is not None


def test_the_kernel_is_built_where_the_machine_can_build_it():
    assert int8_kernel.available() == machine_can_build()


def weights(out_features: int, in_features: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (out_features, in_features), generator=gen, dtype=torch.int8)
    return q, torch.rand(out_features, generator=gen) * 0.01 + 1e-4, gen


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("out_features,in_features", [(64, 256), (8, 16), (132, 48)])
def test_packed_matmul_equals_the_float64_product(rows, out_features, in_features):
    assert int8_kernel.available(), "the int8 kernel could not be built on this machine (see the test above)"
    q, scales, gen = weights(out_features, in_features, rows * 1000 + out_features + in_features)
    x = torch.randn(rows, in_features, generator=gen)
    expected = x.double() @ (q.double() * scales.double()[:, None]).T
    out = int8_kernel.int8_packed_matmul(x, int8_kernel.pack(q), scales)
    assert out.shape == (rows, out_features) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_the_layout_round_trips_row_blocks():
    q, _, _ = weights(24, 64, 0)
    packed = int8_kernel.pack(q)
    assert packed.shape == (6, 4, 4, 16) and packed.numel() == q.numel()
    assert torch.equal(packed[1, 2, 3], q[4 + 3, 32:48])  # group 1 = rows 4..7, block 2 = inputs 32..47
    for start, count in ((0, 24), (4, 8), (20, 4)):
        assert torch.equal(int8_kernel.unpack_rows(packed, start, count), q[start:start + count])
    with pytest.raises(ValueError):
        int8_kernel.unpack_rows(packed, 2, 4)


def test_int8_weight_only_uses_the_layout_only_where_the_kernel_runs_and_the_sizes_allow():
    w = torch.randn(64, 48)
    assert Int8WeightOnly(w).packed == int8_kernel.available()
    assert not Int8WeightOnly(torch.randn(63, 48)).packed and not Int8WeightOnly(torch.randn(64, 40)).packed


def test_bad_inputs_are_refused():
    packed, scales = int8_kernel.pack(torch.zeros(4, 16, dtype=torch.int8)), torch.ones(4)
    with pytest.raises(TypeError):
        int8_kernel.int8_packed_matmul(torch.zeros(1, 16, dtype=torch.bfloat16), packed, scales)
    with pytest.raises(ValueError):
        int8_kernel.int8_packed_matmul(torch.zeros(1, 32), packed, scales)
    with pytest.raises(ValueError):
        int8_kernel.int8_packed_matmul(torch.zeros(1, 32)[:, ::2], packed, scales)
    with pytest.raises(ValueError):
        int8_kernel.int8_packed_matmul(torch.zeros(1, 16), torch.zeros(4, 16, dtype=torch.int8), scales)


def test_an_unwritable_cache_falls_back_to_the_temporary_directory(monkeypatch, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(blocked / "cache"))
    monkeypatch.setattr(int8_kernel.tempfile, "gettempdir", lambda: str(tmp_path))
    int8_kernel._library.cache_clear()
    try:
        assert int8_kernel.available() == machine_can_build()
        built = list((tmp_path / f"tandem-cache-{os.getuid()}").glob("*.so"))
        assert len(built) == (1 if machine_can_build() else 0)
    finally:
        int8_kernel._library.cache_clear()


def test_without_a_compiler_it_is_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(int8_kernel.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(int8_kernel.shutil, "which", lambda name: None)
    int8_kernel._library.cache_clear()
    try:
        assert not int8_kernel.available()
        assert not Int8WeightOnly(torch.randn(64, 48)).packed
        assert list(tmp_path.iterdir()) == []
    finally:
        int8_kernel._library.cache_clear()
