"""Configuration: `ModelConfig` (the text model's shape, read from a checkpoint's config.json through
transformers), `EngineArgs` (every engine setting as given, frozen; CLI flags are derived from it) and
`EngineConfig` (the settings resolved once against the model and the device: every default filled in, so no
other module re-derives one)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tandem.errors import CheckpointError, ConfigError
from tandem.quantization import Fp8Config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Share of device memory for weights + caches + activations when --mem-fraction-static is not given. CPU
# leaves more for the driver process, the tokenizer and the OS, which share the machine's RAM with the ranks.
DEFAULT_MEM_FRACTION = {"cuda": 0.88, "cpu": 0.8}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


def parse_dtype(name: str) -> torch.dtype:
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[name]


INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU int4 kernel takes


@dataclass(frozen=True)
class WeightOnlySpec:
    """A `--torchao-config` value Tandem implements: int8wo, or int4wo-<group> (layers/weight_only.py)."""

    name: str
    bits: int
    group_size: int | None = None

    @classmethod
    def parse(cls, value: str) -> WeightOnlySpec | None:
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise ConfigError(f"torchao_config must be a string, got {value!r}")
        if value == "int8wo":
            return cls(value, 8)
        kind, _, group = value.partition("-")
        if kind == "int4wo" and group.isdigit() and int(group) in INT4_GROUP_SIZES:
            return cls(value, 4, int(group))
        groups = " | ".join(f"int4wo-{g}" for g in INT4_GROUP_SIZES)
        raise ConfigError(f"unsupported torchao_config {value!r}; Tandem implements int8wo | {groups}")


@dataclass(frozen=True)
class ModelConfig:
    """The decoder-only text model, normalised across families."""

    architecture: str
    model_type: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    hidden_act: str
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_parameters: dict
    partial_rotary_factor: float
    layer_types: tuple[str, ...]
    # Gated DeltaNet (Qwen3.5 linear attention)
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    # Mixture of experts
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    moe_layers: tuple[bool, ...] = ()
    # checkpoint layout
    weight_prefix: str = "model."
    multimodal: bool = False
    mtp_num_hidden_layers: int = 0
    checkpoint_dtype: torch.dtype = torch.float32
    quantization: Fp8Config | None = None  # config.json quantization_config (block-wise FP8 weights)
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    hf_config: Any = field(default=None, repr=False, compare=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[layer_idx]

    def hf_flag(self, name: str, default=None):
        """A setting of the checkpoint's (text) config that only some families have; model classes read
        their own flags through this, so this module knows no family."""
        value = getattr(self.hf_config, name, None)
        return default if value is None else value

    @staticmethod
    def _read_raw(model_path: str | os.PathLike) -> tuple[Path, dict]:
        path = Path(model_path)
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise CheckpointError(f"no config.json found at {path}: expected a Hugging Face checkpoint directory")
        raw = json.loads(config_file.read_text())
        if not raw.get("architectures"):
            raise ConfigError(f"{config_file} has no 'architectures' entry; cannot tell which model to build")
        return config_file, raw

    @classmethod
    def architecture_of(cls, model_path: str | os.PathLike) -> str:
        """config.json's `architectures[0]`."""
        return cls._read_raw(model_path)[1]["architectures"][0]

    @classmethod
    def from_hf(cls, model_path: str | os.PathLike) -> "ModelConfig":
        """The text model's shape. Whether the architecture is supported is the model registry's concern
        (`tandem.models.registry.load_model_config`)."""
        config_file, raw = cls._read_raw(model_path)
        architecture = raw["architectures"][0]
        from transformers import AutoConfig

        try:
            hf_full = AutoConfig.from_pretrained(str(config_file.parent), trust_remote_code=False)
        except Exception as exc:  # transformers' validators raise several unrelated exception types
            raise ConfigError(f"{config_file} is not a valid {architecture} config: {exc}") from exc
        multimodal = "text_config" in raw
        hf = hf_full.get_text_config() if multimodal else hf_full
        return cls._from_text_config(architecture, hf, raw, multimodal)

    @classmethod
    def _from_text_config(cls, architecture: str, hf: Any, raw: dict, multimodal: bool) -> ModelConfig:
        get = lambda key, default=None: getattr(hf, key, default) if getattr(hf, key, None) is not None else default
        num_layers = hf.num_hidden_layers
        num_heads = hf.num_attention_heads
        head_dim = get("head_dim") or hf.hidden_size // num_heads
        rope = dict(get("rope_parameters") or {})
        rope.setdefault("rope_type", "default")
        rope.setdefault("rope_theta", get("rope_theta", 10000.0))
        partial = rope.get("partial_rotary_factor", get("partial_rotary_factor", 1.0))
        model_type = hf.model_type
        layer_types = tuple(get("layer_types") or ["full_attention"] * num_layers)
        if len(layer_types) != num_layers:
            raise ConfigError(f"layer_types has {len(layer_types)} entries but num_hidden_layers is {num_layers}")
        num_experts = get("num_experts", 0) or 0
        moe_layers: tuple[bool, ...] = ()
        if num_experts:
            step = get("decoder_sparse_step", 1) or 1
            mlp_only = set(get("mlp_only_layers", []) or [])
            moe_layers = tuple(i not in mlp_only and (i + 1) % step == 0 for i in range(num_layers))
        eos = get("eos_token_id")
        eos_ids = tuple(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
        text_raw = raw.get("text_config", raw)
        dtype_name = text_raw.get("dtype") or text_raw.get("torch_dtype") or raw.get("dtype") or raw.get("torch_dtype")
        return cls(
            architecture=architecture,
            model_type=model_type,
            hidden_size=hf.hidden_size,
            num_layers=num_layers,
            vocab_size=hf.vocab_size,
            num_heads=num_heads,
            num_kv_heads=get("num_key_value_heads", num_heads),
            head_dim=head_dim,
            intermediate_size=get("intermediate_size", 0),
            rms_norm_eps=get("rms_norm_eps", 1e-6),
            hidden_act=get("hidden_act", "silu"),
            max_position_embeddings=get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", get("tie_word_embeddings", False))),
            rope_parameters=rope,
            partial_rotary_factor=float(partial),
            layer_types=layer_types,
            linear_num_key_heads=get("linear_num_key_heads", 0),
            linear_num_value_heads=get("linear_num_value_heads", 0),
            linear_key_head_dim=get("linear_key_head_dim", 0),
            linear_value_head_dim=get("linear_value_head_dim", 0),
            linear_conv_kernel_dim=get("linear_conv_kernel_dim", 0),
            num_experts=num_experts,
            num_experts_per_tok=get("num_experts_per_tok", 0) or 0,
            moe_intermediate_size=get("moe_intermediate_size", 0) or 0,
            shared_expert_intermediate_size=get("shared_expert_intermediate_size", 0) or 0,
            moe_layers=moe_layers,
            weight_prefix="model.language_model." if multimodal else "model.",
            multimodal=multimodal,
            mtp_num_hidden_layers=get("mtp_num_hidden_layers", 0) or 0,
            checkpoint_dtype=parse_dtype(str(dtype_name)) if dtype_name else torch.float32,
            quantization=Fp8Config.from_config_json(raw),
            eos_token_ids=eos_ids,
            bos_token_id=get("bos_token_id"),
            hf_config=hf,
        )


@dataclass(frozen=True)
class EngineArgs:
    """Every engine setting, as given (None: the default, resolved by `EngineConfig.resolve`). `tandem
    serve/generate` flags are generated from these fields. Frozen: a changed setting is a new value
    (`dataclasses.replace`), and only these settings, not derived ones, cross to the rank processes."""

    model_path: str
    tp_size: int = 1
    pp_size: int = 1
    dtype: str = "auto"
    device: str = "cpu"
    pp_layer_partition: str | list[int] | None = None
    context_length: int | None = None  # default: the model's own limit (max_position_embeddings)
    max_running_requests: int | None = None  # upper bound; default derived from the cache capacity
    max_total_tokens: int | None = None  # KV tokens per stage; default sized from memory
    mem_fraction_static: float | None = None  # default 0.88 of CUDA memory, 0.8 of available RAM on CPU
    page_size: int = 16
    disable_radix_cache: bool = False
    chunked_prefill_size: int = 512
    num_micro_batches: int | None = None  # steps in flight at once; default pp_size (all stages busy)
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None
    dist_auth_token: str | None = None  # shared secret of a multi-node run's control plane
    max_rank_restarts: int = 3  # restarts of the ranks allowed within rank_restart_window; one more failure is final
    rank_restart_window: float = 300.0  # seconds
    log_level: str = "info"
    torchao_config: str = ""  # weight-only quantization at load: int8wo | int4wo-<group> (CPU only)
    # speculative decoding (SGLang's names; checked and defaulted by `SpeculativeConfig.resolve`)
    speculative_algorithm: str | None = None  # NGRAM | NEXTN (alias MTP); None: off
    speculative_num_steps: int | None = None  # draft tokens per verify pass (a chain); default 3
    speculative_eagle_topk: int | None = None  # 1 only (chains; trees are not supported)
    speculative_num_draft_tokens: int | None = None  # chain: num_steps + 1 (the last token and its drafts)
    speculative_ngram_min_match_window_size: int = 1  # NGRAM: the shortest suffix n-gram looked up
    speculative_ngram_max_match_window_size: int = 12  # NGRAM: the longest

    def __post_init__(self) -> None:
        optional = ("max_running_requests", "max_total_tokens", "context_length")
        for name in ("tp_size", "pp_size", "nnodes", "chunked_prefill_size", "page_size") + optional:
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_total_tokens is not None and self.max_total_tokens < self.page_size:
            raise ConfigError(f"max_total_tokens ({self.max_total_tokens}) must hold at least one page of "
                              f"page_size={self.page_size} tokens")
        fraction = self.mem_fraction_static
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                     or not 0 < fraction <= 1):
            raise ConfigError(f"mem_fraction_static must be a number in (0, 1], got {fraction!r}")
        if not isinstance(self.disable_radix_cache, bool):
            raise ConfigError(f"disable_radix_cache must be a boolean, got {self.disable_radix_cache!r}")
        if not isinstance(self.max_rank_restarts, int) or isinstance(self.max_rank_restarts, bool) \
                or self.max_rank_restarts < 0:
            raise ConfigError(f"max_rank_restarts must be a non-negative integer, got {self.max_rank_restarts!r}")
        if not isinstance(self.rank_restart_window, (int, float)) or not self.rank_restart_window > 0:
            raise ConfigError(f"rank_restart_window must be a positive number of seconds, got "
                              f"{self.rank_restart_window!r}")
        if self.dtype != "auto":
            parse_dtype(self.dtype)
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"node_rank must be in [0, nnodes={self.nnodes}), got {self.node_rank}")
        if self.world_size % self.nnodes:
            raise ConfigError(f"tp_size*pp_size={self.world_size} is not divisible by nnodes={self.nnodes}")
        if self.weight_only() is not None and self.device != "cpu":
            raise ConfigError(f"torchao_config {self.torchao_config!r} is implemented for device='cpu' only")
        SpeculativeConfig.resolve(self)  # refuses a bad combination at once

    def weight_only(self) -> WeightOnlySpec | None:
        return WeightOnlySpec.parse(self.torchao_config)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SPECULATIVE_ALGORITHMS = {"NGRAM": "NGRAM", "NEXTN": "NEXTN", "MTP": "NEXTN"}  # MTP: SGLang's alias of NEXTN
DEFAULT_SPECULATIVE_NUM_STEPS = 3  # SGLang's auto-chosen chain (steps 3, topk 1, draft tokens 4)


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding, resolved from `EngineArgs`: `algorithm` NGRAM (drafts looked up in the request's
    own tokens, on the driver) or NEXTN (the model's MTP head drafts on the last stage); `num_steps` drafts
    per verify pass, a chain (`speculative_eagle_topk` 1, `speculative_num_draft_tokens` = num_steps + 1)."""

    algorithm: str
    num_steps: int
    ngram_min: int = 1
    ngram_max: int = 12

    @classmethod
    def resolve(cls, args: EngineArgs) -> SpeculativeConfig | None:
        given = {name: getattr(args, name) for name in ("speculative_num_steps", "speculative_eagle_topk",
                                                        "speculative_num_draft_tokens")}
        if args.speculative_algorithm is None:
            extra = [name for name, value in given.items() if value is not None]
            if extra:
                raise ConfigError(f"{extra[0]} needs speculative_algorithm (NGRAM, NEXTN or MTP)")
            return None
        name = str(args.speculative_algorithm).upper()
        if name not in SPECULATIVE_ALGORITHMS:
            raise ConfigError(f"unsupported speculative_algorithm {args.speculative_algorithm!r}; Tandem implements "
                              f"{', '.join(SPECULATIVE_ALGORITHMS)} (MTP is an alias of NEXTN)")
        for key, value in {**given, "speculative_ngram_min_match_window_size":
                           args.speculative_ngram_min_match_window_size,
                           "speculative_ngram_max_match_window_size":
                           args.speculative_ngram_max_match_window_size}.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        if (given["speculative_eagle_topk"] or 1) != 1:
            raise ConfigError(f"speculative_eagle_topk {given['speculative_eagle_topk']}: tree drafts are not "
                              f"supported; use 1 (a chain)")
        steps, drafts = given["speculative_num_steps"], given["speculative_num_draft_tokens"]
        if steps is None:
            steps = drafts - 1 if drafts is not None else DEFAULT_SPECULATIVE_NUM_STEPS
        if steps < 1 or (drafts is not None and drafts != steps + 1):
            raise ConfigError(f"speculative_num_draft_tokens ({drafts}) must be speculative_num_steps + 1 "
                              f"({steps + 1}) for a chain (the last token plus one draft per step)")
        low, high = args.speculative_ngram_min_match_window_size, args.speculative_ngram_max_match_window_size
        if high < low:
            raise ConfigError(f"speculative_ngram_max_match_window_size ({high}) must be >= "
                              f"speculative_ngram_min_match_window_size ({low})")
        return cls(SPECULATIVE_ALGORITHMS[name], steps, low, high)


@dataclass(frozen=True)
class EngineConfig:
    """`EngineArgs` resolved against the model (mini-sglang's `engine/config.py` is the model): the driver
    resolves it once, each rank process again from the same `EngineArgs` it is launched with (a rank reads
    config.json itself; the transformers config does not cross the process boundary)."""

    args: EngineArgs
    model: ModelConfig
    dtype: torch.dtype  # --dtype, or the checkpoint's with "auto"
    context_length: int  # tokens per request (prompt + output): --context-length, else the model's limit
    mem_fraction: float  # --mem-fraction-static, else DEFAULT_MEM_FRACTION of the device
    num_micro_batches: int  # steps kept in flight: --num-micro-batches, else one per pipeline stage
    speculative: SpeculativeConfig | None = None  # speculative decoding, None when off

    @classmethod
    def resolve(cls, args: EngineArgs, model: ModelConfig) -> EngineConfig:
        dtype = model.checkpoint_dtype if args.dtype == "auto" else parse_dtype(args.dtype)
        fraction = args.mem_fraction_static
        return cls(args, model, dtype, args.context_length or model.max_position_embeddings,
                   float(fraction) if fraction is not None else DEFAULT_MEM_FRACTION[args.device],
                   args.num_micro_batches or args.pp_size, SpeculativeConfig.resolve(args))
