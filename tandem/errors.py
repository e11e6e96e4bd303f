"""The exceptions Tandem raises for user-facing problems; each message names what is wrong."""


class TandemError(Exception):
    """Base class of every error Tandem raises on purpose."""


class ConfigError(TandemError, ValueError):
    """An invalid setting or model configuration."""


class PartitionError(ConfigError):
    """An invalid pipeline layer partition."""


class CheckpointError(TandemError):
    """A checkpoint that cannot be loaded: no files, a missing or unexpected tensor, a shape mismatch."""


class UnsupportedArchitectureError(ConfigError):
    """config.json names an architecture Tandem has no model for."""


class RankFailedError(TandemError):
    """A rank process failed; the message names the rank and the cause."""
