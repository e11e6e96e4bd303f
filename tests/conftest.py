"""Shared pytest setup: offline Hugging Face, small thread count, and the session-scoped `ckpt` builder."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:  # make `import support.checkpoints` work regardless of pytest's import mode
    sys.path.insert(0, _TESTS_DIR)

import pytest  # noqa: E402
import torch  # noqa: E402

# NOTE: one thread: on this 2-core machine, shared with other test runs, two OpenMP threads make tiny ops
# 5-15x slower (each parallel region waits for a descheduled thread); measured 407 s vs 28 s for the
# single-process model tests under load.
torch.set_num_threads(1)


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """ckpt(kind, **build_checkpoint_kwargs) -> Path, built once per (kind, kwargs) per test session."""
    from support.checkpoints import build_checkpoint

    cache = {}

    def get(kind: str, **kwargs):
        key = (kind, _freeze(kwargs))
        path = cache.get(key)
        if path is None:
            out_dir = tmp_path_factory.mktemp(f"ckpt-{kind}")
            path = build_checkpoint(kind, out_dir, **kwargs)
            cache[key] = path
        return path

    return get
