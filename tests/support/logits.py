"""transformers' logits of a test checkpoint, and greedy decoding on them with penalties and logit_bias
applied by hand (the independent reference for the sampler's adjustments, one token at a time)."""

from __future__ import annotations

import torch

FORCED = 40  # a token id that `forcing_bias` makes greedy decoding repeat


class HF:
    """transformers' logits of one model, and what the tests compute from them."""

    def __init__(self, model_dir, tokenizer):
        from support.reference import load_hf_model

        self.model = load_hf_model(model_dir)
        self.tokenizer = tokenizer

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), V] fp32 next-token logits at each position."""
        return self.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()

    def logprobs(self, ids: list[int]) -> torch.Tensor:
        return torch.log_softmax(self.logits(ids), dim=-1)

    def text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def greedy(self, prompt: list[int], n: int, adjust=None) -> list[int]:
        """Greedy continuation; adjust(logits [V], generated ids) changes the logits before the argmax."""
        out: list[int] = []
        for _ in range(n):
            row = self.logits(prompt + out)[-1]
            if adjust is not None:
                row = adjust(row.clone(), out)
            out.append(int(torch.argmax(row)))
        return out

    def top_dict(self, row: torch.Tensor, chosen: int, n: int) -> dict[str, float]:
        """OpenAI's completions top_logprobs entry: the n most likely tokens' texts, then the chosen one."""
        entry: dict[str, float] = {}
        for t in torch.topk(row, n).indices.tolist():
            entry.setdefault(self.text(t), float(row[t]))
        entry.setdefault(self.text(chosen), float(row[chosen]))
        return entry


def presence_frequency(presence: float, frequency: float):
    """OpenAI's penalties over the generated tokens."""
    def adjust(row, generated):
        for t in set(generated):
            row[t] -= presence + frequency * generated.count(t)
        return row
    return adjust


def repetition(penalty: float, prompt: list[int]):
    """SGLang/HF repetition_penalty over the prompt's and the generated tokens."""
    def adjust(row, generated):
        for t in set(prompt + generated):
            row[t] = row[t] / penalty if row[t] > 0 else row[t] * penalty
        return row
    return adjust


def bias(values: dict[int, float]):
    """OpenAI's logit_bias."""
    def adjust(row, generated):
        for t, b in values.items():
            row[t] += b
        return row
    return adjust


def forcing_bias(hf, prompt: list[int], token: int, steps: int) -> float:
    """A logit_bias for `token` with which greedy decoding repeats it `steps` times, winning some later step
    by a margin of only 1: so the random model (whose greedy output never repeats a token) meets the
    penalties on generated tokens, and a penalty of more than 1 there changes the output."""
    logits = hf.logits(prompt + [token] * steps)[len(prompt) - 1:len(prompt) - 1 + steps]
    others = logits.clone()
    others[:, token] = float("-inf")
    need = others.max(dim=-1).values - logits[:, token]  # the bias that makes `token` win each step
    return max(float(need[0]) + 0.25, float(need[1:].max()) + 1.0)
