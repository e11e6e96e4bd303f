#!/usr/bin/env python
"""Train Tandem's bundled default model (models/default): a tiny Qwen3.5-MoE that adds numbers and counts.

The model is a real `Qwen3_5MoeForCausalLM` from transformers (8 layers: 3 Gated DeltaNet linear-attention
layers then 1 gated full-attention layer, twice; every layer a top-2 MoE with a shared expert), so that
pp=2 and pp=4 split it into meaningful stages. It learns the tasks in `tandem.evaluation`: addition,
"12+345=" -> "357<|im_end|>", and counting (long answers), "17..31=" -> "17 18 ... 31<|im_end|>", both as a
raw completion and inside a ChatML chat turn. The tokenizer is byte-level with no merges (one token per
character) plus three ChatML special tokens.

It also trains the model's multi-token-prediction head (`mtp.*`, `mtp_num_hidden_layers: 1`; the draft model
of speculative decoding, NEXTN), unrolled over `--mtp-steps` chained drafts (`scripts/mtp_training.py`), on
the answers of both tasks, and reports its offline accept length on the held-out counting problems.

    python scripts/train_default_model.py                 # writes models/default (CPU, one thread)
    python scripts/train_default_model.py --steps 200 --out /tmp/m   # a quick smoke run
    python scripts/train_default_model.py --init-from models/default --steps 1500 --lr 1e-3 --warmup 50
        # continue from a trained model (how the committed model got its counting task and MTP head)

Training draws fresh problems every step (never a held-out one, see `TrainingSampler`), computes the loss on
the answer tokens only, and reports held-out exact-match accuracy measured teacher-forced: the argmax at
every answer position (EOS included) equals the target, which is exactly "greedy decoding returns the
answer and stops". The final check is done with Tandem itself (`--verify-pp`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtp_training import TrainingMTPHead, checkpoint_tensors, mtp_loss, offline_accept  # noqa: E402

from tandem.evaluation import TrainingSampler, heldout_problems  # noqa: E402
from tandem.evaluation.counting import CountProblem, CountTrainingSampler, heldout_count_problems  # noqa: E402

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
ROLE_TOKENS = ("system", "user", "assistant")
VOCAB_SIZE = 272  # 256 byte tokens + 3 specials + 3 role names, padded to a multiple of 16 (262..271 unused)
MAX_POSITIONS = 128


# ---- tokenizer -------------------------------------------------------------------------------------------
def build_tokenizer():
    """Byte-level BPE without merges: every byte is one token (ids 0..255), then the ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([PAD, IM_START, IM_END])
    tok.add_tokens(list(ROLE_TOKENS))  # one token per ChatML role name keeps chat prompts short
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD,
                                   model_max_length=MAX_POSITIONS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode, so that token id == byte value."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(map(chr, cs), bs))[ch]


# ---- model -----------------------------------------------------------------------------------------------
def build_config(tokenizer):
    from transformers import Qwen3_5MoeTextConfig

    layer_types = ["linear_attention"] * 3 + ["full_attention"]
    config = Qwen3_5MoeTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        num_hidden_layers=8,
        layer_types=layer_types * 2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        linear_conv_kernel_dim=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=96,
        shared_expert_intermediate_size=128,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        router_aux_loss_coef=0.001,
        output_router_logits=True,
    )
    config.architectures = ["Qwen3_5MoeForCausalLM"]
    config.mtp_num_hidden_layers = 1
    return config


# ---- data ------------------------------------------------------------------------------------------------
CHAT_QUESTIONS = (("{a}+{b}", 0.7), ("{a} + {b}", 0.15), ("{a}+{b}=", 0.15))


def render_example(problem, tokenizer, rng: random.Random, chat: bool) -> tuple[list[int], int]:
    """(token ids of prompt + answer + EOS, index of the first answer token)."""
    if chat and isinstance(problem, CountProblem):
        messages = problem.chat_messages()
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    elif chat:
        r, question = rng.random(), CHAT_QUESTIONS[0][0]
        for template, p in CHAT_QUESTIONS:
            if r < p:
                question = template
                break
            r -= p
        messages = [{"role": "user", "content": question.format(a=problem.a, b=problem.b)}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        prompt = problem.completion_prompt
    prompt_ids = tokenizer.encode(prompt)
    return prompt_ids + tokenizer.encode(problem.answer) + [tokenizer.eos_token_id], len(prompt_ids)


def collate(examples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels (-100 outside the answer). Right padding needs no attention mask in a
    causal model: real tokens never see the padding after them."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, (ids, start) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, start: len(ids)] = torch.tensor(ids[start:])
    return input_ids, labels


@torch.no_grad()
def exact_match(model, tokenizer, problems, chat: bool) -> float:
    """Teacher-forced exact match == greedy decoding gives exactly answer + EOS."""
    model.eval()
    rng = random.Random(0)
    examples = []
    for p in problems:
        if chat:  # evaluate the canonical chat form only
            prompt = tokenizer.apply_chat_template(p.chat_messages(), tokenize=False, add_generation_prompt=True)
            ids = tokenizer.encode(prompt)
            examples.append((ids + tokenizer.encode(p.answer) + [tokenizer.eos_token_id], len(ids)))
        else:
            examples.append(render_example(p, tokenizer, rng, chat=False))
    input_ids, labels = collate(examples, tokenizer.pad_token_id)
    logits = model(input_ids=input_ids).logits
    pred = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    ok = ((pred == target) | (target == -100)).all(dim=1)
    model.train()
    return ok.float().mean().item()


# ---- training --------------------------------------------------------------------------------------------
def use_small_gdn_chunks(chunk_size: int) -> None:
    """transformers' reference (pure PyTorch) chunked Gated DeltaNet pads every sequence to a multiple of 64;
    our sequences are ~10-25 tokens, so smaller chunks cut the training cost about in half. The chunked
    algorithm is exact for any chunk size: this changes speed, not the function being trained."""
    import functools

    import transformers.models.qwen3_5_moe.modeling_qwen3_5_moe as qwen3_5_moe

    original = getattr(qwen3_5_moe.torch_chunk_gated_delta_rule, "_tandem_original",
                       qwen3_5_moe.torch_chunk_gated_delta_rule)
    patched = functools.partial(original, chunk_size=chunk_size)
    patched._tandem_original = original
    qwen3_5_moe.torch_chunk_gated_delta_rule = patched


def build_model(args, tokenizer):
    """A fresh model, or a trained one to continue from (`--init-from`); with its MTP head (fresh, or the
    checkpoint's when it has one)."""
    from safetensors.torch import load_file
    from transformers import Qwen3_5MoeForCausalLM

    if args.init_from:
        model = Qwen3_5MoeForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
        model.config.output_router_logits = True
        model.config.mtp_num_hidden_layers = 1
    else:
        model = Qwen3_5MoeForCausalLM(build_config(tokenizer))
    attn_layers = [i for i, t in enumerate(model.config.layer_types) if t == "full_attention"]
    head = TrainingMTPHead(model.config, model.model.layers[attn_layers[-1]], model.model.norm)
    if args.init_from and getattr(model.config, "mtp_num_hidden_layers", 0):
        saved = {k: v for k, v in load_file(Path(args.init_from) / "model.safetensors").items()
                 if k.startswith("mtp.")}
        if saved:
            head.load_state_dict(head_state_from_checkpoint(saved, head))
    return model, head


def head_state_from_checkpoint(saved: dict, head) -> dict:
    """Inverse of `checkpoint_tensors`: per-expert `mtp.*` tensors back into the head's fused parameters."""
    state = {}
    for name, p in head.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            base = "mtp." + name[: -len("gate_up_proj")]
            state[name] = torch.stack([torch.cat([saved[f"{base}{e}.gate_proj.weight"], saved[f"{base}{e}.up_proj.weight"]])
                                       for e in range(p.shape[0])])
        elif name.endswith("mlp.experts.down_proj"):
            base = "mtp." + name[: -len("down_proj")]
            state[name] = torch.stack([saved[f"{base}{e}.down_proj.weight"] for e in range(p.shape[0])])
        else:
            state[name] = saved["mtp." + name]
    return state


def training_batch(args, step: int, samplers, tokenizer, rng):
    """A batch of counting problems (long answers) with probability `--count-fraction`, else addition."""
    counting = rng.random() < args.count_fraction
    sampler, size = (samplers[1], args.count_batch_size) if counting else (samplers[0], args.batch_size)
    examples = [render_example(sampler(), tokenizer, rng, chat=rng.random() < args.chat_fraction)
                for _ in range(size)]
    return collate(examples, tokenizer.pad_token_id)


def evaluate(model, tokenizer, heldout, heldout_count) -> dict:
    return {"heldout_acc": exact_match(model, tokenizer, heldout, chat=False),
            "chat_acc": exact_match(model, tokenizer, heldout, chat=True),
            "count_acc": exact_match(model, tokenizer, heldout_count, chat=False),
            "count_chat_acc": exact_match(model, tokenizer, heldout_count, chat=True)}


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    use_small_gdn_chunks(args.gdn_chunk_size)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    model, head = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params / 1e6:.2f}M (MTP head {sum(p.numel() for p in head.parameters()) / 1e6:.2f}M)",
          flush=True)

    heldout, heldout_count = heldout_problems(), heldout_count_problems()
    samplers = (TrainingSampler(seed=args.seed, heldout=heldout),
                CountTrainingSampler(seed=args.seed + 2, heldout=heldout_count))
    rng = random.Random(args.seed + 1)
    named = list(model.named_parameters()) + [("mtp." + n, p) for n, p in head.named_parameters()]
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        if args.max_minutes:  # the schedule ends with the time budget when that comes first
            progress = max(progress, (time.time() - start) / (args.max_minutes * 60))
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    captured = {}
    model.model.norm.register_forward_hook(lambda module, inputs, out: captured.__setitem__("hidden", out))
    start, cpu_start = time.time(), time.process_time()
    history = []
    model.train()
    step = 0
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        input_ids, labels = training_batch(args, step, samplers, tokenizer, rng)
        out = model(input_ids=input_ids, labels=labels)
        outs = head.chain(captured["hidden"].detach(), input_ids, model.model.embed_tokens.weight,
                          model.model.rotary_emb, args.mtp_steps)
        draft_loss = mtp_loss(outs, labels, model.lm_head.weight)
        opt.zero_grad(set_to_none=True)
        (out.loss + args.mtp_weight * draft_loss).backward()
        torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed, cpu = time.time() - start, time.process_time() - cpu_start
            line = (f"step {step:5d}  loss {out.loss.item():.4f}  mtp {draft_loss.item():.4f}  lr {lr_at(step):.2e}  "
                    f"{elapsed:6.0f}s (cpu {cpu:5.0f}s)")
            if step % args.eval_every == 0 or step == args.steps - 1:
                scores = evaluate(model, tokenizer, heldout, heldout_count)
                history.append({"step": step, "seconds": round(elapsed), "cpu_seconds": round(cpu), **scores})
                line += "  " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items())
            print(line, flush=True)
        if args.max_minutes and time.time() - start > args.max_minutes * 60:
            print(f"time budget of {args.max_minutes} min reached at step {step}", flush=True)
            break
    seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start
    scores = evaluate(model, tokenizer, heldout, heldout_count)
    accept = offline_accept(model, head, count_sequences(tokenizer, heldout_count), args.mtp_steps)
    print(f"final held-out exact match: {scores} after {step + 1} steps, {seconds:.0f}s wall, "
          f"{cpu_seconds:.0f}s CPU; MTP offline on counting: {accept}", flush=True)
    summary = {"steps": step + 1, "train_seconds": round(seconds), "train_cpu_seconds": round(cpu_seconds),
               "heldout_exact_match": scores["heldout_acc"], "heldout_chat_exact_match": scores["chat_acc"],
               "heldout_count_exact_match": scores["count_acc"],
               "heldout_count_chat_exact_match": scores["count_chat_acc"], "mtp_offline_counting": accept,
               "parameters": n_params, "args": vars(args), "history": history}
    previous = Path(args.init_from) / "training_summary.json" if args.init_from else None
    if previous and previous.is_file():  # the whole lineage of a continued model
        summary["continued_from"] = json.loads(previous.read_text())
    save(model, head, tokenizer, Path(args.out), summary)
    return summary


def count_sequences(tokenizer, problems) -> list[tuple[list[int], int]]:
    """Completion-form counting sequences (prompt + answer + EOS) with the index of the first answer token."""
    out = []
    for p in problems:
        prompt = tokenizer.encode(p.completion_prompt)
        out.append((prompt + tokenizer.encode(p.answer) + [tokenizer.eos_token_id], len(prompt)))
    return out


def save(model, head, tokenizer, out_dir: Path, summary: dict) -> None:
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.config.use_cache = True
    model.config.mtp_num_hidden_layers = 1
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    weights = out_dir / "model.safetensors"
    tensors = {**load_file(weights), **checkpoint_tensors(head)}  # transformers saves no mtp.*: add them
    save_file(tensors, weights, metadata={"format": "pt"})
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    if config.get("mtp_num_hidden_layers") != 1:
        raise SystemExit(f"config.json lost mtp_num_hidden_layers: {config.get('mtp_num_hidden_layers')}")
    (out_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for f in out_dir.iterdir():  # save_pretrained writes the safetensors file owner-only (0600)
        if f.is_file():
            f.chmod(0o644)
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    print(f"saved {out_dir} ({size / 1e6:.1f} MB)", flush=True)
    if size > 20e6:
        raise SystemExit(f"model directory is {size / 1e6:.1f} MB, over the 20 MB budget")


def verify_with_tandem(model_dir: str, pp_size: int, n: int = 20) -> None:
    """Greedy decoding through Tandem's own engine on the first `n` held-out problems of each task."""
    from tandem.engine import Engine
    from tandem.evaluation import MAX_ANSWER_TOKENS, is_correct
    from tandem.evaluation.counting import MAX_ANSWER_TOKENS as COUNT_TOKENS
    from tandem.evaluation.counting import is_count_correct

    problems, counts = heldout_problems()[:n], heldout_count_problems()[:n]
    with Engine(model_dir, pp_size=pp_size, progress=False) as engine:
        outs = engine.generate(prompt=[p.completion_prompt for p in problems],
                               sampling_params={"temperature": 0, "max_new_tokens": MAX_ANSWER_TOKENS})
        count_outs = engine.generate(prompt=[p.completion_prompt for p in counts],
                                     sampling_params={"temperature": 0, "max_new_tokens": COUNT_TOKENS})
    right = sum(is_correct(o["text"], p) for o, p in zip(outs, problems))
    right_count = sum(is_count_correct(o["text"], p) for o, p in zip(count_outs, counts))
    for p, o in list(zip(problems, outs))[:3] + list(zip(counts, count_outs))[:3]:
        print(f"  {p.completion_prompt}{o['text']!r}")
    print(f"tandem pp={pp_size}: addition {right}/{n}, counting {right_count}/{n} correct", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "models" / "default"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--chat-fraction", type=float, default=0.5, help="share of chat-formatted examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gdn-chunk-size", type=int, default=16, help="Gated DeltaNet chunk size in training")
    parser.add_argument("--max-minutes", type=float, default=0, help="stop early after this long (0 = no limit)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--init-from", default="", help="continue from this trained model directory")
    parser.add_argument("--count-fraction", type=float, default=0.5, help="share of counting batches")
    parser.add_argument("--count-batch-size", type=int, default=32)
    parser.add_argument("--mtp-steps", type=int, default=3, help="chained MTP drafts unrolled in training")
    parser.add_argument("--mtp-weight", type=float, default=1.0)
    parser.add_argument("--verify-pp", type=int, default=2, help="check with Tandem at this pp size (0 = skip)")
    args = parser.parse_args(argv)
    train(args)
    if args.verify_pp:
        verify_with_tandem(args.out, args.verify_pp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
