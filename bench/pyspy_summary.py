"""Summarise a py-spy raw (collapsed-stack) profile per process: inclusive and self shares of the top functions.

    py-spy record --subprocesses --idle -r 100 --format raw -o prof.txt -- \\
        .venv/bin/python bench/pp_decode.py --model M --only "pp2 mb2" --seconds 20
    .venv/bin/python bench/pyspy_summary.py prof.txt [--top 25]

Only steady-state samples count: in a rank process those under `ModelRunner.execute` or waiting for the next
step in `rank_main`; in the driver those under `decode_run` (start-up and loading are left out). With
--idle, waiting (recv, poll) shows as time, so the shares are of wall time. "self" charges a sample to its
deepest tandem/torch/zmq frame."""

from __future__ import annotations

import argparse
import collections
import re
import sys


def frame_name(frame: str) -> str:
    return re.sub(r" \((.*?):\d+\)", r" (\1)", frame)


def load(path: str) -> dict[str, list[tuple[list[str], int]]]:
    processes: dict[str, list] = collections.defaultdict(list)
    for line in open(path):
        stack, _, count = line.rstrip().rpartition(" ")
        frames = stack.split(";")
        owner = [f for f in frames[:3] if f.startswith("process ")][-1]
        kind = "rank" if "tandem.executors.rank" in owner else "driver"
        processes[f"{owner.split(':')[0]} ({kind})"].append((frames, int(count)))
    return processes


def steady(kind: str, frames: list[str]) -> bool:
    if kind == "rank":
        return any("ModelRunner.execute" in f for f in frames) or (
            any("rank_main" in f for f in frames) and any("recv_multipart" in f for f in frames))
    return any("decode_run" in f for f in frames)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    for process, samples in load(args.profile).items():
        kind = "rank" if process.endswith("(rank)") else "driver"
        kept = [(f, c) for f, c in samples if steady(kind, f)]
        total = sum(c for _, c in kept)
        if not total:
            continue
        inclusive: collections.Counter = collections.Counter()
        own: collections.Counter = collections.Counter()
        for frames, count in kept:
            for name in {frame_name(f) for f in frames}:
                inclusive[name] += count
            ours = [frame_name(f) for f in frames if re.search(r"tandem/|torch/|zmq/", f)]
            own[ours[-1] if ours else frame_name(frames[-1])] += count
        print(f"\n=== {process}: {total} steady-state samples")
        print("-- inclusive")
        for name, count in inclusive.most_common(args.top + 6):
            if not name.startswith("process ") and "runpy" not in name and "<module>" not in name:
                print(f"{100 * count / total:6.1f}%  {name}")
        print("-- self")
        for name, count in own.most_common(args.top):
            print(f"{100 * count / total:6.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
