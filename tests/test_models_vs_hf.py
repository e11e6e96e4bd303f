"""Every architecture against transformers (single process, tp=1 pp=1) on randomized checkpoints.

fp32: a batch of prompts of different lengths (one of 70 tokens, so Qwen3.5's chunked delta rule crosses a
64-token chunk) decoded greedily with ignore_eos; the tokens must equal transformers' greedy tokens
(tests.support.reference.hf_greedy, which recomputes the whole sequence at each step) and every token's
logprob must be within 1e-4. Checkpoint variants: both MoE expert layouts, multimodal with MTP, tied
embeddings, sharded files, chunked prefill. The worst difference measured is 3e-5 (qwen3_5, the 13-token
prompt; transformers and the engine both run the chunked gated delta rule in fp32 there); real bugs move
logprobs by 1e-2 or more.

bf16: see test_bf16_checkpoint.
"""

import math

import pytest
import torch

from support.checkpoints import KINDS, checkpoint_tensor_names
from support.reference import hf_greedy, hf_score
from tandem.engine import Engine
from tandem.runtime import model_runner

FP32_TOL = 1e-4
MAX_NEW = 8


def make_prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (length,), generator=gen).tolist()  # 0..2 are special tokens


PROMPTS = [make_prompt(5, 1), make_prompt(13, 2), make_prompt(70, 3)]


def engine_greedy(model_dir, prompts, max_new=MAX_NEW, dtype="float32", **engine_kw) -> list[dict]:
    with Engine(model_dir, dtype=dtype, progress=False, **engine_kw) as engine:
        return engine.generate(input_ids=prompts, return_logprob=True,
                               sampling_params={"temperature": 0, "max_new_tokens": max_new, "ignore_eos": True})


def assert_matches_reference(model_dir, prompts, outs, max_new=MAX_NEW, tol=FP32_TOL):
    refs = hf_greedy(model_dir, prompts, max_new)
    for i, (out, ref) in enumerate(zip(outs, refs)):
        lps = [lp for lp, _ in out["meta_info"]["output_token_logprobs"]]
        assert [tok for _, tok in out["meta_info"]["output_token_logprobs"]] == out["output_ids"]
        assert out["output_ids"] == ref["output_ids"], f"prompt {i} (length {len(prompts[i])}): greedy tokens differ"
        worst = max(abs(a - b) for a, b in zip(lps, ref["logprobs"]))
        assert worst <= tol, f"prompt {i} (length {len(prompts[i])}): logprob differs by {worst:.2e} > {tol}"
        assert out["meta_info"]["completion_tokens"] == max_new
        assert out["meta_info"]["finish_reason"]["type"] == "length"


_BASE_OUTPUTS: dict[str, list[dict]] = {}


def base_outputs(ckpt, kind) -> list[dict]:
    """The engine's outputs on the plain checkpoint of `kind` (computed once per session)."""
    if kind not in _BASE_OUTPUTS:
        _BASE_OUTPUTS[kind] = engine_greedy(ckpt(kind), PROMPTS)
    return _BASE_OUTPUTS[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_architecture_matches_transformers(ckpt, kind):
    assert_matches_reference(ckpt(kind), PROMPTS, base_outputs(ckpt, kind))


VARIANTS = {
    "qwen3_5_moe-fused-experts": ("qwen3_5_moe", dict(fused_experts=True)),
    "qwen3_5_moe-multimodal-mtp": ("qwen3_5_moe", dict(multimodal=True, add_mtp=True)),
    "qwen3_5_moe-multimodal-mtp-fused": ("qwen3_5_moe", dict(multimodal=True, add_mtp=True, fused_experts=True)),
    "qwen3_5-multimodal": ("qwen3_5", dict(multimodal=True)),
    "qwen3_5-tied": ("qwen3_5", dict(tied=True)),
    "llama-tied": ("llama", dict(tied=True)),
    "qwen3_5_moe-multimodal-mtp-sharded": ("qwen3_5_moe", dict(multimodal=True, add_mtp=True, max_shard_size="150KB")),
    "qwen3_moe-fused-experts": ("qwen3_moe", dict(fused_experts=True)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_checkpoint_variant_matches_transformers(ckpt, variant):
    kind, kw = VARIANTS[variant]
    model_dir = ckpt(kind, **kw)
    names = checkpoint_tensor_names(model_dir)
    # the variant really is what it claims to be
    if kw.get("fused_experts"):
        assert any(n.endswith("mlp.experts.gate_up_proj") for n in names)
    elif kind.endswith("moe"):
        assert any(n.endswith("mlp.experts.0.gate_proj.weight") for n in names)
    if kw.get("multimodal"):
        assert any(n.startswith("model.visual.") for n in names)
        assert any(n.startswith("model.language_model.") for n in names)
    if kw.get("add_mtp"):
        assert any(n.startswith("mtp.") for n in names)
    if kw.get("max_shard_size"):
        assert (model_dir / "model.safetensors.index.json").is_file()
        assert len(list(model_dir.glob("*.safetensors"))) > 2
    if kw.get("tied"):
        assert "lm_head.weight" not in names or torch.equal(*_tied_pair(model_dir))
    outs = engine_greedy(model_dir, PROMPTS)
    assert_matches_reference(model_dir, PROMPTS, outs)
    if not kw.get("tied"):
        # the builder gives a kind the same text weights in every layout, wrapper and sharding, so the
        # engine must compute exactly what it computes on the plain checkpoint
        base = base_outputs(ckpt, kind)
        assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in base]
        assert [o["meta_info"]["output_token_logprobs"] for o in outs] == \
            [o["meta_info"]["output_token_logprobs"] for o in base]


def _tied_pair(model_dir):
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return f.get_tensor("lm_head.weight"), f.get_tensor("model.embed_tokens.weight")


@pytest.mark.parametrize("kind", ["qwen3_5", "qwen3_5_moe", "llama"])
def test_chunked_prefill_matches_transformers(ckpt, kind, monkeypatch):
    """chunked_prefill_size=16: a 40-token prompt is prefilled in pieces (the Gated DeltaNet conv and recurrent
    states and the KV cache carry across the pieces) next to a short prompt."""
    model_dir = ckpt(kind)
    step_sizes = []
    original = model_runner.ModelRunner.execute

    def recording_execute(self, step):
        step_sizes.append(len(step.input_ids))
        return original(self, step)

    monkeypatch.setattr(model_runner.ModelRunner, "execute", recording_execute)
    prompts = [make_prompt(40, 4), make_prompt(6, 5)]
    outs = engine_greedy(model_dir, prompts, chunked_prefill_size=16)
    assert step_sizes and max(step_sizes) <= 16
    assert sum(step_sizes) == sum(len(p) for p in prompts) + len(prompts) * (MAX_NEW - 1)
    assert_matches_reference(model_dir, prompts, outs)


# ---- bf16 ----------------------------------------------------------------------------------------------------
#
# These randomized tiny models are numerically sharp: running the *same bf16 weights* in bf16 instead of fp32
# moves teacher-forced logprobs by 0.07-0.5 on average (measured per kind; up to ~4 where a router top-k or an
# attention pattern is a near tie) in transformers itself, so neither a 5e-2 logprob tolerance nor exact greedy equality with
# transformers-bf16 holds (measured: transformers-bf16 and the engine-bf16 both pick another token than fp32 at
# a few near-tie positions, not always the same ones). The bf16 engine is therefore measured against the fp32
# truth of the same weights (transformers in fp32, which the fp32 tests tie to the engine within 1e-4):
#   * logprobs over every prompt and generated position: mean |error| <= 1.5 x transformers-bf16's + 0.02;
#   * greedy tokens: each is within 1.5 nats of the fp32 argmax (a bf16 near tie, not a wrong model), at least
#     75% are the fp32 argmax, and the first token (no drift yet) is the fp32 argmax wherever the fp32 top-2
#     margin exceeds 0.75.
BF16_PROMPTS = PROMPTS + [make_prompt(30, 6)]
BF16_NEW = 8


@pytest.mark.parametrize("kind", ["llama", "qwen3_5_moe"])
def test_bf16_checkpoint(ckpt, kind):
    model_dir = ckpt(kind, dtype="bfloat16")
    tensors = checkpoint_tensor_names(model_dir)
    assert all(dt == "bfloat16" for _, dt in tensors.values())
    with Engine(model_dir, progress=False) as engine:  # dtype "auto": the checkpoint's bf16
        numel = sum(math.prod(shape) for shape, _ in tensors.values())
        assert engine.stage_report()[0]["weight_bytes"] == 2 * numel, "auto dtype must run in bf16"
        outs = engine.generate(input_ids=BF16_PROMPTS, return_logprob=True,
                               sampling_params={"temperature": 0, "max_new_tokens": BF16_NEW, "ignore_eos": True})
        seqs = [p + o["output_ids"] for p, o in zip(BF16_PROMPTS, outs)]
        scored = engine.generate(input_ids=seqs, return_logprob=True, logprob_start_len=0,
                                 sampling_params={"temperature": 0, "max_new_tokens": 1, "ignore_eos": True})

    engine_err, hf_err, all_gaps = [], [], []
    for prompt, out, seq, s in zip(BF16_PROMPTS, outs, seqs, scored):
        targets = torch.tensor(seq[1:])
        assert [t for _, t in s["meta_info"]["input_token_logprobs"]] == seq[1:]
        got = torch.tensor([lp for lp, _ in s["meta_info"]["input_token_logprobs"]])
        truth_all = hf_score(model_dir, seq, torch.float32)[:-1]
        truth = truth_all.gather(1, targets[:, None])[:, 0]
        hf_bf16 = hf_score(model_dir, seq, torch.bfloat16)[:-1].gather(1, targets[:, None])[:, 0]
        engine_err.append((got - truth).abs())
        hf_err.append((hf_bf16 - truth).abs())

        # greedy tokens against the fp32 argmax at the same (teacher-forced) positions
        gen = truth_all[len(prompt) - 1:]  # [BF16_NEW, vocab]: the distributions the generated tokens came from
        gaps = torch.tensor([float(gen[i].max() - gen[i, tok]) for i, tok in enumerate(out["output_ids"])])
        assert gaps.max() <= 1.5, f"a greedy token is {gaps.max():.2f} nats below the fp32 argmax"
        top2 = torch.topk(gen[0], 2).values
        if top2[0] - top2[1] > 0.75:
            assert out["output_ids"][0] == int(gen[0].argmax())
        all_gaps.append(gaps)
    all_gaps = torch.cat(all_gaps)
    assert (all_gaps == 0).float().mean() >= 0.75
    engine_err, hf_err = torch.cat(engine_err).mean().item(), torch.cat(hf_err).mean().item()
    assert engine_err <= 1.5 * hf_err + 0.02, f"bf16 logprob error {engine_err:.3f} vs transformers' {hf_err:.3f}"
    # the engine's own decode logprobs agree with its prefill scoring of the same positions
    for prompt, out, s in zip(BF16_PROMPTS, outs, scored):
        decode = torch.tensor([lp for lp, _ in out["meta_info"]["output_token_logprobs"]])
        prefill = torch.tensor([lp for lp, _ in s["meta_info"]["input_token_logprobs"][len(prompt) - 1:]])
        assert (decode - prefill).abs().mean() < 0.1
