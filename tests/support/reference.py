"""transformers reference outputs for checkpoints built by tests.support.checkpoints.

All functions run the model on CPU with pure-torch code paths (eager attention, eager MoE experts, the
torch fallback of the Gated DeltaNet kernels) and recompute the full sequence at every decode step, so the
reference never depends on HF's own KV / recurrent cache handling.
"""

from __future__ import annotations

import pathlib

import torch

_MODELS: dict[tuple[str, torch.dtype], torch.nn.Module] = {}


def _key(model_dir, dtype) -> tuple[str, torch.dtype]:
    return (str(pathlib.Path(model_dir).resolve()), dtype)


def load_hf_model(model_dir, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load (and cache) the HF model class recorded in config.json `architectures`.

    For text-only checkpoints that is *ForCausalLM; for multimodal Qwen3.5 checkpoints it is
    Qwen3_5(Moe)ForConditionalGeneration (fed text-only input_ids).
    """
    key = _key(model_dir, dtype)
    model = _MODELS.get(key)
    if model is not None:
        return model
    import transformers

    config = transformers.AutoConfig.from_pretrained(key[0])
    arch = (getattr(config, "architectures", None) or [None])[0]
    model_cls = getattr(transformers, arch, None) if arch else None
    if model_cls is None:
        model_cls = transformers.AutoModelForCausalLM
    kwargs = dict(dtype=dtype, attn_implementation="eager")
    if getattr(config.get_text_config(), "num_experts", None):
        kwargs["experts_implementation"] = "eager"
    model = model_cls.from_pretrained(key[0], **kwargs)
    model.eval()
    # Move every parameter into fresh (aligned, non-mmapped) memory: CPU kernels take alignment-dependent code
    # paths, so otherwise the same weights loaded from different layouts (fused vs per-expert, sharded, ...)
    # give results that differ at the 1e-5 level.
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    _MODELS[key] = model
    return model


def clear_cache() -> None:
    _MODELS.clear()


@torch.no_grad()
def _logits(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] fp32 logits for a single unpadded sequence (no cache)."""
    input_ids = torch.tensor([ids], dtype=torch.long)
    out = model(input_ids=input_ids, use_cache=False)
    return out.logits[0].float()


def hf_score(model_dir, input_ids: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[len(input_ids), vocab] fp32 log-probs of the next token at each position."""
    model = load_hf_model(model_dir, dtype)
    return torch.log_softmax(_logits(model, list(input_ids)), dim=-1)


def hf_greedy(model_dir, prompts: list[list[int]], max_new_tokens: int,
              dtype: torch.dtype = torch.float32) -> list[dict]:
    """Greedy-decode each prompt separately (batch 1, no padding, EOS ignored, exactly max_new_tokens).

    Returns [{"output_ids": [...], "logprobs": [...]}] with logprobs[i] = log_softmax(fp32 logits)[output_ids[i]].
    Ties in argmax resolve to the lowest token id (torch.argmax).
    """
    model = load_hf_model(model_dir, dtype)
    results = []
    for prompt in prompts:
        ids = list(prompt)
        if not ids:
            raise ValueError("empty prompt")
        out_ids, logprobs = [], []
        for _ in range(max_new_tokens):
            lp = torch.log_softmax(_logits(model, ids)[-1], dim=-1)
            tok = int(torch.argmax(lp))
            out_ids.append(tok)
            logprobs.append(float(lp[tok]))
            ids.append(tok)
        results.append({"output_ids": out_ids, "logprobs": logprobs})
    return results


def hf_greedy_generate(model_dir, prompt: list[int], max_new_tokens: int,
                       dtype: torch.dtype = torch.float32) -> list[int]:
    """Greedy decode with HF `generate` (uses HF's KV / recurrent caches); for cross-checking hf_greedy."""
    model = load_hf_model(model_dir, dtype)
    input_ids = torch.tensor([list(prompt)], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt):].tolist()
