"""Build tiny randomized Hugging Face checkpoints for the tandem test suite.

Everything is built locally with the installed transformers (no hub access).  Every parameter is
re-randomized with a fixed seed (norm weights, A_log, dt_bias, conv1d, routers, ... included), with
scales chosen so that fp32 activations stay O(1) (residual RMS ~1-3) while greedy decoding is far from
degenerate.  Parameters are seeded per canonical name, so e.g. the text-only, multimodal, fused-expert and
per-expert variants of a kind with the same seed hold the same text weights.

    build_checkpoint("qwen3_5_moe", tmp / "ckpt", multimodal=True, fused_experts=True, add_mtp=True)
    checkpoint_tensor_names(tmp / "ckpt")  # {name: (shape, dtype_str)} from safetensors headers
"""

from __future__ import annotations

import json
import math
import pathlib
import struct
import zlib

import torch

from .tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, build_tokenizer

KINDS = ("llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "qwen3_5", "qwen3_5_moe")
MOE_KINDS = ("qwen2_moe", "qwen3_moe", "qwen3_5_moe")
HYBRID_KINDS = ("qwen3_5", "qwen3_5_moe")

VOCAB_SIZE = 320  # >= tokenizer size (300): ids 300..319 are "padding" rows like real Qwen vocabularies
TOKENIZER_VOCAB_SIZE = 300
HIDDEN = 64
NUM_HEADS = 4
NUM_KV_HEADS = 2
INTERMEDIATE = 96
DEFAULT_LAYERS = 4
NUM_EXPERTS = 8
TOP_K = 2
MOE_INTERMEDIATE = 32
SHARED_EXPERT_INTERMEDIATE = 48
MAX_POS = 2048
# Multimodal placeholder ids (inside the model vocab, outside the tokenizer vocab).
VISION_START_ID, VISION_END_ID, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 316, 317, 318, 319

# Randomization scales (see _random_value).  Chosen empirically as a trade-off: larger gains make greedy output
# more varied but the model more chaotic (bf16 rounding then moves logprobs a lot); smaller gains make attention
# models fall into repeated-token loops.  The final (non zero-centred) RMSNorm weight is N(0, 1) rather than ~1: a
# zero-mean final norm removes the "predict the current token again" bias of tied-embedding models.
EMBED_STD = 0.5
EMBED_STD_TIED = 0.5
LM_HEAD_STD = 0.5
OUT_GAIN = 1.5  # o_proj / down_proj / out_proj / experts.down_proj: std = OUT_GAIN / sqrt(fan_in)
QK_GAIN = 1.5  # q_proj / k_proj of models without q/k norms (llama, qwen2, qwen2_moe)
QK_NORM_MEAN = 1.25  # Qwen3 / Qwen3-MoE q_norm, k_norm weights ~ N(1.25, 0.1)
FINAL_NORM_MEAN = 0.0
FINAL_NORM_STD = 1.0

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=HIDDEN,
    intermediate_size=INTERMEDIATE,
    num_attention_heads=NUM_HEADS,
    num_key_value_heads=NUM_KV_HEADS,
    hidden_act="silu",
    max_position_embeddings=MAX_POS,
    rms_norm_eps=1e-6,
    bos_token_id=BOS_TOKEN_ID,
    eos_token_id=EOS_TOKEN_ID,
    pad_token_id=PAD_TOKEN_ID,
)

_MOE = dict(
    num_experts=NUM_EXPERTS,
    num_experts_per_tok=TOP_K,
    moe_intermediate_size=MOE_INTERMEDIATE,
)

# Per-kind config overrides (on top of _COMMON).
_KIND_CONFIG = {
    "llama": dict(head_dim=16, attention_bias=False, mlp_bias=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    # qwen2: q/k/v always have biases; head_dim derived (= 64 / 4 = 16).
    "qwen2": dict(use_sliding_window=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # qwen3: explicit head_dim 32, so num_heads * head_dim (128) != hidden (64), like real Qwen3 models.
    "qwen3": dict(head_dim=32, attention_bias=False, use_sliding_window=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen2_moe": dict(**_MOE, shared_expert_intermediate_size=SHARED_EXPERT_INTERMEDIATE, norm_topk_prob=False,
                      decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True, use_sliding_window=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3_moe": dict(**_MOE, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], head_dim=32,
                      attention_bias=False, use_sliding_window=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}

# Qwen3.5: partial rotary 0.25 of head_dim 32 -> 8 rotary dims (4 frequencies), interleaved mrope [2, 1, 1].
_QWEN3_5_TEXT = dict(
    head_dim=32,
    attention_bias=False,
    linear_conv_kernel_dim=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 10000000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [2, 1, 1],
        "mrope_interleaved": True,
    },
)
_KIND_CONFIG["qwen3_5"] = dict(_QWEN3_5_TEXT)
_KIND_CONFIG["qwen3_5_moe"] = dict(_QWEN3_5_TEXT, **_MOE, shared_expert_intermediate_size=SHARED_EXPERT_INTERMEDIATE)

_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=4,
               spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=HIDDEN, num_position_embeddings=16)


def default_layer_types(num_layers: int) -> list[str]:
    """Qwen3.5 default pattern: every 4th layer is full attention."""
    return ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(num_layers)]


def _classes(kind: str, multimodal: bool):
    import transformers as tf

    table = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
        "qwen3_5": (tf.Qwen3_5TextConfig, tf.Qwen3_5ForCausalLM),
        "qwen3_5_moe": (tf.Qwen3_5MoeTextConfig, tf.Qwen3_5MoeForCausalLM),
    }
    if multimodal:
        return {"qwen3_5": (tf.Qwen3_5Config, tf.Qwen3_5ForConditionalGeneration),
                "qwen3_5_moe": (tf.Qwen3_5MoeConfig, tf.Qwen3_5MoeForConditionalGeneration)}[kind]
    return table[kind]


def make_config(kind: str, *, tied: bool = False, multimodal: bool = False, num_layers: int | None = None,
                layer_types: list[str] | None = None, max_position_embeddings: int = MAX_POS):
    """The transformers config object used by build_checkpoint (exposed for tests that want it)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if multimodal and kind not in HYBRID_KINDS:
        raise ValueError("multimodal=True is only supported for qwen3_5 / qwen3_5_moe")
    if layer_types is not None and kind not in HYBRID_KINDS:
        raise ValueError("layer_types is only supported for qwen3_5 / qwen3_5_moe")
    if layer_types is not None:
        layer_types = list(layer_types)
        bad = set(layer_types) - {"linear_attention", "full_attention"}
        if bad:
            raise ValueError(f"bad layer types {bad}")
        if num_layers is None:
            num_layers = len(layer_types)
        elif num_layers != len(layer_types):
            raise ValueError(f"num_layers={num_layers} but len(layer_types)={len(layer_types)}")
    if num_layers is None:
        num_layers = DEFAULT_LAYERS
    text = dict(_COMMON, **_KIND_CONFIG[kind], num_hidden_layers=num_layers, tie_word_embeddings=tied)
    text["max_position_embeddings"] = max_position_embeddings
    if kind == "qwen3_5_moe":
        del text["intermediate_size"]  # not a Qwen3.5-MoE config field (all layers are MoE)
    if kind in HYBRID_KINDS:
        text["layer_types"] = layer_types if layer_types is not None else default_layer_types(num_layers)
    config_cls, _ = _classes(kind, multimodal)
    if not multimodal:
        return config_cls(**text)
    return config_cls(
        text_config=text,
        vision_config=dict(_VISION),
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=tied,
    )


# ----------------------------------------------------------------------------------------------------------------
# Randomization
# ----------------------------------------------------------------------------------------------------------------


def _normal(gen, shape, mean=0.0, std=1.0):
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean


def _uniform(gen, shape, lo, hi):
    return torch.rand(shape, generator=gen, dtype=torch.float32) * (hi - lo) + lo


def _random_value(module: torch.nn.Module, pname: str, mod_name: str, p: torch.Tensor, gen, tied: bool,
                  has_qk_norm: bool) -> torch.Tensor:
    cls = type(module).__name__
    shape = tuple(p.shape)
    leaf = mod_name.rsplit(".", 1)[-1]
    if cls.endswith("RMSNormGated"):  # Gated DeltaNet output norm: weight * x (one-centred)
        return _normal(gen, shape, 1.0, 0.1)
    if cls.endswith("RMSNorm"):
        if cls.startswith("Qwen3_5"):  # zero-centred: x * (1 + weight)
            return _normal(gen, shape, 0.0, 0.1)
        # Qwen3 q_norm/k_norm set the attention-score scale: mean QK_NORM_MEAN for sharper attention.
        if leaf in ("q_norm", "k_norm"):
            return _normal(gen, shape, QK_NORM_MEAN, 0.1)
        if mod_name in ("model.norm", "model.language_model.norm"):
            return _normal(gen, shape, FINAL_NORM_MEAN, FINAL_NORM_STD)
        return _normal(gen, shape, 1.0, 0.1)
    if isinstance(module, torch.nn.LayerNorm):
        return _normal(gen, shape, 1.0, 0.1) if pname == "weight" else _normal(gen, shape, 0.0, 0.05)
    if pname == "A_log":  # A = exp(A_log) in [0.5, 4]
        return torch.log(_uniform(gen, shape, 0.5, 4.0))
    if pname == "dt_bias":
        return _uniform(gen, shape, -1.0, 1.0)
    if mod_name.endswith("linear_attn.conv1d"):  # depthwise [C, 1, K]
        return _normal(gen, shape, 0.0, 0.3)
    if cls.endswith("TopKRouter"):
        # Router: logits std ~2, so top-k choices are rarely near-ties.
        return _normal(gen, shape, 0.0, 0.25)
    if isinstance(module, torch.nn.Embedding) and leaf == "embed_tokens":
        return _normal(gen, shape, 0.0, EMBED_STD_TIED if tied else EMBED_STD)
    if leaf == "lm_head":
        return _normal(gen, shape, 0.0, LM_HEAD_STD)
    if pname == "bias" or p.ndim == 1:
        return _normal(gen, shape, 0.0, 0.1)
    if ".visual." in f".{mod_name}.":
        return _normal(gen, shape, 0.0, 0.05)
    # Linear / expert weights: std = gain / sqrt(fan_in).  Residual-branch output projections get a larger gain so
    # the layers (not the token embedding) dominate the residual stream; without q/k norms, q/k get a larger gain
    # for sharper attention.  Both make greedy continuations much less repetitive.
    fan_in = shape[-1]
    if leaf in ("o_proj", "down_proj", "out_proj") or (leaf == "experts" and pname == "down_proj"):
        gain = OUT_GAIN
    elif leaf in ("q_proj", "k_proj") and not has_qk_norm:
        gain = QK_GAIN
    else:
        gain = 1.0
    return _normal(gen, shape, 0.0, gain / math.sqrt(fan_in))


def canonical_param_name(name: str) -> str:
    """Text-model parameter name independent of the wrapper (ForCausalLM vs ForConditionalGeneration)."""
    return name.replace("model.language_model.", "model.", 1)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, tied: bool = False) -> None:
    """Overwrite every parameter of `model` in place with seeded random values.

    Each parameter gets its own generator seeded from (seed, canonical name), so the text weights are
    identical across the text-only / multimodal wrappers and the per-expert / fused layouts of a kind.
    """
    seen = set()
    has_qk_norm = any(n.endswith(".q_norm") for n, _ in model.named_modules())
    for mod_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied lm_head
                continue
            seen.add(id(p))
            full = f"{mod_name}.{pname}" if mod_name else pname
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{canonical_param_name(full)}".encode()))
            value = _random_value(module, pname, mod_name, p, gen, tied, has_qk_norm)
            p.copy_(value.to(p.dtype))
    # Nothing may be left at a constant init value (all zeros / all ones).
    for name, p in model.named_parameters():
        if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
            raise AssertionError(f"parameter {name} was not randomized")


# ----------------------------------------------------------------------------------------------------------------
# safetensors helpers (header-level)
# ----------------------------------------------------------------------------------------------------------------

_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _read_header(path: pathlib.Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _safetensors_files(model_dir: pathlib.Path) -> list[pathlib.Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / f for f in files]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {model_dir}")
    return files


def checkpoint_tensor_names(model_dir) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, dtype)} for every tensor of a (sharded or single-file) checkpoint.

    dtype is a torch-style string ("float32", "bfloat16", ...).  Only the safetensors headers are read.
    """
    model_dir = pathlib.Path(model_dir)
    out = {}
    for path in _safetensors_files(model_dir):
        for name, info in _read_header(path).items():
            if name == "__metadata__":
                continue
            out[name] = (tuple(info["shape"]), _ST_DTYPES.get(info["dtype"], info["dtype"]))
    return out


def checkpoint_tensor_files(model_dir) -> dict[str, str]:
    """{tensor name: file name} (which shard holds each tensor)."""
    model_dir = pathlib.Path(model_dir)
    out = {}
    for path in _safetensors_files(model_dir):
        for name in _read_header(path):
            if name != "__metadata__":
                out[name] = path.name
    return out


# ----------------------------------------------------------------------------------------------------------------
# MTP tensors
# ----------------------------------------------------------------------------------------------------------------


def _mtp_tensors(text_cfg, kind: str, fused_experts: bool, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Qwen3.5/Qwen3-Next-like `mtp.*` tensors (1 MTP layer).  Never used by the HF model (ignored on load)."""
    gen = torch.Generator().manual_seed(seed + 7919)
    H = text_cfg.hidden_size
    hd = getattr(text_cfg, "head_dim", None) or H // text_cfg.num_attention_heads
    nh, nkv = text_cfg.num_attention_heads, text_cfg.num_key_value_heads
    q_out = nh * hd * (2 if kind in HYBRID_KINDS else 1)  # Qwen3.5 attention has the output gate fused into q_proj
    zero_centred = kind in HYBRID_KINDS
    norm_mean = 0.0 if zero_centred else 1.0

    def lin(o, i):
        return _normal(gen, (o, i), 0.0, 1.0 / math.sqrt(i))

    def norm(n):
        return _normal(gen, (n,), norm_mean, 0.1)

    p = "mtp.layers.0."
    t = {
        "mtp.fc.weight": lin(H, 2 * H),
        "mtp.pre_fc_norm_embedding.weight": norm(H),
        "mtp.pre_fc_norm_hidden.weight": norm(H),
        "mtp.norm.weight": norm(H),
        p + "input_layernorm.weight": norm(H),
        p + "post_attention_layernorm.weight": norm(H),
        p + "self_attn.q_proj.weight": lin(q_out, H),
        p + "self_attn.k_proj.weight": lin(nkv * hd, H),
        p + "self_attn.v_proj.weight": lin(nkv * hd, H),
        p + "self_attn.o_proj.weight": lin(H, nh * hd),
        p + "self_attn.q_norm.weight": norm(hd),
        p + "self_attn.k_norm.weight": norm(hd),
    }
    if kind in MOE_KINDS:
        E, I = text_cfg.num_experts, text_cfg.moe_intermediate_size
        t[p + "mlp.gate.weight"] = _normal(gen, (E, H), 0.0, 0.25)
        if fused_experts:
            t[p + "mlp.experts.gate_up_proj"] = _normal(gen, (E, 2 * I, H), 0.0, 1.0 / math.sqrt(H))
            t[p + "mlp.experts.down_proj"] = _normal(gen, (E, H, I), 0.0, 1.0 / math.sqrt(I))
        else:
            for e in range(E):
                t[p + f"mlp.experts.{e}.gate_proj.weight"] = lin(I, H)
                t[p + f"mlp.experts.{e}.up_proj.weight"] = lin(I, H)
                t[p + f"mlp.experts.{e}.down_proj.weight"] = lin(H, I)
        S = getattr(text_cfg, "shared_expert_intermediate_size", None)
        if S:
            t[p + "mlp.shared_expert.gate_proj.weight"] = lin(S, H)
            t[p + "mlp.shared_expert.up_proj.weight"] = lin(S, H)
            t[p + "mlp.shared_expert.down_proj.weight"] = lin(H, S)
            t[p + "mlp.shared_expert_gate.weight"] = lin(1, H)
    else:
        I = text_cfg.intermediate_size
        t[p + "mlp.gate_proj.weight"] = lin(I, H)
        t[p + "mlp.up_proj.weight"] = lin(I, H)
        t[p + "mlp.down_proj.weight"] = lin(H, I)
    return {k: v.to(dtype).contiguous() for k, v in t.items()}


def _add_mtp(out_dir: pathlib.Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    index_path = out_dir / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        target = sorted(set(index["weight_map"].values()))[-1]  # append to the last shard
    else:
        index, target = None, "model.safetensors"
    path = out_dir / target
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {"format": "pt"}
        existing = {k: f.get_tensor(k) for k in f.keys()}
    clash = set(existing) & set(tensors)
    assert not clash, clash
    existing.update(tensors)
    save_file(existing, str(path), metadata=metadata)
    if index is not None:
        for k in tensors:
            index["weight_map"][k] = target
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        extra = sum(v.numel() * v.element_size() for v in tensors.values())
        index.setdefault("metadata", {})
        if "total_size" in index["metadata"]:
            index["metadata"]["total_size"] = int(index["metadata"]["total_size"]) + extra
        if "total_parameters" in index["metadata"]:
            index["metadata"]["total_parameters"] = int(index["metadata"]["total_parameters"]) + sum(
                v.numel() for v in tensors.values())
        index_path.write_text(json.dumps(index, indent=2, sort_keys=False) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Public builder
# ----------------------------------------------------------------------------------------------------------------


def build_checkpoint(
    kind: str,
    out_dir,
    *,
    dtype: str = "float32",
    tied: bool = False,
    fused_experts: bool = False,
    multimodal: bool = False,
    add_mtp: bool = False,
    num_layers: int | None = None,
    layer_types: list[str] | None = None,
    max_shard_size: str | None = None,
    with_tokenizer: bool = False,
    seed: int = 0,
    max_position_embeddings: int = MAX_POS,
    vocab_size: int | None = None,
) -> pathlib.Path:
    """Build a tiny randomized HF checkpoint of `kind` into out_dir and return out_dir as a Path.

    fused_experts: MoE experts saved as `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows first, then up)
        and `mlp.experts.down_proj` [E, H, I]; default is per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight`.
    multimodal: (qwen3_5*) save the *ForConditionalGeneration model with a tiny vision tower
        (`model.language_model.*`, `model.visual.*`, `lm_head.weight`; config.json has text_config/vision_config).
    add_mtp: add `mtp.*` tensors and `mtp_num_hidden_layers: 1` to the (text) config.
    max_position_embeddings: the context the config declares (default 2048).
    vocab_size: the (text) vocabulary instead of VOCAB_SIZE.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}")
    if fused_experts and kind not in MOE_KINDS:
        raise ValueError("fused_experts=True needs an MoE kind")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    config = make_config(kind, tied=tied, multimodal=multimodal, num_layers=num_layers, layer_types=layer_types,
                         max_position_embeddings=max_position_embeddings)
    if vocab_size is not None:
        config.get_text_config().vocab_size = vocab_size
    _, model_cls = _classes(kind, multimodal)
    torch_dtype = _DTYPES[dtype]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.eval()
    randomize_(model, seed=seed, tied=tied)
    model.to(torch_dtype)
    model.config.dtype = torch_dtype  # recorded in config.json as "dtype"

    save_kwargs = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    # transformers 5 stores MoE experts fused in memory; save_original_format=True (default) reverts the
    # conversion mapping and writes per-expert tensors, False writes the in-memory fused 3-D tensors.
    model.save_pretrained(out_dir, save_original_format=not fused_experts, **save_kwargs)

    text_cfg = config.get_text_config()
    if add_mtp:
        _add_mtp(out_dir, _mtp_tensors(text_cfg, kind, fused_experts, torch_dtype, seed))

    # config.json fix-ups (in the text config for multimodal checkpoints).
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    text_json = cfg["text_config"] if multimodal else cfg
    if "num_local_experts" in text_json and "num_experts" not in text_json:
        # Qwen3MoeConfig serializes num_experts as "num_local_experts" (attribute_map); real Qwen3-MoE checkpoints
        # use "num_experts", which transformers maps back on load.
        text_json["num_experts"] = text_json.pop("num_local_experts")
    if add_mtp:
        text_json["mtp_num_hidden_layers"] = 1
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    if with_tokenizer:
        tok = build_tokenizer(out_dir, vocab_size=TOKENIZER_VOCAB_SIZE)
        assert len(tok) <= text_cfg.vocab_size
        assert tok.eos_token_id == text_cfg.eos_token_id == EOS_TOKEN_ID
        assert tok.pad_token_id == text_cfg.pad_token_id == PAD_TOKEN_ID
    return out_dir
