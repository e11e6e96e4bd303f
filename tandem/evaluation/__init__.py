"""Accuracy checks across parallel configurations: the bundled model's tasks, addition (`addition`) and counting
with long answers (`counting`), evaluation items from a task or from a user's JSONL file (`tasks`), and running
them through each configuration and comparing the results with the first (`runner`). `tandem eval` is their command line.

The addition task's names are re-exported here (`from tandem.evaluation import heldout_problems`)."""

from tandem.evaluation.addition import (
    FORMATS,
    HELDOUT_SEED,
    HELDOUT_SIZE,
    MAX_ANSWER_TOKENS,
    MAX_DIGITS,
    Problem,
    TrainingSampler,
    extract_answer,
    heldout_problems,
    is_correct,
    parse_problem,
    sample_operand,
    sample_problem,
)

__all__ = ["FORMATS", "HELDOUT_SEED", "HELDOUT_SIZE", "MAX_ANSWER_TOKENS", "MAX_DIGITS", "Problem", "TrainingSampler",
           "extract_answer", "heldout_problems", "is_correct", "parse_problem", "sample_operand", "sample_problem"]
