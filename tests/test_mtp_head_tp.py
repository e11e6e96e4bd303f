"""The MTP head under tensor parallelism: two gloo ranks on loopback build the head as tp2 of one stage and as
tp2 of the last of two stages (which has no embedding of the model's: the head holds a vocabulary-parallel
one), load the multimodal MoE fused checkpoint, and run a prefill step; the gathered logits equal the
one-process head's within 1e-4 (TP changes the reduction order). Slow (about 100 s on the 2-core machine, most
of it two spawned interpreters importing torch): run with -m slow."""

from __future__ import annotations

import pytest
import torch

from support.spawned_ranks import run_in_gloo_world

CHECKPOINT = ("qwen3_5_moe", dict(add_mtp=True, multimodal=True, fused_experts=True))
IDS = [5, 77, 301, 12, 9]


def head_logits(model_dir, layout) -> tuple[torch.Tensor, list[str]]:
    from tandem.layers.forward_batch import ForwardBatch
    from tandem.layers.paged_metadata import PagedAttentionMetadata
    from tandem.layers.span import Span
    from tandem.loader import load_weights
    from tandem.models.qwen3_5 import Qwen3_5MoeForCausalLM
    from tandem.models.registry import load_model_config
    from tandem.runtime.memory.kv_pool import PagedKVPool

    config = load_model_config(model_dir)
    model = Qwen3_5MoeForCausalLM(config, layout or _single(config), mtp=True)
    report = load_weights(model, model_dir, progress=False)
    kv_heads = model.mtp.layers[0].self_attn.num_kv_heads
    pool = PagedKVPool(model.mtp.layer_ids, 2, 4, kv_heads, config.head_dim, torch.float32, "cpu")
    batch = ForwardBatch.build([Span(0, 0, len(IDS))], IDS)
    batch.kv_pool = pool
    batch.attn = PagedAttentionMetadata.build([[1, 0]], [0], [len(IDS)], 4, 1 << 20)
    hidden = torch.randn(len(IDS), config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model.compute_logits(model.mtp_forward(batch, hidden)), report.tensors_read


def _single(config):
    from tandem.parallel.layout import ParallelLayout

    return ParallelLayout.single(config.num_layers)


def tp_rank(rank: int, model_dir) -> dict:
    from tandem.parallel.layout import GroupInfo, ParallelLayout

    tp = GroupInfo(rank, 2, None, (0, 1))  # the whole world is the TP group
    out = {}
    for name, pp in (("one stage", GroupInfo.alone()), ("last of two stages", GroupInfo(1, 2, None, (0, 1)))):
        partition = (4,) if pp.size == 1 else (2, 2)
        logits, read = head_logits(model_dir, ParallelLayout(tp, pp, partition))
        out[name] = (logits.tolist(), sorted(n for n in read if n.startswith("mtp.") or "embed_tokens" in n))
    return out


@pytest.mark.slow
def test_tp2_head_matches_one_process(ckpt):
    kind, kw = CHECKPOINT
    model_dir = ckpt(kind, **kw)
    expected, _ = head_logits(model_dir, None)
    out = run_in_gloo_world(tp_rank, 2, model_dir, timeout=300)
    for rank in (0, 1):
        for name in ("one stage", "last of two stages"):
            logits, read = out[rank][name]
            torch.testing.assert_close(torch.tensor(logits), expected, atol=1e-4, rtol=1e-4, msg=f"rank {rank}, {name}")
            assert "mtp.fc.weight" in read and "model.language_model.embed_tokens.weight" in read
