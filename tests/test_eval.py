"""`tandem eval` and the default model's task: the answer checker, the held-out set, config parsing, and
the pipeline accuracy check itself on the bundled models/default (pp1 vs pp2 on 20 problems)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tandem.cli import main
from tandem.commands.eval import ParallelConfig, check, parse_configs
from tandem.errors import ConfigError
from tandem.evaluation import (
    HELDOUT_SIZE,
    Problem,
    TrainingSampler,
    extract_answer,
    heldout_problems,
    is_correct,
    parse_problem,
)

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "default"


def test_answer_checker():
    p = Problem(12, 345)
    assert p.answer == "357" and p.completion_prompt == "12+345=" and p.chat_question == "12+345"
    assert is_correct("357", p) and is_correct(" 357\n", p)
    for wrong in ("", "35", "3570", "358", "357 apples", "0357", "357+1", None):
        assert not is_correct(wrong, p), wrong
    assert extract_answer(" 357<junk>") == "357" and extract_answer("abc") is None
    assert parse_problem("12+345=") == p and parse_problem(" 12 + 345 ") == p
    with pytest.raises(ValueError):
        parse_problem("12-345=")


def test_heldout_set_is_deterministic_and_disjoint_from_training():
    heldout = heldout_problems()
    assert len(heldout) == HELDOUT_SIZE and heldout == heldout_problems()
    assert heldout_problems(20) == heldout[:20]
    keys = {(min(p.a, p.b), max(p.a, p.b)) for p in heldout}
    assert len(keys) == len(heldout)
    assert all(0 <= x < 1000 for p in heldout for x in (p.a, p.b))
    sampler = TrainingSampler(seed=0)
    drawn = [sampler() for _ in range(20000)]
    assert not keys & {(min(p.a, p.b), max(p.a, p.b)) for p in drawn}


def test_parse_configs():
    assert parse_configs("pp1,pp2,pp4,tp2,tp2pp2") == [
        ParallelConfig("pp1", 1, 1), ParallelConfig("pp2", 1, 2), ParallelConfig("pp4", 1, 4),
        ParallelConfig("tp2", 2, 1), ParallelConfig("tp2pp2", 2, 2)]
    for bad in ("", "pp", "pp0", "tp2x", "pp2tp2", "pp1,,pp2"):
        with pytest.raises(ConfigError):
            parse_configs(bad)


def test_check_flags_drops_over_two_points():
    report = {"configs": [{"config": "pp1", "accuracy": 0.95}, {"config": "pp2", "accuracy": 0.93},
                          {"config": "pp4", "accuracy": 0.925}]}
    assert check(report) == ["pp4"]
    assert check(report, max_drop=5) == []


def test_eval_pp1_vs_pp2_on_default_model(capsys):
    assert (DEFAULT_MODEL / "config.json").is_file(), "models/default is missing: run scripts/train_default_model.py"
    rc = main(["eval", "--model-path", str(DEFAULT_MODEL), "--configs", "pp1,pp2", "--limit", "20", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["passed"]
    base, pp2 = report["configs"]
    assert base["config"] == "pp1" and pp2["config"] == "pp2" and base["total"] == pp2["total"] == 20
    assert pp2["accuracy"] == base["accuracy"]
    assert pp2["agreement"] == 1.0
    assert [o["output_ids"] for o in pp2["outputs"]] == [o["output_ids"] for o in base["outputs"]]
    assert base["accuracy"] >= 0.9, [o for o in base["outputs"] if not o["correct"]]
