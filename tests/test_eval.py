"""eval.py: avg@n and the std of the run means on a hand-built example, column mapping errors, the
tiny preset end to end (real tiny Qwen3 through rc_decode's HF engine, final-answer grader), and
resume of a judge-graded run against the local fake judge server (tests/test_judge.py).

    python -m pytest -q -x tests/test_eval.py
"""

import json
import math
import os

import pytest

import common
import eval as ev
from test_judge import FakeJudge


def test_avg_at_n_hand_built():
    problems = [dict(id="a", set="basic"), dict(id="b", set="basic"), dict(id="c", set="advanced"),
                dict(id="d", set="advanced")]

    def g(i, k, score, **kw):
        return dict(dict(id=i, sample=k, score=score, error=None, parse_failed=False, truncated=False), **kw)
    grades = [g("a", 0, 7), g("a", 1, 0), g("a", 2, 7),
              g("b", 0, 0), g("b", 1, 0, truncated=True), g("b", 2, 7),
              g("c", 0, 7), g("c", 1, 7), g("c", 2, None, parse_failed=True),  # a parse failure counts 0
              g("d", 0, None, error="HTTP 503"),  # ungraded: left out, counted
              g("a", 3, 7)]  # a 4th sample beyond n=3 is ignored
    s = ev.summarize(problems, grades, 3, ["set"])
    rows = {r["subset"]: r for r in s["table"]}
    # run means over graded problems, in percent: run0 (7+0+7)/21, run1 (0+0+7)/21, run2 (7+7+0)/21
    assert rows["all"]["runs"] == pytest.approx([200 / 3, 100 / 3, 200 / 3])
    assert rows["all"]["avg"] == pytest.approx(500 / 9)
    assert rows["all"]["std"] == pytest.approx(math.sqrt(((100 / 9) ** 2 * 2 + (200 / 9) ** 2) / 3))  # ddof=0
    assert rows["set=basic"]["runs"] == pytest.approx([50, 0, 100]) and rows["set=basic"]["std"] == pytest.approx(
        math.sqrt(5000 / 3))
    assert rows["set=advanced"]["runs"] == pytest.approx([100, 100, 0])
    assert s["counts"] == dict(graded=9, ungraded=1, parse_failed=1, truncated=1, missing=2)
    assert s["per_problem"]["c"] == dict(mean=pytest.approx(14 / 3), scores=[7, 7, 0])
    table = ev.format_table(s)
    assert "| all | 4 | 55.6 (15.7) | 66.7, 33.3, 66.7 |" in table
    assert "| set=basic | 2 | 50.0 (40.8) |" in table


def test_columns_and_errors(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"qid": f"q{i}", "Question": f"Prove {i} = {i}.", "Scheme": "7 if complete"} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"no column for \['problem'\].*--columns"):
        ev.load_benchmark(str(path))
    with pytest.raises(ValueError, match="no column for \\['rubric'\\]"):
        ev.load_benchmark(str(path), columns="problem=Question", grader="marking_scheme")
    with pytest.raises(ValueError, match="no such column"):
        ev.load_benchmark(str(path), columns="problem=Questoin")
    with pytest.raises(ValueError, match="cannot read 'problem'"):
        ev.parse_columns("problem")
    probs, grader, _, _, mapping = ev.load_benchmark(str(path), columns="id=qid, problem=Question,rubric='Scheme'")
    assert grader == "marking_scheme" and mapping == {"id": "qid", "problem": "Question", "rubric": "Scheme"}
    assert [p["id"] for p in probs] == ["q0", "q1", "q2"] and probs[1]["problem"] == "Prove 1 = 1."
    # the bundled IMO-AnswerBench layout is recognised without any --columns
    probs, grader, _, _, mapping = ev.load_benchmark(ev.TINY_DATA, limit=4)
    assert grader == "answer" and mapping["answer"] == "Short Answer" and len(probs) == 4
    # answer grading of one completion: the last \boxed{} after </think>
    assert ev.answer_grade("<think>5</think> so \\boxed{5}", "5", False)["score"] == 7
    assert ev.answer_grade("<think>5</think> so \\boxed{6}", "5", False)["score"] == 0
    assert ev.answer_grade("\\boxed{5} but no think end", "5", False)["truncated"]


def _lines(path):
    return len(common.read_jsonl(path))


def test_tiny_preset_end_to_end_and_resume(tiny_model_dir, tmp_path, capsys):
    out = str(tmp_path / "tiny")
    base = ["--preset", "tiny", "--model", tiny_model_dir, "--out-dir", out, "--limit", "3", "--max-tokens", "8",
            "--chunk-size", "2"]
    argv = base + ["--n", "1"]
    assert ev.main(argv) == 0
    for f in ("generations.jsonl", "grades.jsonl", "summary.json", "report.md", "scores.png", "args.json"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    gens, grades = common.read_jsonl(f"{out}/generations.jsonl"), common.read_jsonl(f"{out}/grades.jsonl")
    assert sorted((r["id"], r["sample"]) for r in gens) == [("tiny-000", 0), ("tiny-001", 0), ("tiny-002", 0)]
    assert sorted((r["id"], r["sample"]) for r in grades) == sorted((r["id"], r["sample"]) for r in gens)
    for r in gens:
        assert r["turns"][0]["tokens"] <= 8 and r["final_completion"]
    # the summary is recomputed from grades.jsonl, not a constant
    summary = json.load(open(f"{out}/summary.json"))
    mean = 100 * sum(g["score"] for g in grades) / 7 / len(grades)
    assert summary["table"][0]["avg"] == pytest.approx(mean) and summary["counts"]["graded"] == 3
    assert json.load(open(f"{out}/args.json"))["max_tokens"] == 8
    assert "avg@1 (std)" in capsys.readouterr().out

    # rerun: nothing regenerated or regraded; a larger --n adds exactly the new samples
    assert ev.main(argv) == 0
    assert _lines(f"{out}/generations.jsonl") == 3 and _lines(f"{out}/grades.jsonl") == 3
    gens1 = common.read_jsonl(f"{out}/generations.jsonl")
    assert ev.main(base + ["--n", "2"]) == 0
    gens = common.read_jsonl(f"{out}/generations.jsonl")
    assert len(gens) == 6 and gens[:3] == gens1
    assert sorted({r["sample"] for r in gens[3:]}) == [1] and _lines(f"{out}/grades.jsonl") == 6
    # a different setting into the same folder is refused, naming the flag
    with pytest.raises(ValueError, match="--temperature 0.6"):
        ev.main(argv + ["--temperature", "1.0"])


def test_judged_benchmark_resume(tiny_model_dir, tmp_path):
    """A proof benchmark graded by the (fake) judge: a judge outage leaves recorded ungraded items,
    and the rerun regenerates nothing and sends only those items to the judge."""
    data = tmp_path / "proofs.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "problem": f"[[p{i}]] Prove that {i} + 0 = {i}.",
                                        "rubric": "7 points for a complete proof."}) + "\n" for i in range(3)))
    srv = FakeJudge({"p0": ["ok:7"], "p1": ["ok:3"], "p2": ["503"]})
    try:
        out = str(tmp_path / "run")
        argv = ["--model", tiny_model_dir, "--engine", "hf", "--device", "cpu", "--dtype", "float32",
                "--benchmark", str(data), "--scaffold", "direct", "--n", "2", "--max-tokens", "8",
                "--allow-no-think", "--out-dir", out, "--judge-base-url", srv.url, "--judge-model", "fake",
                "--judge-max-retries", "1", "--judge-concurrency", "2", "--judge-backoff", "0.01"]
        assert ev.main(argv) == 1  # incomplete: p2's grades failed
        s = json.load(open(f"{out}/summary.json"))
        assert s["counts"]["ungraded"] == 2 and s["grader"] == "marking_scheme"
        assert s["table"][0]["runs"] == pytest.approx([100 * 10 / 14] * 2)  # p0=7, p1=3; p2 left out
        errs = [g for g in common.read_jsonl(f"{out}/grades.jsonl") if g["error"]]
        assert {g["id"] for g in errs} == {"p2"} and all("HTTP 503" in g["error"] for g in errs)
        assert all(g["reply"].endswith("</score>") for g in common.read_jsonl(f"{out}/grades.jsonl")
                   if not g["error"])  # the judge's full reply is kept
        n_before, gens_before = len(srv.requests()), common.read_jsonl(f"{out}/generations.jsonl")

        srv.script["p2"] = ["ok:0"]  # the judge is back
        assert ev.main(argv) == 0
        assert common.read_jsonl(f"{out}/generations.jsonl") == gens_before  # nothing regenerated
        assert [e["pid"] for e in srv.requests()[n_before:]] == ["p2", "p2"]  # only the ungraded ones
        assert _lines(f"{out}/grades.jsonl") == 6 + 2  # and only they got a new grade line
        s = json.load(open(f"{out}/summary.json"))
        assert s["counts"] == dict(graded=6, ungraded=0, parse_failed=0, truncated=0, missing=0)
        assert s["table"][0]["avg"] == pytest.approx(100 * 10 / 21)
        assert "| p1 | 3.00 | 3 3 |" in open(f"{out}/report.md").read()
    finally:
        srv.close()
