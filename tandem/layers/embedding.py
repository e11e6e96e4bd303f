"""Vocabulary-parallel token embedding and LM head.

Each TP rank holds a contiguous slice of ceil(vocab / tp) rows (the last slice zero-padded). The embedding
zeroes rows outside the slice and all-reduces; the LM head computes its slice of logits and all-gathers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tandem.layers.matmul import linear
from tandem.layers.weights import check_shape, new_param
from tandem.parallel.comm import tp_all_gather, tp_all_reduce
from tandem.parallel.layout import GroupInfo


class VocabParallelEmbedding(nn.Module):
    def __init__(self, tp: GroupInfo, vocab_size: int, hidden_size: int):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // tp.size)
        self.start = tp.rank * self.rows
        self.end = min(self.start + self.rows, vocab_size)
        self.weight = new_param(self.rows, hidden_size, weight_loader=self._load)

    def _load(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        check_shape((self.vocab_size, param.shape[1]), loaded, "embedding")
        count = max(0, self.end - self.start)
        param.data[:count].copy_(loaded[self.start:self.end])
        param.data[count:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.start) | (input_ids >= self.end)
        local = (input_ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return tp_all_reduce(out, self.tp)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over the vocabulary; with tied embeddings it is loaded from embed_tokens.weight."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden_states, self.weight)
        if self.tp.size > 1:
            logits = tp_all_gather(logits, self.tp, dim=-1)
        return logits[..., : self.vocab_size]
