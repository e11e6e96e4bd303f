"""The bundled model's long-answer task (`tandem/evaluation/counting.py`): the answer and prompts, the checker,
the held-out set (deterministic, within bounds, disjoint from what training draws), and its items for
`tandem eval --task counting`."""

from __future__ import annotations

from support.checkpoints import build_checkpoint
from tandem.commands.eval import load_items
from tandem.evaluation.counting import (
    HELDOUT_SIZE,
    LARGEST,
    MAX_ANSWER_TOKENS,
    MAX_COUNT,
    MIN_COUNT,
    CountProblem,
    CountTrainingSampler,
    heldout_count_problems,
    is_count_correct,
)


def test_answer_prompts_and_checker():
    p = CountProblem(98, 102)
    assert p.answer == "98 99 100 101 102"
    assert p.completion_prompt == "98..102=" and p.chat_question == "98..102"
    assert p.chat_messages() == [{"role": "user", "content": "98..102"}]
    assert is_count_correct(" 98 99 100 101 102\n", p)
    for wrong in ("98 99 100 101", "98 99 100 101 102 103", "98 99 100 101 102 x", "9899100101102", ""):
        assert not is_count_correct(wrong, p), wrong


def test_heldout_set_is_deterministic_bounded_and_disjoint_from_training():
    heldout = heldout_count_problems()
    assert len(heldout) == HELDOUT_SIZE == len(set(heldout)) and heldout == heldout_count_problems()
    assert heldout_count_problems(10) == heldout[:10]
    for p in heldout:
        assert 0 <= p.start and p.end <= LARGEST and MIN_COUNT <= p.end - p.start + 1 <= MAX_COUNT
        assert len(p.answer) + 1 <= MAX_ANSWER_TOKENS  # one byte token per character, plus EOS
    assert len({p.end - p.start for p in heldout}) == MAX_COUNT - MIN_COUNT + 1  # every length occurs
    sampler = CountTrainingSampler(seed=0)
    drawn = {sampler() for _ in range(20000)}
    assert not drawn & set(heldout) and len(drawn) > 3000


def test_eval_items_of_the_counting_task(tmp_path):
    model_dir = build_checkpoint("llama", tmp_path / "m", with_tokenizer=True)
    task, items = load_items(str(model_dir), None, "completion", 3, task="counting")
    assert task == "3 held-out counting problems, format completion"
    assert [(i.prompt, i.answer) for i in items] == [(p.completion_prompt, p.answer) for p in heldout_count_problems(3)]
