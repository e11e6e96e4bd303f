"""llama.cpp side of bench/weight_only.py, run with the llama-cpp-python venv's interpreter:

    VENV/bin/python bench/llamacpp_decode.py MODEL_DIR --gguf-bf16 FILE [--batches 1,16]

Quantizes the BF16 GGUF (made by bench/gguf_convert.py from MODEL_DIR's safetensors) to Q8_0 and Q4_0 with
llama.cpp's own quantizer (`llama_model_quantize`, what `llama-quantize` runs), then for each of BF16, Q8_0,
Q4_0 and each batch size: prefills `batch` random prompts as separate sequences in one llama_decode, then
decodes greedily one token per sequence per llama_decode, one thread. Prints one JSON line: decode tokens/s
= batch / median step time, per format and batch, and each file's size."""

from __future__ import annotations

import argparse
import ctypes
import json
import random
import statistics
import time
from pathlib import Path


def quantize(src: Path, dst: Path, ftype: int) -> None:
    import llama_cpp as L

    if dst.exists():
        return
    params = L.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 1
    if L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {dst}")


def fill(batch, entries) -> None:
    """entries: (token, position, sequence, wants_logits)."""
    batch.n_tokens = len(entries)
    for i, (token, pos, seq, logits) in enumerate(entries):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
        batch.seq_id[i][0] = seq


def decode_rate(gguf: Path, batch_size: int, input_len: int, output_len: int, vocab: int) -> float:
    import llama_cpp as L
    import numpy as np

    model = L.llama_model_load_from_file(str(gguf).encode(), L.llama_model_default_params())
    cp = L.llama_context_default_params()
    cp.n_ctx = batch_size * (input_len + output_len + 16)
    cp.n_batch = cp.n_ubatch = max(512, batch_size * input_len)
    cp.n_seq_max = batch_size
    cp.n_threads = cp.n_threads_batch = 1
    ctx = L.llama_init_from_model(model, cp)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(cp.n_batch, 0, 1)
    rng = random.Random(batch_size)
    try:
        fill(batch, [(rng.randrange(10, vocab), pos, seq, pos == input_len - 1)
                     for seq in range(batch_size) for pos in range(input_len)])
        assert L.llama_decode(ctx, batch) == 0
        rows = [seq * input_len + input_len - 1 for seq in range(batch_size)]
        steps = []
        for step in range(output_len):
            nxt = [int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, r), shape=(n_vocab,)).argmax())
                   for r in rows]
            fill(batch, [(tok, input_len + step, seq, True) for seq, tok in enumerate(nxt)])
            start = time.perf_counter()
            assert L.llama_decode(ctx, batch) == 0
            steps.append(time.perf_counter() - start)
            rows = list(range(batch_size))
        return batch_size / statistics.median(steps[2:])
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)


def main() -> None:
    import llama_cpp as L

    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--gguf-bf16", required=True)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    vocab = json.loads((Path(args.model_dir) / "config.json").read_text())["vocab_size"]
    L.llama_backend_init()
    bf16 = Path(args.gguf_bf16)
    files = {"BF16": bf16, "Q8_0": bf16.with_name(bf16.stem + "-q8_0.gguf"),
             "Q4_0": bf16.with_name(bf16.stem + "-q4_0.gguf")}
    quantize(bf16, files["Q8_0"], L.LLAMA_FTYPE_MOSTLY_Q8_0)
    quantize(bf16, files["Q4_0"], L.LLAMA_FTYPE_MOSTLY_Q4_0)
    out = {"llama_cpp_python": L.__version__, "system_info": L.llama_print_system_info().decode(), "formats": {}}
    for name, path in files.items():
        rates = {b: max(decode_rate(path, b, args.input_len, args.output_len, vocab) for _ in range(args.reps))
                 for b in (int(x) for x in args.batches.split(","))}
        out["formats"][name] = {"decode_tokens_per_s": rates, "file_bytes": path.stat().st_size}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
