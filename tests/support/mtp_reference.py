"""A float64 reference of Qwen3.5's MTP head written from a checkpoint's tensors (transformers has no MTP
forward): the norms, rotary and MoE of the head's layer (`rms0`, `rope`, `reference_mlp`), and `ReferenceMTP`,
which computes from scratch what chained NEXTN drafting gives for a request's accepted history: the head over
(h_t, x_{t+1}) for every t <= P (causal), then `k - 1` chained steps at P + 1, P + 2, ... on its own normed
output and argmax token, each attending to the first pass's keys and the chain's own."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def text_config(model_dir) -> dict:
    raw = json.loads((model_dir / "config.json").read_text())
    return raw.get("text_config", raw)


def rms0(x, weight, eps):
    """Qwen3.5's zero-centred RMSNorm."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight)


def rope(x, positions, rot_dim: int, theta: float):
    """Rotate-half rotary embedding on the first rot_dim features of each head. x: [n, heads, hd]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    freqs = positions.double()[:, None] * inv_freq  # [n, rot/2]
    cos, sin = torch.cat([freqs, freqs], -1).cos()[:, None], torch.cat([freqs, freqs], -1).sin()[:, None]
    rot, rest = x[..., :rot_dim], x[..., rot_dim:]
    half = rot_dim // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], -1)
    return torch.cat([rot * cos + rotated * sin, rest], -1)


def reference_mlp(W, p: str, h, cfg: dict):
    swiglu = lambda x, gate, up, down: F.silu(x @ gate.T) * (x @ up.T) @ down.T
    if not cfg.get("num_experts"):
        return swiglu(h, W(p + "gate_proj.weight"), W(p + "up_proj.weight"), W(p + "down_proj.weight"))
    E, top = cfg["num_experts"], cfg["num_experts_per_tok"]
    probs = torch.softmax(h @ W(p + "gate.weight").T, dim=-1)
    weights, chosen = probs.topk(top, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)  # Qwen3.5 MoE renormalises the top-k
    out = torch.zeros_like(h)
    for e in range(E):
        if W.has(p + "experts.gate_up_proj"):
            gate, up = W(p + "experts.gate_up_proj")[e].chunk(2, dim=0)
            down = W(p + "experts.down_proj")[e]
        else:
            gate, up, down = (W(p + f"experts.{e}.{n}_proj.weight") for n in ("gate", "up", "down"))
        weight_e = (weights * (chosen == e)).sum(-1, keepdim=True)  # [n, 1], 0 where e was not chosen
        out = out + weight_e * swiglu(h, gate, up, down)
    shared = swiglu(h, W(p + "shared_expert.gate_proj.weight"), W(p + "shared_expert.up_proj.weight"),
                    W(p + "shared_expert.down_proj.weight"))
    return out + torch.sigmoid(h @ W(p + "shared_expert_gate.weight").T) * shared


class ReferenceMTP:
    def __init__(self, model_dir):
        cfg = self.cfg = text_config(model_dir)
        tensors = load_file(model_dir / "model.safetensors")
        self.W = lambda name: tensors[name].double()
        self.W.has = lambda name: name in tensors
        multimodal = "text_config" in json.loads((model_dir / "config.json").read_text())
        self.embed = self.W(("model.language_model." if multimodal else "model.") + "embed_tokens.weight")
        self.head = self.W("lm_head.weight") if self.W.has("lm_head.weight") else self.embed
        self.eps, self.hd = cfg["rms_norm_eps"], cfg["head_dim"]
        self.nh, self.nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        rope_cfg = cfg["rope_parameters"]
        self.rot_dim, self.theta = int(self.hd * rope_cfg["partial_rotary_factor"]), rope_cfg["rope_theta"]

    def fc_inputs(self, tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        W = self.W
        x = torch.cat([rms0(self.embed[tokens], W("mtp.pre_fc_norm_embedding.weight"), self.eps),
                       rms0(hidden.double(), W("mtp.pre_fc_norm_hidden.weight"), self.eps)], -1)
        return x @ W("mtp.fc.weight").T  # [n, H]

    def attention_inputs(self, u: torch.Tensor, positions: torch.Tensor):
        """q [n, nh, hd], gate [n, nh*hd], k, v [n, nkv, hd] of the layer's attention."""
        W, p, n, hd = self.W, "mtp.layers.0.", u.shape[0], self.hd
        h = rms0(u, W(p + "input_layernorm.weight"), self.eps)
        q_gate = (h @ W(p + "self_attn.q_proj.weight").T).view(n, self.nh, 2 * hd)
        q, gate = q_gate[..., :hd], q_gate[..., hd:].reshape(n, self.nh * hd)
        k = (h @ W(p + "self_attn.k_proj.weight").T).view(n, self.nkv, hd)
        v = (h @ W(p + "self_attn.v_proj.weight").T).view(n, self.nkv, hd)
        q = rms0(q, W(p + "self_attn.q_norm.weight"), self.eps)
        k = rms0(k, W(p + "self_attn.k_norm.weight"), self.eps)
        return rope(q, positions, self.rot_dim, self.theta), gate, rope(k, positions, self.rot_dim, self.theta), v

    def layer_output(self, u, q, gate, keys, values, mask) -> torch.Tensor:
        """The layer and the head's final norm for queries q over keys/values [m, nkv, hd]; mask [n, m]."""
        W, p, n = self.W, "mtp.layers.0.", u.shape[0]
        rep = self.nh // self.nkv
        k, v = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * self.hd ** -0.5
        attn = torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)
        u = u + (attn.reshape(n, -1) * torch.sigmoid(gate)) @ W(p + "self_attn.o_proj.weight").T
        u = u + reference_mlp(W, p + "mlp.", rms0(u, W(p + "post_attention_layernorm.weight"), self.eps), self.cfg)
        return rms0(u, W("mtp.norm.weight"), self.eps)

    def drafts(self, tokens: torch.Tensor, hidden: torch.Tensor, last: int, k: int):
        """Chained drafts after position `last` (P) of a request whose tokens are tokens[0 .. P + 1] and whose
        final hidden states are hidden[0 .. P]. Returns (k draft ids, the k logits rows [k, V])."""
        n = last + 1
        u = self.fc_inputs(tokens[1:n + 1], hidden[:n])
        q, gate, keys, values = self.attention_inputs(u, torch.arange(n))
        out = self.layer_output(u, q, gate, keys, values, torch.ones(n, n, dtype=torch.bool).tril())[-1:]
        drafts, rows = [], []
        for step in range(k):
            if step:
                u = self.fc_inputs(torch.tensor([drafts[-1]]), out)
                q, gate, key, value = self.attention_inputs(u, torch.tensor([last + step]))
                keys, values = torch.cat([keys, key]), torch.cat([values, value])
                out = self.layer_output(u, q, gate, keys, values, torch.ones(1, keys.shape[0], dtype=torch.bool))
            logits = out @ self.head.T
            rows.append(logits[0])
            drafts.append(int(logits[0].argmax()))
        return drafts, torch.stack(rows)
