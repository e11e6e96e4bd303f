"""HF safetensors -> BF16 GGUF with llama.cpp's own `convert_hf_to_gguf.py` (from the llama-cpp-python sdist),
for bench/weight_only.py:

    .venv/bin/python bench/gguf_convert.py MODEL_DIR OUT.gguf --src DIR_WITH_convert_hf_to_gguf.py

The bench checkpoints carry a small made-up BPE tokenizer (tokenizer.json, no sentencepiece model), whose
pre-tokenizer hash the converter does not know; it is declared "default" (the benchmark feeds token ids, so
tokenization never runs). Qwen3.5 checkpoints without MTP tensors are converted with --no-mtp."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("--src", required=True)
    args = parser.parse_args()
    sys.path[:0] = [args.src, f"{args.src}/gguf-py"]
    import convert_hf_to_gguf
    from conversion.base import TextModel

    def no_sentencepiece(self, *args, **kwargs):
        raise FileNotFoundError("no tokenizer.model")  # what the converter expects before trying tokenizer.json

    TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
    TextModel._create_vocab_sentencepiece = no_sentencepiece
    sys.argv = ["convert_hf_to_gguf.py", args.model_dir, "--outfile", args.out, "--outtype", "bf16"]
    if "Qwen3_5" in json.loads((Path(args.model_dir) / "config.json").read_text())["architectures"][0]:
        sys.argv.append("--no-mtp")
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
