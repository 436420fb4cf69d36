"""answers.py: the last \\boxed{} of a response, its comparison with a gold answer by math-verify (in
and off the main thread), what an LLM answer judge is shown of a response, and that judge's verdict.

    python -m pytest -q tests/test_answers.py
"""
import threading

import pytest

import answers
from answers import answer_reward, grade_answer


def test_grade_answer_and_reward():
    assert grade_answer("so the answer is \\boxed{5}", "5")
    assert not grade_answer("\\boxed{6}", "5")
    assert not grade_answer("the answer is 5", "5")  # no \boxed{}
    assert grade_answer("first \\boxed{3}, corrected: \\boxed{\\frac{1}{2}}", "0.5")  # last box
    assert grade_answer("\\boxed{\\{1, 2\\}}", "\\{2, 1\\}")
    assert grade_answer("\\boxed{n = 2}", "$2$")
    assert not grade_answer("\\boxed{\\frac{1}{2", "1/2")  # unclosed box: cut off
    assert answer_reward("<think>5</think> \\boxed{5}", "5") == 1.0
    assert answer_reward("<think>5</think> \\boxed{4}", "5") == 0.0
    assert answer_reward("<think>\\boxed{5} and then the budget ran out", "5") == 0.0  # truncated
    # works off the main thread (math-verify's signal timeout only works on the main one)
    out = []
    t = threading.Thread(target=lambda: out.append(grade_answer("\\boxed{2^{10}}", "1024")))
    t.start(), t.join()
    assert out == [True]


@pytest.mark.parametrize("text,expected", [
    ("so the answer is \\boxed{5}.", "5"),
    ("first \\boxed{3}\nthen \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # the last box
    ("the solutions are \\boxed{1}, \\boxed{2} and \\boxed{4}", "1, 2, 4"),  # every box of that last line
    ("\\boxed{x^{2}} done", "x^{2}"),
    ("l1\nl2\nl3\nl4\nl5\nl6 no box at all", "...\nl2\nl3\nl4\nl5\nl6 no box at all"),  # the last five lines
    ("short, no box", "short, no box"),
])
def test_final_answer_excerpt(text, expected):
    assert answers.final_answer_excerpt(text) == expected


@pytest.mark.parametrize("reply,expected", [
    ("The answers agree.\n\\boxed{Correct}", True),
    ("\\boxed{Incorrect}", False),
    ("<thinking>they differ</thinking>\n\\boxed{\\text{Incorrect}}", False),
    ("**\\boxed{ correct }**", True),
    ("first \\boxed{Correct}, on reflection \\boxed{Incorrect}", False),  # the last box counts
    ("the gold answer is \\boxed{5}", None),  # a box that is no verdict
    ("Correct", None),  # no box
    ("", None),
])
def test_parse_correctness(reply, expected):
    assert answers.parse_correctness(reply) is expected
