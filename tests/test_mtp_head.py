"""Qwen3.5's MTP head (`mtp.*`, models/mtp.py): its forward (a prefill step of two requests, then a decode step
reading their paged keys) against a float64 reference written here from the checkpoint's tensors (transformers
has no MTP forward), for the dense, MoE per-expert and the multimodal MoE fused layouts; and the loading rules:
with mtp=True the last stage reads every `mtp.*` tensor (and `embed_tokens` when it is not the first stage),
without it none is read, an incomplete head is a CheckpointError naming the missing tensor, and a checkpoint
without a head is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from support.mtp_reference import reference_mlp, rms0, rope, text_config
from tandem.errors import CheckpointError, ConfigError
from tandem.layers.forward_batch import ForwardBatch
from tandem.layers.paged_metadata import PagedAttentionMetadata
from tandem.layers.span import Span
from tandem.loader import load_weights
from tandem.models.qwen3_5 import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM
from tandem.models.registry import load_model_config
from tandem.parallel.layout import ParallelLayout
from tandem.runtime.memory.kv_pool import PagedKVPool

CASES = {  # name -> (kind, build kwargs)
    "dense": ("qwen3_5", dict(add_mtp=True)),
    "moe-per-expert": ("qwen3_5_moe", dict(add_mtp=True)),
    "moe-multimodal-fused": ("qwen3_5_moe", dict(add_mtp=True, multimodal=True, fused_experts=True)),
}
PAGE_SIZE = 4


def model_class(kind: str):
    return Qwen3_5MoeForCausalLM if kind == "qwen3_5_moe" else Qwen3_5ForCausalLM


def build(model_dir, kind: str, mtp: bool, layout=None):
    config = load_model_config(model_dir)
    model = model_class(kind)(config, layout or ParallelLayout.single(config.num_layers), mtp=mtp)
    report = load_weights(model, model_dir, progress=False)
    return config, model, report


# ---- float64 reference --------------------------------------------------------------------------------------


def reference_logits(model_dir, ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor):
    """The MTP head over one request's whole sequence at once (causal), in float64."""
    cfg = text_config(model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    W = lambda name: tensors[name].double()
    W.has = lambda name: name in tensors
    eps, H, hd = cfg["rms_norm_eps"], cfg["hidden_size"], cfg["head_dim"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    prefix = "model.language_model." if "text_config" in json.loads((model_dir / "config.json").read_text()) else "model."
    embed = W(prefix + "embed_tokens.weight")
    x = torch.cat([rms0(embed[ids], W("mtp.pre_fc_norm_embedding.weight"), eps),
                   rms0(hidden.double(), W("mtp.pre_fc_norm_hidden.weight"), eps)], -1)
    u = x @ W("mtp.fc.weight").T  # [n, H]
    p, n = "mtp.layers.0.", ids.shape[0]
    h = rms0(u, W(p + "input_layernorm.weight"), eps)
    q_gate = (h @ W(p + "self_attn.q_proj.weight").T).view(n, nh, 2 * hd)
    q, gate = q_gate[..., :hd], q_gate[..., hd:].reshape(n, nh * hd)
    k = (h @ W(p + "self_attn.k_proj.weight").T).view(n, nkv, hd)
    v = (h @ W(p + "self_attn.v_proj.weight").T).view(n, nkv, hd)
    q, k = rms0(q, W(p + "self_attn.q_norm.weight"), eps), rms0(k, W(p + "self_attn.k_norm.weight"), eps)
    rope_cfg = cfg["rope_parameters"]
    rot_dim = int(hd * rope_cfg["partial_rotary_factor"])
    q, k = rope(q, positions, rot_dim, rope_cfg["rope_theta"]), rope(k, positions, rot_dim, rope_cfg["rope_theta"])
    k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * hd ** -0.5
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, nh * hd)
    u = u + (attn * torch.sigmoid(gate)) @ W(p + "self_attn.o_proj.weight").T
    u = u + reference_mlp(W, p + "mlp.", rms0(u, W(p + "post_attention_layernorm.weight"), eps), cfg)
    head = W("lm_head.weight") if W.has("lm_head.weight") else embed
    assert u.shape[-1] == H
    return rms0(u, W("mtp.norm.weight"), eps) @ head.T


# ---- the head through paged attention ---------------------------------------------------------------------------


def mtp_step(model, pool, spans, tables, ids, hidden):
    batch = ForwardBatch.build(spans, ids)
    batch.kv_pool = pool
    batch.attn = PagedAttentionMetadata.build(tables, [s.prefix_len for s in spans], [s.num_tokens for s in spans],
                                              PAGE_SIZE, 1 << 20)
    with torch.no_grad():
        return model.compute_logits(model.mtp_forward(batch, hidden))


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_a_float64_reference(ckpt, case):
    kind, kw = CASES[case]
    model_dir = ckpt(kind, **kw)
    config, model, _ = build(model_dir, kind, mtp=True)
    pool = PagedKVPool(model.mtp.layer_ids, 6, PAGE_SIZE, config.num_kv_heads, config.head_dim, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(11)
    lengths, tables = [6, 8], [[4, 1], [0, 5]]  # two requests: a prefill of all but one token, then a decode
    ids = [torch.randint(0, config.vocab_size, (n,), generator=gen) for n in lengths]
    hidden = [torch.randn(n, config.hidden_size, generator=gen) for n in lengths]
    prefill = mtp_step(model, pool, [Span(0, 0, n - 1) for n in lengths], tables,
                       torch.cat([t[:-1] for t in ids]), torch.cat([h[:-1] for h in hidden]))
    decode = mtp_step(model, pool, [Span(0, n - 1, 1) for n in lengths], tables,
                      torch.stack([t[-1] for t in ids]), torch.stack([h[-1] for h in hidden]))
    offset = 0
    for r, n in enumerate(lengths):
        expected = reference_logits(model_dir, ids[r], hidden[r], torch.arange(n))
        got = torch.cat([prefill[offset:offset + n - 1], decode[r:r + 1]])
        torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)
        offset += n - 1
    assert prefill.std() > 0.1  # a real signal, not a degenerate head


# ---- loading rules ------------------------------------------------------------------------------------------------


def mtp_names(model_dir) -> set[str]:
    return {name for name in load_file(model_dir / "model.safetensors") if name.startswith("mtp.")}


@pytest.mark.parametrize("case", ["dense", "moe-multimodal-fused"])
def test_mtp_tensors_are_read_only_with_speculation(ckpt, case):
    kind, kw = CASES[case]
    model_dir = ckpt(kind, **kw)
    expected = mtp_names(model_dir)
    assert len(expected) >= 12
    _, _, with_mtp = build(model_dir, kind, mtp=True)
    assert expected <= set(with_mtp.tensors_read)
    _, model, without = build(model_dir, kind, mtp=False)
    assert model.mtp is None and not any(name.startswith("mtp.") for name in without.tensors_read)
    assert set(with_mtp.tensors_read) - set(without.tensors_read) == expected


def test_pipeline_stages_with_speculation(ckpt):
    """pp2: only the last stage builds the head and reads `mtp.*`, and it also reads the embedding the head
    needs; its head then computes what the one-stage head computes."""
    kind, kw = CASES["dense"]
    model_dir = ckpt(kind, **kw)
    config = load_model_config(model_dir)
    embed = "model.embed_tokens.weight"
    _, model0, report0 = build(model_dir, kind, True, ParallelLayout.describe((2, 2), pp_rank=0))
    assert model0.mtp is None and not any(n.startswith("mtp.") for n in report0.tensors_read)
    _, model1, report1 = build(model_dir, kind, True, ParallelLayout.describe((2, 2), pp_rank=1))
    assert mtp_names(model_dir) <= set(report1.tensors_read) and embed in report1.tensors_read
    _, without, report_off = build(model_dir, kind, False, ParallelLayout.describe((2, 2), pp_rank=1))
    assert embed not in report_off.tensors_read
    _, single, _ = build(model_dir, kind, True)
    ids = torch.tensor([3, 17, 42])
    hidden = torch.randn(3, config.hidden_size, generator=torch.Generator().manual_seed(2))
    outs = []
    for model in (model1, single):
        pool = PagedKVPool(model.mtp.layer_ids, 2, PAGE_SIZE, config.num_kv_heads, config.head_dim, torch.float32,
                           "cpu")
        outs.append(mtp_step(model, pool, [Span(0, 0, 3)], [[1]], ids, hidden))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("case, name", [
    ("dense", "mtp.fc.weight"),
    ("dense", "mtp.layers.0.self_attn.k_proj.weight"),
    ("moe-per-expert", "mtp.layers.0.mlp.experts.5.up_proj.weight"),
    ("moe-multimodal-fused", "mtp.norm.weight"),
])
def test_incomplete_head_is_refused(ckpt, tmp_path, case, name):
    kind, kw = CASES[case]
    model_dir = tmp_path / "ckpt"
    shutil.copytree(ckpt(kind, **kw), model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    del tensors[name]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    build(model_dir, kind, mtp=False)  # without speculation the head is not needed
    with pytest.raises(CheckpointError, match="missing") as info:
        build(model_dir, kind, mtp=True)
    assert name in str(info.value)


def test_checkpoint_without_a_head_is_refused(ckpt):
    with pytest.raises(ConfigError, match="mtp_num_hidden_layers"):
        build(ckpt("qwen3_5"), "qwen3_5", mtp=True)
