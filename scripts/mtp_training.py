"""The bundled model's multi-token-prediction head for training (transformers has no MTP module), its loss,
its `mtp.*` checkpoint tensors, and the offline accept length of its chained drafts.

The head is Qwen3.5's (`tandem/models/mtp.py` runs the same function at inference): for the target's final
hidden state h_t (after the final norm) and the next token x_{t+1},
    u = fc(concat(pre_fc_norm_embedding(embed(x_{t+1})), pre_fc_norm_hidden(h_t)))
    u = layers[0](u)           # a full-attention MoE decoder layer (transformers' own class)
    out = norm(u); logits = lm_head(out)   # predicts x_{t+2}
Chained drafting (what Tandem's drafter does, as vLLM's and SGLang's MTP proposers do) feeds `out` and the
drafted token back in at the next position. Training unrolls that chain `steps` times, teacher-forced (draft i
only matters when drafts 1..i-1 were right, so feeding the true tokens is exact for acceptance), with the
attention pattern of inference: step k's query for origin t sits at position t + k - 1 and sees the step-1
keys of positions <= t (the KV the head keeps for accepted positions) and the keys of steps 2..k of the same
origin (the chain's own). Embedding and LM head are the model's, used detached: the MTP loss does not move
the target model."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


class TrainingMTPHead(nn.Module):
    def __init__(self, config, init_layer: nn.Module, final_norm: nn.Module):
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeDecoderLayer, Qwen3_5MoeRMSNorm

        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        layer_config = copy.deepcopy(config)
        layer_config.layer_types = list(config.layer_types) + ["full_attention"]
        layer_config._attn_implementation = "eager"  # takes the float mask below as it is
        self.pre_fc_norm_embedding = Qwen3_5MoeRMSNorm(hidden, eps=eps)
        self.pre_fc_norm_hidden = Qwen3_5MoeRMSNorm(hidden, eps=eps)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        nn.init.normal_(self.fc.weight, std=0.02)
        self.layers = nn.ModuleList([Qwen3_5MoeDecoderLayer(layer_config, config.num_hidden_layers)])
        self.layers[0].load_state_dict(init_layer.state_dict())  # start from the model's last attention layer
        self.norm = Qwen3_5MoeRMSNorm(hidden, eps=eps)
        self.norm.load_state_dict(final_norm.state_dict())

    def step_inputs(self, hidden: torch.Tensor, tokens: torch.Tensor, embed_weight: torch.Tensor) -> torch.Tensor:
        embeds = F.embedding(tokens, embed_weight.detach())
        return self.fc(torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))

    def chain(self, hidden: torch.Tensor, input_ids: torch.Tensor, embed_weight: torch.Tensor, rotary,
              steps: int) -> list[torch.Tensor]:
        """hidden [B, T, H] (the target's final hidden states), input_ids [B, T]. Returns `steps` normed outputs
        [B, T, H]: out[k - 1][:, t] is step k's for origin t, which predicts input_ids[:, t + k + 1]."""
        B, T, _ = hidden.shape
        shifted = lambda k: F.pad(input_ids[:, k:], (0, k), value=0)  # x_{t+k}; past the end: masked by labels
        inputs, outs = [], []
        prev = hidden
        for k in range(1, steps + 1):
            inputs.append(self.step_inputs(prev, shifted(k), embed_weight))
            x = torch.cat(inputs, dim=1)  # [B, k*T, H]: steps 1..k (earlier steps recomputed identically)
            positions = torch.cat([torch.arange(T) + j for j in range(k)])[None].expand(B, -1)
            cos_sin = rotary(x, positions)
            u = self.layers[0](x, position_embeddings=cos_sin, attention_mask=chain_mask(T, k), position_ids=None)
            prev = self.norm(u[:, (k - 1) * T:])
            outs.append(prev)
        return outs


def chain_mask(T: int, k: int) -> torch.Tensor:
    """Additive [1, 1, kT, kT] mask: row (step i, origin t) sees (step 1, s <= t) and (step j, origin t) for
    2 <= j <= i."""
    step = torch.arange(k).repeat_interleave(T)
    origin = torch.arange(T).repeat(k)
    first = (step[None, :] == 0) & (origin[None, :] <= origin[:, None])
    own_chain = (step[None, :] > 0) & (origin[None, :] == origin[:, None]) & (step[None, :] <= step[:, None])
    allowed = first | own_chain
    return torch.zeros(k * T, k * T).masked_fill(~allowed, float("-inf"))[None, None]


def mtp_loss(outs: list[torch.Tensor], labels: torch.Tensor, lm_head_weight: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of every chain step over the answer tokens it predicts (labels -100 elsewhere)."""
    losses = []
    for k, out in enumerate(outs, start=1):
        target = F.pad(labels[:, k + 1:], (0, k + 1), value=-100)
        logits = F.linear(out, lm_head_weight.detach())
        losses.append(F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100))
    return torch.stack(losses).mean()


def checkpoint_tensors(head: TrainingMTPHead) -> dict[str, torch.Tensor]:
    """The head's parameters under their checkpoint names (`mtp.fc.weight`, `mtp.layers.0.*`, ...), experts
    per expert (`mlp.experts.{e}.gate_proj.weight`, ...) as transformers saves the model's own layers."""
    out = {}
    for name, p in head.state_dict().items():
        p = p.detach()
        if name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H]
            base = f"mtp.{name[: -len('gate_up_proj')]}"
            for e, (gate, up) in enumerate(zip(*p.chunk(2, dim=1))):
                out[f"{base}{e}.gate_proj.weight"], out[f"{base}{e}.up_proj.weight"] = gate.clone(), up.clone()
        elif name.endswith("mlp.experts.down_proj"):  # [E, H, I]
            base = f"mtp.{name[: -len('down_proj')]}"
            for e, down in enumerate(p):
                out[f"{base}{e}.down_proj.weight"] = down.clone()
        else:
            out[f"mtp.{name}"] = p.contiguous().clone()
    return out


@torch.no_grad()
def offline_accept(model, head: TrainingMTPHead, sequences: list[tuple[list[int], int]], steps: int) -> dict:
    """Teacher-forced acceptance over full sequences (prompt + answer + EOS, answer from index `start`): per
    generated position, how many of `steps` chained greedy drafts equal the target's greedy tokens; and the
    decode-time accept length (tokens per verify step, the bonus token included) of walking each answer with
    greedy verification. Valid where the target's greedy output is the sequence itself (it is reported)."""
    model.eval()
    per_position, verify_steps, emitted, target_exact = [], 0, 0, 0
    for ids, start in sequences:
        input_ids = torch.tensor([ids])
        captured = {}
        hook = model.model.norm.register_forward_hook(lambda m, i, o, store=captured: store.__setitem__("h", o))
        logits = model(input_ids=input_ids).logits[0]
        hook.remove()
        greedy = logits.argmax(-1)  # greedy[t] is the target's token at t + 1
        target_exact += bool((greedy[start - 1:-1] == input_ids[0, start:]).all())
        accepted = chained_accepts(head, model, captured["h"], input_ids, steps)  # [T]
        n = len(ids)
        origins = range(start - 1, n - 2)  # x_{t+1} generated, at least one token after it
        per_position.extend(min(int(accepted[t]), n - 2 - t) for t in origins)
        t = start - 1
        while t < n - 1:  # a verify step at origin t emits its accepted drafts plus one token
            take = min(int(accepted[t]), n - 2 - t) if t < n - 2 else 0
            verify_steps += 1
            emitted += take + 1
            t += take + 1
    model.train()
    return {"mean_accepted_drafts_per_position": sum(per_position) / len(per_position),
            "accept_length": emitted / verify_steps, "verify_steps": verify_steps, "tokens": emitted,
            "target_greedy_exact": target_exact / len(sequences), "sequences": len(sequences), "steps": steps}


def chained_accepts(head: TrainingMTPHead, model, hidden: torch.Tensor, input_ids: torch.Tensor,
                    steps: int) -> torch.Tensor:
    """[T]: for each origin t, how many leading chained drafts equal input_ids[t + 2], [t + 3], ..., each step
    fed its own previous draft (greedy)."""
    embed_w, lm_w = model.model.embed_tokens.weight, model.lm_head.weight
    rotary = model.model.rotary_emb
    T = input_ids.shape[1]
    tokens = input_ids.clone()
    inputs, prev, alive, count = [], hidden, torch.ones(T, dtype=torch.bool), torch.zeros(T, dtype=torch.long)
    for k in range(1, steps + 1):
        step_tokens = F.pad(input_ids[:, k:], (0, k), value=0) if k == 1 else tokens
        inputs.append(head.step_inputs(prev, step_tokens, embed_w))
        x = torch.cat(inputs, dim=1)
        positions = torch.cat([torch.arange(T) + j for j in range(k)])[None]
        u = head.layers[0](x, position_embeddings=rotary(x, positions), attention_mask=chain_mask(T, k))
        prev = head.norm(u[:, (k - 1) * T:])
        draft = F.linear(prev, lm_w)[0].argmax(-1)  # [T]: draft of x_{t+k+1}
        truth = F.pad(input_ids[0, k + 1:], (0, k + 1), value=-1)
        alive &= draft == truth
        count += alive.long()
        tokens = draft[None]
    return count
