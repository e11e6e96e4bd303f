"""`tandem eval` and the default model's task: the answer checker, the held-out set, config parsing, JSONL
rows, the --max-drop rule on made-up results, and the pipeline accuracy check itself on the bundled
models/default (pp1 vs pp2 on 20 addition problems, and on a small JSONL of exact-match and choice rows)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tandem.cli import main
from tandem.commands import eval as eval_command
from tandem.commands.eval import ParallelConfig, check, exit_code, parse_configs
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
from tandem.evaluation.tasks import ChoiceItem, GenerationItem, continuation_ids, data_items, read_jsonl

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


def made_up_report(*accuracies: float) -> dict:
    return {"configs": [{"config": f"c{i}", "tp_size": 1, "pp_size": i + 1, "accuracy": a, "correct": 0, "total": 0,
                         "agreement": 1.0, "token_agreement": None, "max_loglikelihood_diff": None, "seconds": 0.0}
                        for i, a in enumerate(accuracies)],
            "model_path": "m", "task": "t", "num_items": 0, "baseline": "c0"}


def test_max_drop_rule_sets_the_exit_code():
    assert exit_code(made_up_report(0.80, 0.79, 0.781), 2.0) == 0  # 1 and 1.9 points below: within 2
    report = made_up_report(0.80, 0.79, 0.775)  # 2.5 points below
    assert exit_code(report, 2.0) == 1 and report["failed"] == ["c2"] and not report["passed"]
    assert exit_code(made_up_report(0.80, 0.775), 3.0) == 0
    assert exit_code(made_up_report(0.50, 0.90), 2.0) == 0  # better than the baseline is never a failure


def test_cli_exits_non_zero_on_a_drop(monkeypatch, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    seen = {}

    def fake_evaluate(model_path, configs, items, max_new_tokens, **kwargs):
        seen.update(configs=[c.name for c in configs], items=items, max_new_tokens=max_new_tokens)
        return made_up_report(0.9, 0.85)

    monkeypatch.setattr(eval_command, "evaluate", fake_evaluate)
    out = tmp_path / "report.json"
    args = ["eval", "--model-path", str(DEFAULT_MODEL), "--data", str(data), "--configs", "pp1,pp2", "--out", str(out)]
    assert main(args) == 1
    assert "FAIL: c1" in capsys.readouterr().out
    assert json.loads(out.read_text())["failed"] == ["c1"]
    assert seen["configs"] == ["pp1", "pp2"] and seen["items"] == [GenerationItem("completion", "1+1=", "1+1=", "2")]
    assert seen["max_new_tokens"] == eval_command.DATA_MAX_NEW_TOKENS
    assert main([*args, "--max-drop", "5"]) == 0


def test_jsonl_rows_are_checked(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a", "answer": 3}\n\n{"prompt": "b", "choices": ["x", "y"], "label": 1, "id": 7}\n')
    assert read_jsonl(good) == [{"prompt": "a", "answer": "3"}, {"prompt": "b", "choices": ["x", "y"], "label": 1}]
    items = data_items(read_jsonl(good), "completion", tokenizer=None)
    assert items == [GenerationItem("completion", "a", "a", "3"), ChoiceItem("completion", "b", "b", ("x", "y"), 1)]
    for bad, what in [('{"prompt": "a"}', "answer"), ('{"answer": "1"}', "prompt"), ("[1, 2]", "object"),
                      ('{"prompt": "a", "choices": ["x"], "label": 0}', "choices"),
                      ('{"prompt": "a", "choices": ["x", "y"], "label": 2}', "label"), ("{oops", "JSON")]:
        path = tmp_path / "bad.jsonl"
        path.write_text('{"prompt": "ok", "answer": "1"}\n' + bad + "\n")
        with pytest.raises(ConfigError, match=f"bad.jsonl:2: .*{what}"):
            read_jsonl(path)
    with pytest.raises(ConfigError, match="no rows"):
        (tmp_path / "empty.jsonl").write_text("\n")
        read_jsonl(tmp_path / "empty.jsonl")


def test_continuation_tokens_split_as_lm_eval_does():
    from tandem.engine import load_tokenizer

    tokenizer = load_tokenizer(str(DEFAULT_MODEL))
    ids, context_len = continuation_ids(tokenizer, "12+345= ", "357", add_special_tokens=True)
    assert ids == tokenizer.encode("12+345= 357") and context_len == len(tokenizer.encode("12+345="))


def test_eval_data_pp1_vs_pp2_on_default_model(tmp_path, capsys):
    problems = heldout_problems(8)
    rows = []
    for i, p in enumerate(problems):
        total = p.a + p.b
        rows.append({"prompt": p.completion_prompt, "answer": str(total + (1 if i % 4 == 3 else 0))})
        choices = [str(total + 1), str(total), str(total + 10)]
        rows.append({"prompt": p.completion_prompt, "choices": choices, "label": 1 if i % 4 else 2})
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report.json"
    rc = main(["eval", "--model-path", str(DEFAULT_MODEL), "--data", str(data), "--configs", "pp1,pp2", "--json",
               "--out", str(out)])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["passed"] and json.loads(out.read_text()) == report
    base, pp2 = report["configs"]
    assert base["total"] == pp2["total"] == len(rows) and pp2["accuracy"] == base["accuracy"]
    assert pp2["agreement"] == 1.0 and pp2["token_agreement"] == 1.0 and pp2["max_loglikelihood_diff"] < 1e-4
    generated = [[o["output_ids"] for o in r["outputs"] if "output_ids" in o] for r in (base, pp2)]
    assert generated[0] == generated[1] and len(generated[0]) == len(problems)
    # the rows with a wrong answer or label are missed, the others found
    wrong = [i % 4 == 3 for i in range(len(problems))]
    gen = [o for o in base["outputs"] if "output_ids" in o]
    mc = [o for o in base["outputs"] if "predicted" in o]
    assert [o["correct"] for o in gen] == [not w for w in wrong]
    assert [o["correct"] for o in mc] == [o["label"] == 1 for o in mc]
    assert all(o["predicted"] == 1 for o in mc)
