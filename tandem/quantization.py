"""The checkpoint's `quantization_config` (config.json): block-wise FP8 (`Fp8Config`), the format of DeepSeek's
and Qwen's FP8 releases. Any other quantization method, and any FP8 setting Tandem does not implement, is
refused with a `ConfigError` naming it.

A quantized linear weight `<name>.weight` is stored as float8_e4m3fn with `<name>.weight_scale_inv` of shape
`[ceil(out / B0), ceil(in / B1)]`, `(B0, B1) = weight_block_size`: the weight is the FP8 value times the scale
of its block. Which modules are quantized is decided here from names alone (`quantized_module`), so a stage
and `tandem plan` know it before any tensor is read."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tandem.errors import ConfigError

SUPPORTED_KEYS = frozenset({"quant_method", "fmt", "activation_scheme", "weight_block_size",
                            "modules_to_not_convert"})
DEFAULT_BLOCK = (128, 128)  # `tandem plan --dtype fp8` on a config without quantization_config
# Modules every FP8 release keeps in high precision, whether or not its modules_to_not_convert lists them: the
# MoE router and shared-expert gate (tiny, and routing is sensitive) and Gated DeltaNet's per-head a/b inputs.
NEVER_QUANTIZED = ("mlp.gate", "mlp.shared_expert_gate", "linear_attn.in_proj_a", "linear_attn.in_proj_b")


@dataclass(frozen=True)
class Fp8Config:
    """Block-wise FP8 weights (e4m3), activations kept in the engine's dtype (`activation_scheme: dynamic`)."""

    weight_block_size: tuple[int, int] = DEFAULT_BLOCK
    modules_to_not_convert: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict) -> Fp8Config:
        if not isinstance(raw, dict):
            raise ConfigError(f"quantization_config must be an object, got {raw!r}")
        method = raw.get("quant_method")
        if method != "fp8":
            raise ConfigError(f"quantization_config quant_method {method!r} is not supported: Tandem reads "
                              f"block-wise 'fp8' checkpoints only")
        unknown = sorted(set(raw) - SUPPORTED_KEYS)
        if unknown:
            raise ConfigError(f"quantization_config has setting(s) Tandem does not implement: {', '.join(unknown)}")
        if raw.get("fmt", "e4m3") != "e4m3":
            raise ConfigError(f"quantization_config fmt {raw['fmt']!r} is not supported: only 'e4m3'")
        if raw.get("activation_scheme", "dynamic") != "dynamic":
            raise ConfigError(f"quantization_config activation_scheme {raw['activation_scheme']!r} is not "
                              f"supported: only 'dynamic' (no activation scales in the checkpoint)")
        block = raw.get("weight_block_size")
        if block is None:
            raise ConfigError("quantization_config has no weight_block_size: per-tensor FP8 is not supported, "
                              "only block-wise FP8")
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise ConfigError(f"quantization_config weight_block_size must be two positive integers, got {block!r}")
        skip = raw.get("modules_to_not_convert") or []
        if not isinstance(skip, list) or not all(isinstance(m, str) for m in skip):
            raise ConfigError(f"quantization_config modules_to_not_convert must be a list of names, got {skip!r}")
        return cls((block[0], block[1]), tuple(skip))

    @classmethod
    def from_config_json(cls, raw: dict) -> Fp8Config | None:
        """The quantization of a config.json (top level, or a multimodal checkpoint's text_config)."""
        spec = raw.get("quantization_config", (raw.get("text_config") or {}).get("quantization_config"))
        return None if spec is None else cls.from_dict(spec)

    def quantized_module(self, checkpoint_module: str) -> bool:
        """Whether the linear module of this checkpoint name (e.g. `model.layers.3.mlp.down_proj`) is stored
        in FP8. An entry of modules_to_not_convert matches whole name components (`lm_head`, `model.visual`,
        `model.layers.0.self_attn.q_proj` or `mlp.gate` for every layer's router)."""
        return not _matches(checkpoint_module, self.modules_to_not_convert + NEVER_QUANTIZED)

    def describe(self) -> str:
        return f"fp8 e4m3, blocks {self.weight_block_size[0]}x{self.weight_block_size[1]}"


def _matches(name: str, patterns: Iterable[str]) -> bool:
    dotted = f".{name}."
    return any(f".{pattern.strip('.')}." in dotted for pattern in patterns if pattern.strip("."))
