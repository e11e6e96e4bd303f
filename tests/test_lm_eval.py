"""lm-evaluation-harness end to end against `tandem serve` (pp=2, the bundled model), as a user runs it:
`local-completions` for a generate_until task and a multiple_choice (loglikelihood) task, and
`local-chat-completions` for a generate_until task. The tasks and their JSONL data are written by the test
(no hub: `dataset_path: json`, HF_DATASETS_OFFLINE=1). Each evaluation runs to the end, and what lm-eval
records per sample equals what an in-process `Engine` computes for the same tokens: the same generated
text, loglikelihoods within 1e-4, the same is-greedy flags, so the same scores. Some rows have a deliberately
wrong answer or label, so the scores are not all 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.server import ServeProcess

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "default"
NUM_DOCS = 12
MAX_GEN_TOKS = 8
CONTEXT = 128  # the bundled model's max_position_embeddings: lm-eval's max_length must not exceed it


def make_docs() -> list[dict]:
    from tandem.evaluation import heldout_problems

    docs = []
    for i, p in enumerate(heldout_problems(NUM_DOCS)):
        total = p.a + p.b
        answer = str(total + 1) if i % 5 == 4 else str(total)  # every fifth answer is wrong
        choices = [str(total), str(total + 1), str(total + 10), str(total + 100)]
        shift = i % len(choices)
        choices = choices[shift:] + choices[:shift]
        label = choices.index(str(total))
        if i % 4 == 3:  # every fourth label points at a wrong choice
            label = (label + 1) % len(choices)
        docs.append({"prompt": p.completion_prompt, "question": p.chat_question, "answer": answer,
                     "choices": choices, "label": label})
    return docs


def write_tasks(root: Path, docs: list[dict]) -> None:
    """Three lm-eval task configs over one local JSONL file (JSON is valid YAML)."""
    data = root / "addition.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    dataset = {"dataset_path": "json", "test_split": "test",
               "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(root / "hf_datasets")}}
    generation = {"output_type": "generate_until", "doc_to_target": "answer", "target_delimiter": "",
                  "generation_kwargs": {"until": ["\n"], "max_gen_toks": MAX_GEN_TOKS, "do_sample": False,
                                        "temperature": 0},
                  "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    tasks = {
        "tandem_addition_gen": {**dataset, **generation, "doc_to_text": "prompt"},
        "tandem_addition_chat": {**dataset, **generation, "doc_to_text": "question"},
        "tandem_addition_mc": {**dataset, "output_type": "multiple_choice", "doc_to_text": "prompt",
                               "doc_to_choice": "choices", "doc_to_target": "label", "target_delimiter": "",
                               "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
    }
    for name, config in tasks.items():
        (root / f"{name}.yaml").write_text(json.dumps({"task": name, **config}, indent=1))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("lm_eval")


@pytest.fixture(scope="module")
def server(workdir):
    with ServeProcess.running(DEFAULT_MODEL, workdir / "server.log", ["--pp-size", "2", "--dtype", "float32"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def engine(server):  # after the server: loads while its ranks start
    from tandem import Engine

    with Engine(DEFAULT_MODEL, dtype="float32", progress=False) as e:
        yield e


@pytest.fixture(scope="module")
def evaluate(workdir, monkeypatch_module):
    """evaluate(model, model_args, tasks, **kwargs) -> lm_eval's results dict, with per-sample logs."""
    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch_module.setenv("HF_DATASETS_CACHE", str(workdir / "hf_datasets"))
    monkeypatch_module.chdir(workdir)  # lm-eval asks git for a commit hash of the working directory
    import lm_eval
    from lm_eval.tasks import TaskManager

    write_tasks(workdir, make_docs())
    manager = TaskManager(include_path=str(workdir), include_defaults=False)

    def run(model: str, model_args: str, tasks: list[str], **kwargs) -> dict:
        results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=manager,
                                          log_samples=True, **kwargs)
        assert results is not None
        return results

    return run


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def completions_args(server) -> str:
    return (f"model=default,base_url={server.url}/v1/completions,tokenizer={DEFAULT_MODEL},"
            f"tokenizer_backend=huggingface,max_length={CONTEXT},num_concurrent=4,batch_size=4,max_retries=1")


def by_doc(samples: list[dict]) -> list[dict]:
    samples = sorted(samples, key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(NUM_DOCS))
    return samples


def engine_greedy(engine, prompt_ids: list[list[int]]) -> list[str]:
    outs = engine.generate(input_ids=prompt_ids, sampling_params={"temperature": 0, "max_new_tokens": MAX_GEN_TOKS,
                                                                   "stop": ["\n"]})
    return [out["text"] for out in outs]


def test_generate_until_through_completions(server, engine, evaluate):
    results = evaluate("local-completions", completions_args(server), ["tandem_addition_gen"])
    samples = by_doc(results["samples"]["tandem_addition_gen"])
    expected = engine_greedy(engine, [engine.tokenizer.encode(s["doc"]["prompt"]) for s in samples])
    assert [s["resps"][0][0] for s in samples] == expected
    exact = [text.strip() == s["doc"]["answer"] for text, s in zip(expected, samples)]
    assert [s["exact_match"] for s in samples] == [float(e) for e in exact]
    assert results["results"]["tandem_addition_gen"]["exact_match,none"] == pytest.approx(sum(exact) / NUM_DOCS)
    assert 0 < sum(exact) < NUM_DOCS  # the deliberately wrong answers are missed, the others found


def test_generate_until_through_chat_completions(server, engine, evaluate):
    results = evaluate("local-chat-completions",
                       f"model=default,base_url={server.url}/v1/chat/completions,num_concurrent=4,max_retries=1",
                       ["tandem_addition_chat"], apply_chat_template=True)
    samples = by_doc(results["samples"]["tandem_addition_chat"])
    prompts = [engine.prompts.from_chat([{"role": "user", "content": s["doc"]["question"]}]) for s in samples]
    expected = engine_greedy(engine, prompts)
    assert [s["resps"][0][0] for s in samples] == expected
    exact = [text.strip() == s["doc"]["answer"] for text, s in zip(expected, samples)]
    assert results["results"]["tandem_addition_chat"]["exact_match,none"] == pytest.approx(sum(exact) / NUM_DOCS)
    assert 0 < sum(exact) < NUM_DOCS


def test_multiple_choice_through_loglikelihood(server, engine, evaluate):
    from tandem.evaluation.tasks import continuation_ids

    results = evaluate("local-completions", completions_args(server), ["tandem_addition_mc"])
    samples = by_doc(results["samples"]["tandem_addition_mc"])
    seqs, starts = [], []
    for s in samples:
        assert len(s["arguments"]) == len(s["doc"]["choices"])
        for context, continuation in (a[:2] for a in s["arguments"]):
            whole, context_len = continuation_ids(engine.tokenizer, context, continuation, add_special_tokens=False)
            seqs.append(whole)
            starts.append(context_len)
    outs = engine.generate(input_ids=seqs, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                           logprob_start_len=0, top_logprobs_num=1)
    expected = []
    for out, start in zip(outs, starts):
        meta = out["meta_info"]
        assert out["output_ids"] == []
        scored = meta["input_token_logprobs"][start - 1:]
        greedy = all(token == top[0][1] for (_, token), top in zip(scored, meta["input_top_logprobs"][start - 1:]))
        expected.append((sum(lp for lp, _ in scored), greedy))
    got = [tuple(resp[0]) for s in samples for resp in s["resps"]]
    assert len(got) == len(expected)
    for (ll, greedy), (ref_ll, ref_greedy) in zip(got, expected):
        assert ll == pytest.approx(ref_ll, abs=1e-4)
        assert greedy == ref_greedy
    k, correct = 0, []
    for s in samples:
        n = len(s["doc"]["choices"])
        lls = [ll for ll, _ in expected[k:k + n]]
        k += n
        correct.append(max(range(n), key=lambda i: lls[i]) == s["doc"]["label"])
        assert s["acc"] == float(correct[-1])
    assert results["results"]["tandem_addition_mc"]["acc,none"] == pytest.approx(sum(correct) / NUM_DOCS)
    assert 0 < sum(correct) < NUM_DOCS
    assert any(greedy for _, greedy in expected) and not all(greedy for _, greedy in expected)
