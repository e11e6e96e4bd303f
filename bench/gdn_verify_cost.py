"""What the Gated-DeltaNet verify commit (replay of the accepted tokens, `tandem/layers/gdn_verify.py`) costs
next to the verify forward itself, on CPU, one thread, for one layer of Qwen3-Next / Qwen3.5 shape (hidden
2048, 16 key heads and 32 value heads of 128), with B requests verifying k drafts each; and the memory the
alternative (one recurrent state per verified position, kept until the commit) would hold instead.

    .venv/bin/python bench/gdn_verify_cost.py [--batch 4] [--drafts 3] [--reps 20] [--out bench/results/x.json]

Prints and writes thread-CPU milliseconds (median over alternating repetitions) of: a plain decode step of
B tokens, the verify forward of B x (k+1) tokens, and the commit at j = k and at j = 0 accepted drafts."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tandem.layers.forward_batch import ForwardBatch
from tandem.layers.gated_delta_net import GatedDeltaNet
from tandem.layers.gdn_verify import VerifyLedger
from tandem.layers.span import Span
from tandem.parallel.layout import GroupInfo
from tandem.runtime.memory.state_pool import LinearStatePool

CONFIG = SimpleNamespace(hidden_size=2048, linear_key_head_dim=128, linear_value_head_dim=128,
                         linear_num_key_heads=16, linear_num_value_heads=32, linear_conv_kernel_dim=4,
                         rms_norm_eps=1e-6)


def thread_ms(fn) -> float:
    start = time.thread_time()
    fn()
    return (time.thread_time() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--drafts", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    B, k = args.batch, args.drafts
    layer = GatedDeltaNet(GroupInfo.alone(), CONFIG, layer_idx=0)
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(torch.randn(param.shape) * 0.02)
    pool = LinearStatePool([0], B, layer.conv_channels, CONFIG.linear_conv_kernel_dim, layer.num_v_heads,
                           layer.head_k_dim, layer.head_v_dim, torch.float32, "cpu")
    x_decode = torch.randn(B, CONFIG.hidden_size)
    x_verify = torch.randn(B * (k + 1), CONFIG.hidden_size)
    ledger = VerifyLedger()
    decode = ForwardBatch.build([Span(s, 10, 1) for s in range(B)], [0] * B)
    verify = ForwardBatch.build([Span(s, 10, k + 1) for s in range(B)], [0] * (B * (k + 1)), verify=range(B),
                                verify_ledger=ledger)
    decode.state_pool = verify.state_pool = pool
    times: dict[str, list[float]] = {"decode step": [], "verify forward": [], "commit j=k": [], "commit j=0": []}
    with torch.no_grad():
        for _ in range(args.reps):
            times["decode step"].append(thread_ms(lambda: layer(x_decode, decode)))
            for name, accepted in (("commit j=k", k), ("commit j=0", 0)):
                times["verify forward"].append(thread_ms(lambda: layer(x_verify, verify)))
                every = {s: accepted for s in range(B)}
                times[name].append(thread_ms(lambda: layer.commit_verified(pool, ledger, every)))  # noqa: B023
    ms = {name: statistics.median(values) for name, values in times.items()}
    state_bytes = layer.num_v_heads * layer.head_k_dim * layer.head_v_dim * 4
    record_bytes = (k + 1) * (layer.conv_channels + 2 * layer.num_v_heads) * 4
    result = {
        "machine": "AMD EPYC (2 cores), torch CPU, 1 thread",
        "batch": B, "drafts": k, "median_thread_ms": ms,
        "commit_over_verify": {name: ms[name] / ms["verify forward"] for name in ("commit j=k", "commit j=0")},
        "held_per_request_and_layer_bytes": {"replay inputs (this tree)": record_bytes,
                                             "a state per position (the alternative)": (k + 1) * state_bytes},
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
