"""eval.py: avg@n and the std of the run means on a hand-built example, column mapping errors, the
tiny preset end to end (real tiny Qwen3 through rc_decode's HF engine, final-answer grader), and
resume of a judge-graded run against the local fake judge server (tests/test_judge.py).

    python -m pytest -q -x tests/test_eval.py
"""

import json
import math
import os
import re

import pytest

import common
import eval as ev
from test_judge import FakeJudge
from test_rc_decode import Scripted


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
    # the sample std of the run means (ddof=1), as the released eval/scripts/stats.py
    assert rows["all"]["std"] == pytest.approx(math.sqrt(((100 / 9) ** 2 * 2 + (200 / 9) ** 2) / 2))
    assert rows["set=basic"]["runs"] == pytest.approx([50, 0, 100]) and rows["set=basic"]["std"] == pytest.approx(50)
    assert rows["set=advanced"]["runs"] == pytest.approx([100, 100, 0])
    assert s["counts"] == dict(graded=9, ungraded=1, parse_failed=1, truncated=1, missing=2)
    assert s["per_problem"]["c"] == dict(mean=pytest.approx(14 / 3), scores=[7, 7, 0])
    table = ev.format_table(s)
    assert "| all | 4 | 55.6 (19.2) | 66.7, 33.3, 66.7 |" in table
    assert "| set=basic | 2 | 50.0 (50.0) |" in table
    # one run has no spread: std nan, shown as "-", no crash
    s1 = ev.summarize(problems, grades, 1, ["set"])
    assert s1["table"][0]["runs"] == pytest.approx([200 / 3]) and math.isnan(s1["table"][0]["std"])
    assert "| all | 4 | 66.7 (-) | 66.7 |" in ev.format_table(s1)


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
    # the bundled file (Google's IMO-AnswerBench layout) is recognised without any --columns; an answer
    # file is judge-graded like IMO-AnswerBench unless --grader answer (math-verify) is asked for
    probs, grader, _, _, mapping = ev.load_benchmark(ev.TINY_DATA, limit=4)
    assert grader == "answerbench" and mapping["answer"] == "Short Answer" and len(probs) == 4
    assert ev.load_benchmark(ev.TINY_DATA, grader="answer")[1] == "answer"
    with pytest.raises(ValueError, match="--grader 'no_such_judge'.*known prompts"):
        ev.load_benchmark(ev.TINY_DATA, grader="no_such_judge")
    with pytest.raises(ValueError, match="--task-prompt 'nope'.*not found"):  # before any model is loaded
        ev.main(ev.parse_args(["--benchmark", ev.TINY_DATA, "--grader", "answer", "--task-prompt", "nope",
                               "--model", "no-model", "--out-dir", str(tmp_path / "x")]))
    # answer grading of one completion: the last \boxed{} after </think>
    assert ev.answer_grade("<think>5</think> so \\boxed{5}", "5", False)["score"] == 7
    assert ev.answer_grade("<think>5</think> so \\boxed{6}", "5", False)["score"] == 0
    assert ev.answer_grade("\\boxed{5} but no think end", "5", False)["truncated"]
    # eval cuts the self-evaluation section before grading: its box is not the answer
    assert ev.answer_grade("5\n</think>\n\\boxed{5}\n\n## Self Evaluation\nSure. \\boxed{1}", "5", False)["score"] == 7
    assert ev.answer_grade("5\n</think>\n\\boxed{5}\n\n## Self Evaluation\nSure. \\boxed{1}", "5", False,
                           strip_self_eval=False)["score"] == 0  # --keep-self-eval: the last box is its verdict


# The hub datasets' real columns (shared/RECIPE.md, "Evaluation"), a few rows each
HUB_ROWS = {
    "lm-provers/IMOProofBench": [
        dict(question_id=f"PB-{s}-{i:03d}", problem=f"Prove fact {s}{i}.", solution="A proof.",
             grading_guidelines="7 for a proof.", category="Algebra" if i % 2 else "Number theory",
             level="IMO-easy", source="x", answer="") for s in ("Basic", "Advanced") for i in (1, 2)],
    "lm-provers/ProofBench": [
        dict(problem_id=f"pb{i}", problem=f"Prove {i}.", solution="Ref.", grading_scheme="Checkpoint 1: 7")
        for i in range(3)],
    "lm-provers/IMOBench-FinalAnswer": [dict(problem=f"Compute {i} + 1.", answer=str(i + 1)) for i in range(3)],
}


def test_hub_columns(monkeypatch):
    import datasets

    def load_rows(source, *, split="train", config=None):
        return datasets.Dataset.from_list(HUB_ROWS[source])
    monkeypatch.setattr(common, "load_rows", load_rows)
    probs, grader, breakdowns, _, mapping = ev.load_benchmark("imo-proofbench")
    assert grader == "imo_proofbench" and mapping == dict(id="question_id", problem="problem", reference="solution",
                                                          rubric="grading_guidelines", level="level",
                                                          category="category")
    # the basic/advanced set comes back from ids like PB-Basic-001, and so does its breakdown
    assert [(p["id"], p["set"]) for p in probs] == [("PB-Basic-001", "basic"), ("PB-Basic-002", "basic"),
                                                    ("PB-Advanced-001", "advanced"), ("PB-Advanced-002", "advanced")]
    grades = [dict(id=p["id"], sample=0, score=7 if p["set"] == "basic" else 0, error=None) for p in probs]
    table = {r["subset"]: r["avg"] for r in ev.summarize(probs, grades, 1, breakdowns)["table"]}
    assert table["set=basic"] == 100 and table["set=advanced"] == 0 and table["all"] == 50
    probs, grader, _, _, mapping = ev.load_benchmark("proofbench")
    assert grader == "proofbench" and mapping == dict(id="problem_id", problem="problem", rubric="grading_scheme")
    assert [p["id"] for p in probs] == ["pb0", "pb1", "pb2"] and probs[0]["rubric"] == "Checkpoint 1: 7"
    probs, grader, _, _, mapping = ev.load_benchmark("imo-answerbench")
    assert grader == "answerbench" and mapping == dict(problem="problem", answer="answer")
    assert probs[2] == dict(id="row-2", problem="Compute 2 + 1.", answer="3")
    monkeypatch.setitem(HUB_ROWS, "lm-provers/ProofBench", [dict(HUB_ROWS["lm-provers/ProofBench"][0], grading_scheme="")])
    with pytest.raises(ValueError, match=r"row 0 \(id 'pb0'\) has an empty 'rubric' \(column 'grading_scheme'\)"):
        ev.load_benchmark("proofbench")


def test_sampling_defaults_of_the_released_run_scripts(monkeypatch):
    import rc_decode

    a = ev.parse_args([])
    assert (a.temperature, a.top_p, a.top_k, a.reason_tokens) == (0.8, 1.0, 0, 229376)
    assert (a.summary_tokens, a.summary_temperature, a.verify_tokens, a.summarizer_model) == (229376, 0.8, 229376, "")
    for scaffold in ("direct", "verify-refine"):
        assert ev.parse_args(["--scaffold", scaffold]).reason_tokens == 229376
    card = ev.parse_args(["--temperature", "0.6", "--top-p", "0.95", "--max-tokens", "1000"])
    assert (card.temperature, card.top_p, card.summary_temperature, card.summary_tokens) == (0.6, 0.95, 0.6, 1000)
    sep = ev.parse_args(["--summarizer-model", "x", "--summary-tokens", "2048", "--summary-temperature", "0.7"])
    assert (sep.summary_tokens, sep.summary_temperature) == (2048, 0.7)
    # what the scaffolds are called with: the summarizer thinks with the turns' sampling, no final summary
    calls = {}
    monkeypatch.setattr(rc_decode, "run_rc", lambda problems, reasoner, **kw: calls.setdefault("rc", kw) and [])
    monkeypatch.setattr(rc_decode, "run_direct",
                        lambda problems, engine, s, progress=True, **kw: calls.setdefault("direct", (s, kw)))
    monkeypatch.setattr(rc_decode, "run_verify_refine", lambda problems, engine, **kw: calls.setdefault("vr", kw))
    a.task_prompt = "answerbench"
    rc_decode.run_scaffold(a, ["p"], None, seed=11)
    rc = calls["rc"]
    assert rc["reason_sampling"] == rc_decode.Sampling(229376, 0.8, 1.0, 0, 11) == rc["summary_sampling"]
    assert rc["final_summary"] is False and rc["summary_thinking"] is True and rc["task_prompt"] == "answerbench"
    a.scaffold = "direct"
    rc_decode.run_scaffold(a, ["p"], None, seed=11)
    assert calls["direct"] == (rc_decode.Sampling(229376, 0.8, 1.0, 0, 11), {"task_prompt": "answerbench"})
    a.scaffold = "verify-refine"
    rc_decode.run_scaffold(a, ["p"], None, seed=11)
    assert calls["vr"]["proof_sampling"] == calls["vr"]["verify_sampling"] == rc_decode.Sampling(229376, 0.8, 1.0, 0, 11)
    assert (calls["vr"]["n_proofs"], calls["vr"]["n_verify"], calls["vr"]["rounds"]) == (4, 4, 2)


def _lines(path):
    return len(common.read_jsonl(path))


def test_tiny_preset_end_to_end_and_resume(tiny_model_dir, tmp_path, capsys):
    out = str(tmp_path / "tiny")
    base = ["--preset", "tiny", "--model", tiny_model_dir, "--out-dir", out, "--limit", "3", "--max-tokens", "8",
            "--chunk-size", "2"]
    argv = base + ["--n", "1"]
    assert ev.main(ev.parse_args(argv)) == 0
    for f in ("generations.jsonl", "grades.jsonl", "summary.json", "report.md", "scores.png", "args.json"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    gens, grades = common.read_jsonl(f"{out}/generations.jsonl"), common.read_jsonl(f"{out}/grades.jsonl")
    assert sorted((r["id"], r["sample"]) for r in gens) == [("tiny-000", 0), ("tiny-001", 0), ("tiny-002", 0)]
    assert sorted((r["id"], r["sample"]) for r in grades) == sorted((r["id"], r["sample"]) for r in gens)
    for r in gens:
        assert r["turns"][0]["tokens"] <= 8 and r["final_completion"]
        # an answer-graded file gets IMO-AnswerBench's own task prompt, not the proof prompt
        task = r["turns"][0]["prompt"][-1]["content"]
        assert task.endswith("Reason step by step, and put your final answer within \\boxed{}.")
        assert "rigorous proof" not in task
        # the tiny model has the Thinking-2507-like template: the prompt opened <think>, the completion has no
        # opening tag, and 8 random tokens never close it: every sample counts as truncated (scored 0)
        assert not r["final_completion"].lstrip().startswith("<think>") and r["truncated"]
    # the summary is recomputed from grades.jsonl, not a constant
    summary = json.load(open(f"{out}/summary.json"))
    mean = 100 * sum(g["score"] for g in grades) / 7 / len(grades)
    assert summary["table"][0]["avg"] == pytest.approx(mean) and summary["counts"]["graded"] == 3
    assert summary["counts"]["truncated"] == 3 and all(g["truncated"] and g["score"] == 0 for g in grades)
    assert json.load(open(f"{out}/args.json"))["reason_tokens"] == 8
    assert "avg@1 (std)" in capsys.readouterr().out

    # rerun: nothing regenerated or regraded; a larger --n adds exactly the new samples
    assert ev.main(ev.parse_args(argv)) == 0
    assert _lines(f"{out}/generations.jsonl") == 3 and _lines(f"{out}/grades.jsonl") == 3
    gens1 = common.read_jsonl(f"{out}/generations.jsonl")
    assert ev.main(ev.parse_args(base + ["--n", "2"])) == 0
    gens = common.read_jsonl(f"{out}/generations.jsonl")
    assert len(gens) == 6 and gens[:3] == gens1
    assert sorted({r["sample"] for r in gens[3:]}) == [1] and _lines(f"{out}/grades.jsonl") == 6
    # a different setting into the same folder is refused, naming the flag
    with pytest.raises(ValueError, match="--temperature 0.8"):
        ev.main(ev.parse_args(argv + ["--temperature", "1.0"]))


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
        assert ev.main(ev.parse_args(argv)) == 1  # incomplete: p2's grades failed
        s = json.load(open(f"{out}/summary.json"))
        assert s["counts"]["ungraded"] == 2 and s["grader"] == "marking_scheme"
        assert s["table"][0]["runs"] == pytest.approx([100 * 10 / 14] * 2)  # p0=7, p1=3; p2 left out
        errs = [g for g in common.read_jsonl(f"{out}/grades.jsonl") if g["error"]]
        assert {g["id"] for g in errs} == {"p2"} and all("HTTP 503" in g["error"] for g in errs)
        assert all(g["reply"].endswith("</score>") for g in common.read_jsonl(f"{out}/grades.jsonl")
                   if not g["error"])  # the judge's full reply is kept
        n_before, gens_before = len(srv.requests()), common.read_jsonl(f"{out}/generations.jsonl")

        srv.script["p2"] = ["ok:0"]  # the judge is back
        assert ev.main(ev.parse_args(argv)) == 0
        assert common.read_jsonl(f"{out}/generations.jsonl") == gens_before  # nothing regenerated
        assert [e["pid"] for e in srv.requests()[n_before:]] == ["p2", "p2"]  # only the ungraded ones
        assert _lines(f"{out}/grades.jsonl") == 6 + 2  # and only they got a new grade line
        s = json.load(open(f"{out}/summary.json"))
        assert s["counts"] == dict(graded=6, ungraded=0, parse_failed=0, truncated=0, missing=0)
        assert s["table"][0]["avg"] == pytest.approx(100 * 10 / 21)
        assert "| p1 | 3.00 | 3 3 |" in open(f"{out}/report.md").read()
    finally:
        srv.close()


def test_grades_are_keyed_by_content(tiny_model_dir, tmp_path):
    """Another judge model regrades every sample and regenerates nothing (it was refused before), and an
    edited rubric regrades exactly that problem's samples: a grade counts for what it graded."""
    data = tmp_path / "proofs.jsonl"
    rows = [{"id": f"p{i}", "problem": f"[[p{i}]] Prove that {i} + 0 = {i}.", "rubric": "7 for a proof."}
            for i in range(2)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    srv = FakeJudge({"p0": ["ok:7", "ok:2"], "p1": ["ok:3", "ok:5", "ok:6"]})
    try:
        out = str(tmp_path / "run")
        argv = ["--model", tiny_model_dir, "--engine", "hf", "--device", "cpu", "--dtype", "float32",
                "--benchmark", str(data), "--scaffold", "direct", "--n", "1", "--max-tokens", "8", "--allow-no-think",
                "--out-dir", out, "--judge-base-url", srv.url, "--judge-backoff", "0.01"]
        assert ev.main(ev.parse_args(argv + ["--judge-model", "m1"])) == 0
        gens = common.read_jsonl(f"{out}/generations.jsonl")
        assert ev.main(ev.parse_args(argv + ["--judge-model", "m1"])) == 0 and len(srv.requests()) == 2  # nothing to do
        assert ev.main(ev.parse_args(argv + ["--judge-model", "m2"])) == 0
        assert len(srv.requests()) == 4 and {e["body"]["model"] for e in srv.requests()[2:]} == {"m2"}
        assert common.read_jsonl(f"{out}/generations.jsonl") == gens  # nothing regenerated
        s = json.load(open(f"{out}/summary.json"))
        assert s["table"][0]["avg"] == pytest.approx(100 * (2 + 5) / 14)  # m2's grades, not m1's
        rows[1]["rubric"] = "7 for a complete proof; 0 otherwise."
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert ev.main(ev.parse_args(argv + ["--judge-model", "m2"])) == 0
        assert [e["pid"] for e in srv.requests()[4:]] == ["p1"]
        s = json.load(open(f"{out}/summary.json"))
        assert s["table"][0]["avg"] == pytest.approx(100 * (2 + 6) / 14)
    finally:
        srv.close()


def test_judge_flags_are_one_vocabulary():
    a = ev.parse_args(["--judge-prompt", "proofbench", "--judge-model", "m", "--judge-api-key-env", "K"])
    assert (a.grader, a.judge_model, a.judge_api_key_env) == ("proofbench", "m", "K")
    assert ev.parse_args(["--grader", "answer"]).grader == "answer"


class ScriptedEngine:
    """An rc_decode engine that answers each prompt with the completion scripted for the [[pid]] tag in
    it, in the shape a Qwen3-4B-Thinking-2507 model returns (its prompt ends with "<think>\n": no opening
    tag in the completion)."""

    def __init__(self, script):
        self.script, self.prompts = script, []

    def generate(self, prompts, sampling, thinking=True, progress=None):
        import rc_decode

        out = []
        for p in prompts:
            self.prompts.append(p)
            text = self.script[re.search(r"\[\[(\w+)\]\]", p[-1]["content"]).group(1)]
            out.append(rc_decode.Completion(text, [0] * 5, None, "stop" if "</think>" in text else "length",
                                            max_tokens=sampling.max_tokens))
            if progress:
                progress(1)
        return out


def test_answerbench_judged_thinking_2507_completions(tmp_path, monkeypatch):
    """IMO-AnswerBench's default path: its own task prompt, completions with no opening <think>, the LLM
    answer judge shown the final boxed answer with the self-evaluation cut, a completion that never
    closes </think> counted as truncated without a judge call."""
    data = tmp_path / "answers.jsonl"
    data.write_text("".join(json.dumps({"id": f"a{i}", "problem": f"[[a{i}]] Compute 2 + 3.", "answer": "5"}) + "\n"
                            for i in range(3)))
    engine = ScriptedEngine({
        "a0": "2 + 3 = 5, checked twice.\n</think>\n\nAdding, the sum is \\boxed{5}.\n\n## Self Evaluation\n"
              "All correct: \\boxed{1}",
        "a1": "2 + 3 is, let me count on my fingers, one, two",  # cut by the budget inside its thinking
        "a2": "maybe 7\n</think>\n\nSo the answer is \\boxed{7}."})
    monkeypatch.setattr(ev.engine_lib, "from_args", lambda args, model=None: engine)
    srv = FakeJudge({"a0": ["text:Both are 5.\n\\boxed{Correct}"], "a2": ["text:\\boxed{Incorrect}"]})
    try:
        out = str(tmp_path / "run")
        assert ev.main(ev.parse_args(["--model", "scripted", "--benchmark", str(data), "--scaffold", "direct",
                                      "--n", "1", "--out-dir", out, "--judge-base-url", srv.url,
                                      "--judge-model", "fake", "--judge-backoff", "0.01"])) == 0
        s = json.load(open(f"{out}/summary.json"))
    finally:
        srv.close()
    assert s["grader"] == "answerbench" and s["args"]["task_prompt"] == "answerbench"
    assert s["table"][0]["runs"] == pytest.approx([100 / 3])  # a0 = 7, a1 truncated = 0, a2 = 0
    assert s["counts"] == dict(graded=3, ungraded=0, parse_failed=0, truncated=1, missing=0)
    assert all(p[-1]["content"].startswith("[[a") and "\\boxed{}" in p[-1]["content"] for p in engine.prompts)
    assert {e["pid"] for e in srv.requests()} == {"a0", "a2"}  # no judge call for the truncated one
    sent = srv.requests("a0")[0]["body"]["messages"][0]["content"]
    assert "Compute 2 + 3." in sent and "checked twice" not in sent and "Adding" not in sent
    assert "\\boxed{1}" not in sent and "Self Evaluation" not in sent
    grades = {g["id"]: g for g in common.read_jsonl(f"{out}/grades.jsonl")}
    assert (grades["a0"]["score"], grades["a1"]["truncated"], grades["a2"]["score"]) == (7, True, 0)


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    """Bad input from the command line: one line naming the flag or file, no traceback, exit 2; nothing is
    loaded first (an unwritable --out-dir is found before the benchmark or the model)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for argv, msg in ((["--benchmark", str(tmp_path / "none.jsonl"), "--out-dir", str(tmp_path / "o")], "--benchmark"),
                      (["--preset", "tiny", "--out-dir", str(blocker / "sub")], "--out-dir"),
                      (["--preset", "tiny", "--columns", "nonsense", "--out-dir", str(tmp_path / "c")], "--columns")):
        p = subprocess.run([sys.executable, "eval.py", *argv], cwd=root, capture_output=True, text=True, timeout=300)
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2 and err[-1].startswith("error: ") and msg in err[-1], p.stderr[-1500:]
        assert "Traceback" not in p.stderr


def test_resume_refuses_another_seed_or_dtype(tiny_model_dir, tmp_path):
    """A seed-7 bf16 sample must never be averaged into a seed-0 fp32 avg@n: the resume names the flag."""
    out = str(tmp_path / "run")
    argv = ["--preset", "tiny", "--model", tiny_model_dir, "--out-dir", out, "--limit", "1", "--n", "1",
            "--max-tokens", "4"]
    assert ev.main(ev.parse_args(argv)) == 0
    for flag, value in (("--seed", "7"), ("--dtype", "bfloat16")):
        with pytest.raises(common.InputError, match=f"different settings \\({flag} "):
            ev.main(ev.parse_args(argv + [flag, value]))
    assert ev.main(ev.parse_args(argv)) == 0  # the same command still resumes


def test_one_flag_vocabulary_old_spellings_still_parse():
    import rc_decode

    for new, old in (("--reason-tokens", "--max-tokens"), ("--output-dir", "--out-dir")):
        a, b = (ev.parse_args([flag, "7", "--benchmark", "x.jsonl"]) for flag in (new, old))
        assert vars(a) == vars(b)
    for new, old in (("--reason-tokens", "--reason-budget"), ("--summary-tokens", "--summary-budget"),
                     ("--verify-tokens", "--verify-budget")):
        a, b = (rc_decode.parse_args([flag, "7", "--problem", "p"]) for flag in (new, old))
        assert vars(a) == vars(b) and a.reason_tokens + a.summary_tokens + a.verify_tokens > 0


SHARED = ["--turns", "2", "--reason-tokens", "8", "--summary-tokens", "4", "--verify-tokens", "5", "--temperature",
          "0.7", "--top-p", "0.9", "--top-k", "3", "--seed", "5", "--n-proofs", "2", "--n-verify", "2",
          "--refine-rounds", "1", "--task-prompt", "answerbench", "--model", "m", "--no-progress"]


def _eval_argv(out, *extra):
    return ["--benchmark", ev.TINY_DATA, "--grader", "answer", "--limit", "1", "--n", "1", "--output-dir", out,
            *SHARED, *extra]


@pytest.mark.parametrize("scaffold", ["rc", "direct", "verify-refine"])
def test_eval_and_rc_decode_build_the_same_scaffold_calls(scaffold, tmp_path, monkeypatch):
    """One flags-to-scaffold adapter: eval.py and rc_decode.py, given one problem and the same flags, send the
    engine the same calls (messages, Sampling with its seed, thinking) in the same order."""
    import rc_decode

    problem = ev.load_benchmark(ev.TINY_DATA, grader="answer", limit=1)[0][0]["problem"]
    by_stage = {}
    for stage in ("eval", "rc_decode"):
        fake = Scripted()
        monkeypatch.setattr(rc_decode.engines, "from_args", lambda *a, _f=fake, **k: _f)
        if stage == "eval":
            assert ev.main(ev.parse_args(_eval_argv(str(tmp_path / "ev"), "--scaffold", scaffold))) == 0
        else:
            rc_decode.main(rc_decode.parse_args(["--problem", problem, "--scaffold", scaffold, *SHARED]))
        by_stage[stage] = fake.calls
    assert by_stage["eval"] == by_stage["rc_decode"] and len(by_stage["eval"]) == {"rc": 3, "direct": 1}.get(scaffold, 4)
    seeds = [s.seed for _, s, _ in by_stage["eval"]]
    assert seeds[0] == 5 and len(set(seeds)) == len(seeds)  # --seed, shifted per call of the scaffold


def test_an_eval_folder_from_before_the_one_vocabulary_resumes(tmp_path, monkeypatch):
    """An args.json written before eval.py shared rc_decode's flags (max_tokens, rounds; no summary top-p/top-k,
    thinking, final summary or critiques: fixed then to today's defaults) resumes without regenerating, and a
    changed setting is still refused by today's flag name."""
    import rc_decode

    fake = Scripted()
    monkeypatch.setattr(rc_decode.engines, "from_args", lambda *a, **k: fake)
    out = str(tmp_path / "old")
    argv = _eval_argv(out, "--scaffold", "rc")
    assert ev.main(ev.parse_args(argv)) == 0
    n_calls = len(fake.calls)

    path = os.path.join(out, "args.json")
    before = json.load(open(path))  # made into the args.json the code before wrote
    before["max_tokens"] = before.pop("reason_tokens")
    before["rounds"] = before.pop("refine_rounds")
    for k in ("summary_top_p", "summary_top_k", "summary_thinking", "final_summary", "n_critiques", "no_progress"):
        del before[k]
    for flag, value, was in (("--reason-tokens", "9", "--reason-tokens 8"), ("--summary-top-p", "0.5",
                             "--summary-top-p 0.9"), ("--final-summary", None, "--final-summary False"),
                             ("--refine-rounds", "3", "--refine-rounds 1")):
        json.dump(before, open(path, "w"))
        with pytest.raises(common.InputError, match=f"different settings \\({was}\\)"):
            ev.main(ev.parse_args(argv + [flag] + ([value] if value else [])))
    json.dump(before, open(path, "w"))
    assert ev.main(ev.parse_args(argv)) == 0
    assert len(fake.calls) == n_calls and _lines(os.path.join(out, "generations.jsonl")) == 1


def test_limit_zero_is_refused_not_everything():
    for bad in ("0", "-2"):
        with pytest.raises(common.InputError, match=f"--limit {bad}: give N >= 1"):
            ev.parse_args(["--limit", bad, "--benchmark", "x.jsonl"])
    assert ev.parse_args(["--limit", "-1", "--benchmark", "x.jsonl"]).limit == -1


def test_a_numeric_problem_is_said(tmp_path, capsys):
    path = tmp_path / "nums.jsonl"
    path.write_text("".join(json.dumps({"problem": 40 + i, "answer": "1"}) + "\n" for i in range(2)))
    problems, *_ = ev.load_benchmark(str(path))
    assert [p["problem"] for p in problems] == ["40", "41"]
    out = capsys.readouterr().out
    assert "row 0: the problem is a number (40); check --columns" in out and "row 1:" in out


def test_samples_with_the_same_text_each_count(tmp_path, monkeypatch):
    """Grades are keyed by the content graded, so two samples of a problem with the same completion share one
    key; the summary took that key's grade line once and left the other sample out ("missing"), which made
    the report's avg@n disagree with grades.jsonl (seen on the tiny task: 40.3 reported, 54.7 / 37.5 there)."""
    import rc_decode

    fake = Scripted()  # every completion is the same text
    monkeypatch.setattr(rc_decode.engines, "from_args", lambda *a, **k: fake)
    out = str(tmp_path / "same")
    assert ev.main(ev.parse_args(_eval_argv(out, "--scaffold", "direct", "--limit", "2", "--n", "3"))) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["counts"]["graded"] == 6 and summary["counts"]["missing"] == 0
    assert all(len(v["scores"]) == 3 and None not in v["scores"] for v in summary["per_problem"].values())


def test_samples_with_the_same_text_are_graded_once_and_each_get_a_line(tmp_path, monkeypatch):
    """Samples with the same completion share a grade key: one grader item for them, and a grades.jsonl line
    for each (viewer.py and --compare read grades by id and sample). Before, one run graded every copy, and
    a resume that found the key graded wrote no line for the other samples (the viewer showed them ungraded)."""
    import judge
    import rc_decode

    fake = Scripted()  # every completion is the same text
    monkeypatch.setattr(rc_decode.engines, "from_args", lambda *a, **k: fake)
    graded = []
    submit = judge.AnswerGrader.submit
    monkeypatch.setattr(judge.AnswerGrader, "submit", lambda self, items, on_grade=None: (
        graded.extend(items), submit(self, items, on_grade=on_grade))[1])
    out, argv = str(tmp_path / "same"), _eval_argv(str(tmp_path / "same"), "--scaffold", "direct", "--limit", "2", "--n", "3")
    assert ev.main(ev.parse_args(argv)) == 0
    path = os.path.join(out, "grades.jsonl")
    lines = common.read_jsonl(path)
    ids = sorted({g["id"] for g in lines})
    assert len(ids) == 2 and sorted((g["id"], g["sample"]) for g in lines) == [(i, s) for i in ids for s in range(3)]
    assert len(graded) == 2  # one item per problem, not per sample
    # killed after the first grade of each problem was written: the resume writes the other samples' lines
    with open(path, "w") as f:
        f.writelines(json.dumps(g) + "\n" for g in lines if g["sample"] == 0)
    graded.clear()
    assert ev.main(ev.parse_args(argv)) == 0
    again = common.read_jsonl(path)
    assert sorted((g["id"], g["sample"]) for g in again) == sorted((g["id"], g["sample"]) for g in lines)
    assert graded == [] and {(g["id"], g["sample"]): g["score"] for g in again} == {
        (g["id"], g["sample"]): g["score"] for g in lines}
