"""Per-layer decode attention on CPU: this tree's `paged_attention` (with its reused workspace, and with fresh
tensors) against an older `paged_attention.py` given by --baseline, side by side, alternating repetitions.

    .venv/bin/python bench/decode_attention.py [--baseline /path/to/old/tandem/layers/paged_attention.py]

The baseline module is loaded from its file and driven through its `paged_decode_attention(q, k_cache,
v_cache, key_slots, key_owner, scaling, chunk_tokens)` on a [pages, page_size, Hkv, D] pool (the varlen
formulation this tree replaced). Requests of one case all have the same context, except the "mixed" case
(contexts drawn uniformly from 1 .. the given length). Prints thread CPU ms per call (median), the host-side
metadata build per step, and the largest difference between old and new outputs."""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tandem.layers.attention_workspace import AttentionWorkspace
from tandem.layers.paged_attention import DEFAULT_WORKSPACE_BYTES, decode_chunk_keys, paged_decode_attention, write_kv
from tandem.layers.paged_metadata import PagedAttentionMetadata


def load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("baseline_paged_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def thread_ms(fn) -> float:
    start = time.thread_time()
    fn()
    return (time.thread_time() - start) * 1e3


def run_case(args, baseline, num_requests: int, context: int, mixed: bool) -> dict:
    gen = torch.Generator().manual_seed(context * 1000 + num_requests)
    heads, kv_heads, dim, page_size, dtype = args.q_heads, args.kv_heads, args.head_dim, args.page_size, args.dtype
    lengths = (torch.randint(1, context + 1, (num_requests,), generator=gen) if mixed
               else torch.full((num_requests,), context)).tolist()
    pages_per = [-(-n // page_size) for n in lengths]
    num_pages = sum(pages_per) + 8
    order = torch.randperm(num_pages, generator=gen).tolist()
    tables, at = [], 0
    for count in pages_per:
        tables.append(order[at:at + count])
        at += count
    k_cache = torch.randn(kv_heads, num_pages, page_size, dim, generator=gen).to(dtype)
    v_cache = torch.randn(kv_heads, num_pages, page_size, dim, generator=gen).to(dtype)
    q = torch.randn(num_requests, heads, dim, generator=gen).to(dtype)
    scaling = dim ** -0.5
    chunk_keys = decode_chunk_keys(DEFAULT_WORKSPACE_BYTES, heads, kv_heads, dim, dtype)
    prefixes = [n - 1 for n in lengths]

    def build():
        return PagedAttentionMetadata.build(tables, prefixes, [1] * num_requests, page_size, chunk_keys)

    meta = build()
    # the step's own keys/values, as paged_attention writes them before attending
    new_k, new_v = k_cache[:, 0, 0].expand(num_requests, -1, -1), v_cache[:, 0, 0].expand(num_requests, -1, -1)
    write_kv(k_cache, v_cache, meta.slot_mapping, new_k, new_v)
    workspace = AttentionWorkspace(DEFAULT_WORKSPACE_BYTES)

    def new(workspace):
        out = torch.empty_like(q)
        for group in meta.decode_groups:
            out.index_copy_(0, group.rows, paged_decode_attention(q.index_select(0, group.rows), k_cache, v_cache,
                                                                  group, scaling, workspace))
        return out

    variants = {"new": lambda: new(workspace), "new_fresh_tensors": lambda: new(None), "metadata_build": build}
    outputs = {"new": new(workspace)}
    if baseline is not None:
        old_k = k_cache.permute(1, 2, 0, 3).contiguous()  # [pages, page_size, Hkv, D]
        old_v = v_cache.permute(1, 2, 0, 3).contiguous()
        slots = [table[t // page_size] * page_size + t % page_size for table, n in zip(tables, lengths)
                 for t in range(n)]
        key_slots = torch.tensor(slots)
        key_owner = torch.repeat_interleave(torch.arange(num_requests), torch.tensor(lengths))
        chunk_tokens = baseline.decode_chunk_tokens(DEFAULT_WORKSPACE_BYTES, heads, kv_heads, dim, dtype)
        variants["old"] = lambda: baseline.paged_decode_attention(q, old_k, old_v, key_slots, key_owner, scaling,
                                                                  chunk_tokens)
        outputs["old"] = variants["old"]()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for rep in range(args.reps):  # the order rotates: no variant always runs right after another
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            times[name].append(thread_ms(variants[name]))
    row = {"requests": num_requests, "context": "mixed 1.." + str(context) if mixed else context,
           "groups": len(meta.decode_groups), "workspace_mb": round(workspace.nbytes / 2**20, 1)}
    row.update({f"{name}_ms": round(statistics.median(t), 3) for name, t in times.items()})
    if baseline is not None:
        row["speedup"] = round(row["old_ms"] / row["new_ms"], 1)
        row["max_abs_diff"] = float((outputs["old"].float() - outputs["new"].float()).abs().max())
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="an older tandem/layers/paged_attention.py to compare with")
    parser.add_argument("--contexts", type=int, nargs="+", default=[100, 640, 2000])
    parser.add_argument("--requests", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--q-heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    torch.set_num_threads(1)
    baseline = load_baseline(args.baseline) if args.baseline else None
    with torch.inference_mode():
        for context in args.contexts:
            for num_requests in args.requests:
                print(json.dumps(run_case(args, baseline, num_requests, context, mixed=False)), flush=True)
        for num_requests in args.requests:
            print(json.dumps(run_case(args, baseline, num_requests, max(args.contexts), mixed=True)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
