"""The control plane's messages and their codec: typed msgspec structs (one per kind), encoded as msgpack
and authenticated with an HMAC-SHA256 over each payload under a per-launch secret. Nothing received is ever
unpickled or executed: a frame that fails authentication or does not decode into one of the expected kinds
is dropped with a warning (`Codec.decode` returns None), so a stranger on the network can neither drive a
rank nor crash the driver.

Driver -> ranks: `RunStep`, `AskReport`, `Stop`. Ranks -> driver: `Ready`, `Report`, `Result`, `Failure`.
A rank process gets its `Launch` (rank, addresses, engine settings, the secret) on stdin, encoded the same
way (msgpack, no pickle)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from typing import Any

import msgspec

from tandem.config import EngineArgs
from tandem.runtime.stage_report import StageReport
from tandem.runtime.step import StepInput, StepOutput

logger = logging.getLogger("tandem")


class RunStep(msgspec.Struct, tag="step"):
    step_id: int
    step: StepInput


class AskReport(msgspec.Struct, tag="ask_report"):
    pass


class Stop(msgspec.Struct, tag="stop"):
    pass


class Ready(msgspec.Struct, tag="ready"):
    rank: int
    report: StageReport


class Report(msgspec.Struct, tag="report"):
    rank: int
    report: StageReport


class Result(msgspec.Struct, tag="result"):
    step_id: int
    output: StepOutput


class Failure(msgspec.Struct, tag="failure"):
    rank: int
    cause: str


DriverMessage = RunStep | AskReport | Stop
RankMessage = Ready | Report | Result | Failure


class Launch(msgspec.Struct):
    """What a rank process needs to start, sent on its stdin."""

    rank: int
    world_size: int
    local_world_size: int
    init_method: str
    steps_addr: str  # driver's PUB socket
    results_addr: str  # driver's PULL socket
    partition: list[int]
    secret: bytes
    args: EngineArgs
    progress: bool = True  # show the loading progress bar (rank 0 only)


def new_secret() -> bytes:
    return secrets.token_bytes(32)


def secret_from_token(token: str) -> bytes:
    """The shared secret of a multi-node run, from `--dist-auth-token` (the same text on every node)."""
    return hashlib.sha256(b"tandem-dist-auth:" + token.encode()).digest()


class Codec:
    """Encodes messages as [mac, payload] frames; decodes only authentic frames of the `accepts` kinds."""

    def __init__(self, secret: bytes, accepts: Any):
        if len(secret) < 16:
            raise ValueError("the control-plane secret must be at least 16 bytes")
        self._secret = secret
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(accepts)

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()

    def encode(self, message) -> list[bytes]:
        payload = self._encoder.encode(message)
        return [self._mac(payload), payload]

    def decode(self, frames: list[bytes]):
        """The message, or None (logged) for anything unauthenticated or malformed."""
        if len(frames) != 2:
            logger.warning("control plane: dropped a message of %d frame(s) (expected 2)", len(frames))
            return None
        mac, payload = frames
        if not hmac.compare_digest(mac, self._mac(payload)):
            logger.warning("control plane: dropped an unauthenticated message (%d bytes)", len(payload))
            return None
        try:
            return self._decoder.decode(payload)
        except Exception as exc:  # msgspec's decode/validation errors, or a struct's own __post_init__ check
            logger.warning("control plane: dropped a malformed message: %s", exc)
            return None


def encode_launch(launch: Launch) -> bytes:
    return msgspec.msgpack.encode(launch)


def decode_launch(data: bytes) -> Launch:
    return msgspec.msgpack.decode(data, type=Launch)
