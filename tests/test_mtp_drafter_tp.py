"""The NEXTN drafter under tensor parallelism: two gloo ranks on loopback build the MoE model as tp2 of one
stage, run the drafter's test schedule (`support/mtp_schedule.py`) and return every draft and its logits. Both
ranks draft the same tokens (the argmax is over the all-gathered vocabulary), equal to the one-process drafter's,
with logits within 1e-4 of it (TP changes the reduction order). Slow (two spawned interpreters): -m slow."""

from __future__ import annotations

import pytest
import torch

from support.mtp_schedule import build, run_schedule
from support.spawned_ranks import run_in_gloo_world

KIND = "qwen3_5_moe"


def drafts_of(model_dir, layout=None) -> list[tuple[str, int, list[int], list]]:
    config, model = build(model_dir, KIND, layout)
    # plain lists: a tensor in a Queue is shared through a socket that dies with its process
    return [(r.key, last, drafts, logits.tolist()) for r, last, drafts, logits in run_schedule(model, config)]


def tp_rank(rank: int, model_dir) -> list:
    from tandem.models.registry import load_model_config
    from tandem.parallel.layout import GroupInfo, ParallelLayout

    config = load_model_config(model_dir)
    return drafts_of(model_dir, ParallelLayout(GroupInfo(rank, 2, None, (0, 1)), GroupInfo.alone(),
                                               (config.num_layers,)))


@pytest.mark.slow
def test_tp2_ranks_draft_the_same_tokens_as_one_process(ckpt):
    model_dir = ckpt(KIND, add_mtp=True)
    expected = drafts_of(model_dir)
    out = run_in_gloo_world(tp_rank, 2, model_dir, timeout=600)
    assert [d for _, _, d, _ in out[0]] == [d for _, _, d, _ in out[1]]
    for rank in (0, 1):
        assert len(out[rank]) == len(expected)
        for (key, last, drafts, logits), (key1, last1, drafts1, logits1) in zip(out[rank], expected):
            assert (key, last, drafts) == (key1, last1, drafts1), f"rank {rank}"
            torch.testing.assert_close(torch.tensor(logits), torch.tensor(logits1), atol=1e-4, rtol=1e-4)
