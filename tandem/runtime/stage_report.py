"""`StageReport`: what one rank holds and has done, as a typed msgspec struct. A rank builds it
(`ModelRunner.report`), sends it to the driver in its `Ready` / `Report` messages, the driver reads its
capacity from it (`tandem.executors.capacity`) and `Engine.stage_report()` hands it out as a dict
(`to_dict`: the field names are the public keys)."""

from __future__ import annotations

import msgspec


class StageReport(msgspec.Struct, frozen=True):
    pp_rank: int
    pp_size: int
    tp_rank: int
    tp_size: int
    layer_start: int
    layer_end: int
    weight_bytes: int
    kv_cache_bytes: int
    state_cache_bytes: int
    load_seconds: float
    max_total_tokens: int  # agreed by every stage
    page_size: int
    stage_max_total_tokens: int | None  # this stage alone (None: no full-attention layer)
    kv_bytes_per_token: int
    state_slots: int
    state_bytes_per_slot: int
    max_running_requests: int
    context_length: int
    device_memory_bytes: int
    activation_reserve_bytes: int
    tensors_read: list[str]
    bytes_read: int
    step_times: list[tuple[float, float]]  # wall-clock (start, end) of each step's computation
    peak_memory_bytes: int
    # rank processes: (step id, whether the next message had already arrived when the step ended), newest last
    steps_run: list[tuple[int, bool]] = []

    def to_dict(self) -> dict:
        return msgspec.structs.asdict(self)
