"""rc_decode.py: the RC / direct / verify-refine control flow on real generations of the tiny model, CLI
resume, bad input (the engines themselves: tests/test_engines.py)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
import rc_decode as R
from test_engines import EOS, MSGS, force_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def other_engine(tmp_path_factory):  # a second, differently initialized tiny model (the summarizer)
    d = common.make_tiny_model(str(tmp_path_factory.mktemp("tiny-qwen3-b")), seed=1)
    return R.make_engine("hf", d, device="cpu", dtype=torch.float32)


class Recorder:
    """The real engine, with every generate call recorded."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []
        self.tokenizer, self.context_length = engine.tokenizer, engine.context_length

    def generate(self, prompts, sampling, thinking=True, progress=None):
        out = self.engine.generate(prompts, sampling, thinking=thinking, progress=progress)
        self.calls.append({"prompts": prompts, "sampling": sampling, "thinking": thinking, "out": out})
        return out


class Scripted:
    """A fake engine: records every generate call (messages, Sampling, thinking) and answers each prompt with a
    closed thinking block, a summary-like text and a \\boxed{0.5} verdict, so every scaffold runs to its end."""

    def __init__(self):
        self.calls = []
        self.tokenizer = None
        self.context_length = None

    def generate(self, prompts, sampling, thinking=True, progress=None):
        self.calls.append((prompts, sampling, thinking))
        return [R.Completion("<think>r</think>\n\nS \\boxed{0.5}", None, None, "stop", num_tokens=4)
                for _ in prompts]


def test_bad_inputs(engine, tmp_path):
    with pytest.raises(ValueError, match="problem 1 is empty"):
        R.run_rc(["ok", "  "], engine, progress=False)
    with pytest.raises(ValueError, match="unknown engine kind"):
        R.make_engine("tgi", "x")
    with pytest.raises(ValueError, match="does not exist"):
        R.make_engine("hf", str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match="role"):
        engine.generate([[{"content": "no role"}]], R.Sampling(4))
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(MSGS[:1], R.Sampling(4, 0.5, 1.5))
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"problem": "a", "id": 1}\n{not json\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        R.read_problems(str(bad))
    bad.write_text('{"problem": "a", "id": 1}\n{"problem": "", "id": 2}\n')
    with pytest.raises(ValueError, match="line 2: empty problem"):
        R.read_problems(str(bad))
    bad.write_text('{"question_text": "a"}\n')
    with pytest.raises(ValueError, match="--problem-key"):
        R.read_problems(str(bad))


def test_prompts_fill_and_verdicts():
    m = R.reasoning_messages("Show {summary} x^{2} \\boxed{}", "S1")[0]["content"]
    assert "Show {summary} x^{2} \\boxed{}" in m and "S1" in m  # text inside a field is never re-read
    # turn 1 uses the same RC prompt as later turns, with an explicit no-previous-summary marker
    first, later = R.reasoning_messages("p")[0]["content"], R.reasoning_messages("p", "S1")[0]["content"]
    assert R.NO_SUMMARY in first and first.replace(R.NO_SUMMARY, "S1") == later
    assert first.startswith("Generate a rigorous proof to the following question:\n\np")  # the task text
    assert R.direct_messages("P")[0]["content"] == "Generate a rigorous proof to the following question:\n\nP"
    s = R.summary_messages("P", None, "my reasoning")[0]["content"]
    assert "my reasoning" in s and R.NO_SUMMARY in s
    # a verification's score is its FIRST \\boxed{0|0.5|1} after </think> (as the released agent reads it)
    assert R.parse_verdict("<think>x \\boxed{0}</think> issues... \\boxed{1}") == 1.0
    assert R.parse_verdict("ok</think>\\boxed{0.5} then \\boxed{1}") == 0.5
    assert R.parse_verdict("ok</think>\\boxed{7} \\boxed{ 0 }") == 0.0
    assert R.parse_verdict("thinking \\boxed{1} cut") is None  # truncated
    assert R.parse_verdict("</think>\\boxed{7}") is None and R.parse_verdict("</think>no box") is None
    # the proof of a proof-then-self-evaluation answer stops before its self-evaluation
    assert R.extract_proof("## Solution\nA proof.\n\n## Self Evaluation\nIt is fine. \\boxed{1}") == "A proof."
    assert R.extract_proof("Intro\n### **Solution**\nB.\nSelf evaluation: good") == "B."
    assert R.extract_proof("Just a proof.") == "Just a proof."


# ---------------------------------------------------------------------------------------------
# scaffolds on real generations

def test_rc_control_flow(engine, other_engine):
    """2 problems x 2 samples x 3 turns under Thinking-2507-like templates (the generation prompt already
    opens <think>): one reasoner call per turn and one summarizer call between turns (none after the
    last), each over all 4 sequences. The summarizer thinks too: problem 0's summaries close </think>
    and only the text after it crosses to the next turn; problem 1's never close it, so each of its
    summaries fails (counted, never kept) and its next turn starts again from the no-summary marker.
    Turn t's prompt holds exactly the summary of turn t-1 (not older summaries, not raw reasoning)."""
    tok = engine.tokenizer
    finish = tok("</think>\n\n\\boxed{5}", add_special_tokens=False).input_ids + [EOS]
    summary = tok("</think>\n\nI added the numbers.", add_special_tokens=False).input_ids + [EOS]
    remove = [force_tokens(engine, finish, 6, when=lambda p: "FINISH" in p),
              force_tokens(other_engine, summary, 2, when=lambda p: "FINISH" in p)]
    reasoner, summarizer = Recorder(engine), Recorder(other_engine)
    problems = ["FINISH: compute 2 + 3.", "Compute 4 + 4."]
    try:
        traces = R.run_rc(problems, reasoner, summarizer=summarizer, turns=3, samples=2, progress=False,
                          reason_sampling=R.Sampling(20, 0.8, seed=1),
                          summary_sampling=R.Sampling(10, 0.8, seed=2))
    finally:
        [r() for r in remove]
    assert len(reasoner.calls) == 3 and len(summarizer.calls) == 2  # no summary after the last turn
    assert all(len(c["prompts"]) == 4 and c["thinking"] and c["sampling"].max_tokens == 20 for c in reasoner.calls)
    assert all(c["sampling"].max_tokens == 10 for c in summarizer.calls)
    assert len({c["sampling"].seed for c in reasoner.calls + summarizer.calls}) == 5  # fresh samples each call
    assert [(t["problem_index"], t["sample_index"]) for t in traces] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for k, tr in enumerate(traces):
        p, done = problems[tr["problem_index"]], tr["problem_index"] == 0
        assert len(tr["turns"]) == 3
        for t, turn in enumerate(tr["turns"]):
            out = reasoner.calls[t]["out"][k]
            assert turn["prompt"] == reasoner.calls[t]["prompts"][k]
            assert turn["completion"] == out.text and turn["tokens"] == len(out.token_ids) <= 20
            assert tok.decode(out.prompt_token_ids).endswith("<|im_start|>assistant\n<think>\n")  # the template's
            if t == 0 or not done:  # turn 1, and every turn after a failed summary: the no-summary prompt
                assert turn["summary_in"] is None and turn["prompt"] == R.reasoning_messages(p)
            else:
                prev = tr["turns"][t - 1]
                assert turn["summary_in"] == prev["summary_out"] == "I added the numbers."
                assert turn["prompt"] == R.reasoning_messages(p, prev["summary_out"])
                assert prev["reasoning"] not in turn["prompt"][0]["content"]  # raw reasoning never crosses
            if t < 2:
                s_out = summarizer.calls[t]["out"][k]
                assert summarizer.calls[t]["prompts"][k] == R.summary_messages(p, turn["summary_in"], turn["reasoning"])
                assert turn["summary_tokens"] == len(s_out.token_ids) <= 10
                if done:  # the summary is the text after the summarizer's </think>, its thinking left out
                    assert "</think>" in s_out.text and turn["summary_out"] == "I added the numbers."
                    assert turn["summary_error"] is None
                else:  # it thought for the whole budget: no summary, and its thinking is not kept as one
                    assert turn["summary_out"] is None and "never closed </think>" in turn["summary_error"]
            else:
                assert turn["summary_out"] is None and turn["summary_tokens"] == 0
            if done:  # finished: thinking, then the answer after </think>
                assert turn["answer"] == "\\boxed{5}" and turn["finish_reason"] == "stop" and not turn["truncated"]
                assert "</think>" not in turn["reasoning"] and turn["reasoning"]
            else:  # cut at the budget: all of it is thinking, no answer
                assert turn["answer"] == "" and turn["finish_reason"] == "length" and turn["truncated"]
                assert turn["reasoning"] == common.split_thinking(turn["completion"])[0]
        assert tr["summary_failures"] == (0 if done else 2) and "error" not in tr
        assert tr["states"] == ([None, "I added the numbers.", "I added the numbers."] if done else [None])
        assert tr["final_answer"] == tr["turns"][-1]["answer"] and tr["truncated"] == (not done)
    assert traces[2]["turns"][0]["completion"] != traces[3]["turns"][0]["completion"]  # samples differ


def test_rc_instruct_summarizer_final_summary_and_direct(engine, tiny_instruct_dir):
    """An Instruct-2507-like summarizer never thinks: its whole text is the summary. final_summary=True
    (what rl.py's RC states need) adds the last turn's summary; run_direct sends the proof prompt."""
    instruct = Recorder(R.make_engine("hf", tiny_instruct_dir, device="cpu", dtype=torch.float32))
    rec = Recorder(engine)
    traces = R.run_rc(["a"], rec, summarizer=instruct, turns=2, final_summary=True, progress=False,
                      reason_sampling=R.Sampling(8, seed=0), summary_sampling=R.Sampling(6, seed=0))
    assert len(rec.calls) == 2 and len(instruct.calls) == 2
    for c in instruct.calls:
        assert instruct.tokenizer.decode(c["out"][0].prompt_token_ids).endswith("<|im_start|>assistant\n")
    outs = [c["out"][0].text.strip() for c in instruct.calls]
    assert [t["summary_out"] for t in traces[0]["turns"]] == outs and all(outs)
    assert traces[0]["states"] == [None] + outs and traces[0]["turns"][1]["summary_in"] == outs[0]
    rec.calls.clear()
    traces = R.run_direct(["a", "b"], rec, R.Sampling(8, seed=0), samples=2, progress=False)
    assert len(rec.calls) == 1 and rec.calls[0]["prompts"] == [R.direct_messages(p) for p in "aabb"]
    assert [t["sample_index"] for t in traces] == [0, 1, 0, 1] and len(traces[0]["turns"]) == 1


class ScriptedEngine:
    """A pure-Python engine for the verify-and-refine control flow: a proof prompt gets proof number n
    ("## Solution / PROOF-n / ## Self Evaluation ..."); a verification of PROOF-n returns the next verdict
    of verdicts[n] (cycling); every call is recorded."""

    def __init__(self, verdicts):
        self.verdicts, self.calls, self.n, self.seen = verdicts, [], 0, {}
        self.tokenizer = self.context_length = None

    def generate(self, prompts, sampling, thinking=True, progress=None):
        out = []
        for msgs in prompts:
            text = msgs[0]["content"]
            m = re.search(r"<proof>\s*PROOF-(\d+)", text)
            if m and "Candidate proof" in text:  # a verification
                n = int(m.group(1))
                v = self.verdicts[n][self.seen.get(n, 0) % len(self.verdicts[n])]
                self.seen[n] = self.seen.get(n, 0) + 1
                out.append(R.Completion(f"checking</think>\nreview of {n}: \\boxed{{{v}}} not \\boxed{{1}}", [1], None,
                                        "stop"))
            else:  # a first proof or a refinement
                out.append(R.Completion(f"thinking</think>\n## Solution\nPROOF-{self.n}\n## Self Evaluation\n"
                                        "perfect \\boxed{1}", [1], None, "stop"))
                self.n += 1
        self.calls.append(prompts)
        return out


def test_verify_refine_as_released():
    """Pool of 4 proofs (self-evaluation cut), 4 verifications each scored by the first box; each iteration
    refines each of the 4 best proofs once with its 2 lowest-scored verifications; the new proofs are
    verified and join the pool; at most 2 iterations, early stop at mean 1; answer = best mean, first on ties."""
    v = {0: ["0", "0.5"], 1: ["1", "0.5", "0", "0"], 2: ["0"], 3: ["0.5", "1"]}  # means .25 .375 0 .75
    v.update({4: ["0.5"], 5: ["1", "0.5"], 6: ["0"], 7: ["0", "0.5", "1", "1"]})  # round 1: .5 .75 0 .625
    v.update({n: ["1"] for n in range(8, 12)})  # round 2: every new proof is perfect
    e = ScriptedEngine(v)
    tr = R.run_verify_refine(["P"], e, n_proofs=4, n_verify=4, rounds=2, n_critiques=2, progress=False,
                             proof_sampling=R.Sampling(50, seed=0))[0]
    # first proofs are written with the proof-then-self-evaluation prompt, verified with the proof alone
    assert e.calls[0] == [R.proof_messages("P")] * 4
    assert e.calls[1] == [R.verify_messages("P", f"PROOF-{n}") for n in range(4)] * 4
    assert [c["proof"] for c in tr["turns"]][:4] == [f"PROOF-{n}" for n in range(4)]
    assert [c["score"] for c in tr["turns"][:4]] == [0.25, 0.375, 0.0, 0.75]
    # round 1 refines the 4 best (3, 1, 0, 2) once each, with each one's 2 lowest-scored verifications
    assert [c["parent"] for c in tr["turns"][4:8]] == [3, 1, 0, 2]
    reviews = lambda n, vs: [f"review of {n}: \\boxed{{{x}}} not \\boxed{{1}}" for x in vs]  # noqa: E731
    assert e.calls[2][1] == R.refine_messages("P", "PROOF-1", reviews(1, ["0", "0"]))
    assert e.calls[2][0] == R.refine_messages("P", "PROOF-3", reviews(3, ["0.5", "0.5"]))
    # round 2 refines the 4 best of the 8 (3 and 5 tie at .75: the earlier first), then stops: a mean of 1
    assert [c["parent"] for c in tr["turns"][8:12]] == [3, 5, 7, 4] and len(e.calls) == 6
    assert tr["best_turn"] == 8 and tr["best_score"] == 1.0 and tr["final_answer"] == "PROOF-8"
    assert tr["final_completion"] == "thinking</think>\n\nPROOF-8"  # what a grader sees: the proof alone
    e2 = ScriptedEngine({n: ["1"] for n in range(4)})  # a perfect first proof: no refinement at all
    tr2 = R.run_verify_refine(["P"], e2, progress=False, proof_sampling=R.Sampling(50, seed=0))[0]
    assert len(e2.calls) == 2 and tr2["best_turn"] == 0 and len(tr2["turns"]) == 4  # ties: the first


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible engine against a loopback server that misbehaves like real ones


# ---------------------------------------------------------------------------------------------
# CLI: resume, torn tail, errors file


def test_cli_batch_resume(tmp_path, monkeypatch, capsys):
    inp, out = tmp_path / "p.jsonl", tmp_path / "t.jsonl"
    inp.write_text("".join(json.dumps({"Problem ID": f"q{i}", "Problem": f"Compute {i} + 1."}) + "\n"
                          for i in range(3)))
    argv = ["--preset", "tiny", "--input", str(inp), "--output", str(out), "--batch-size", "2",
            "--turns", "1", "--reason-budget", "6", "--summary-budget", "4", "--no-progress"]
    real, seen = R.run_scaffold, []

    def crash_on_second(args, problems, reasoner, summarizer, **kw):
        seen.append(list(problems))
        if len(seen) == 2:
            raise KeyboardInterrupt  # killed mid-run
        return real(args, problems, reasoner, summarizer, **kw)

    monkeypatch.setattr(R, "run_scaffold", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        R.main(R.parse_args(argv))
    first = out.read_text()
    assert [r["id"] for r in common.read_jsonl(str(out))] == ["q0", "q1"]
    with open(out, "a") as f:
        f.write('{"id": "q2", "sample_ind')  # a write torn by the kill
    monkeypatch.setattr(R, "run_scaffold", lambda *a, **kw: seen.append(list(a[1])) or real(*a, **kw))
    R.main(R.parse_args(argv))
    assert seen[-1] == ["Compute 2 + 1."]  # only the unfinished problem ran again
    recs = common.read_jsonl(str(out))
    assert [r["id"] for r in recs] == ["q0", "q1", "q2"] and out.read_text().startswith(first)
    assert recs[0]["args"]["reason_tokens"] == 6 and recs[0]["scaffold"] == "rc"
    R.main(R.parse_args(argv))  # all done: nothing runs
    assert len(seen) == 3 and "3 done, 0 to run" in capsys.readouterr().out


def test_cli_samples_in_two_batches_differ_and_a_resume_continues_the_run(tmp_path):
    """--samples 4 --batch-size 2: the second batch's samples of a problem were seeded like the first's, so
    they were copies of them; and a resumed run seeded its first batch like the run's first. Now a job's
    seeds follow its place in the run: four different samples, and a run resumed after two equals the
    uninterrupted one."""
    inp = tmp_path / "p.jsonl"
    inp.write_text(json.dumps({"id": "a", "problem": "Compute 1 + 1."}) + "\n")
    argv = ["--preset", "tiny", "--input", str(inp), "--scaffold", "direct", "--samples", "4", "--batch-size", "2",
            "--reason-tokens", "8", "--temperature", "1.0", "--no-progress"]
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    R.main(R.parse_args(argv + ["--output", str(full)]))
    texts = [r["turns"][0]["reasoning"] + r["final_answer"] for r in common.read_jsonl(str(full))]
    assert len(set(texts)) == 4, texts
    part.write_text("".join(full.read_text().splitlines(keepends=True)[:2]))  # killed after the first batch
    R.main(R.parse_args(argv + ["--output", str(part)]))
    assert [(r["sample_index"], r["final_answer"], r["turns"][0]["reasoning"]) for r in common.read_jsonl(str(part))] \
        == [(r["sample_index"], r["final_answer"], r["turns"][0]["reasoning"]) for r in common.read_jsonl(str(full))]


def test_cli_never_mixes_runs_and_checks_the_output_first(tmp_path, monkeypatch):
    """A rerun into an --output made with another model or sampling is refused, naming the flag; an
    unwritable --output fails before any model loads (nothing generated is lost)."""
    inp, out = tmp_path / "p.jsonl", tmp_path / "t.jsonl"
    inp.write_text(json.dumps({"id": "a", "problem": "Compute 1 + 1."}) + "\n")
    argv = ["--preset", "tiny", "--input", str(inp), "--output", str(out), "--scaffold", "direct",
            "--reason-budget", "4", "--no-progress"]
    R.main(R.parse_args(argv))
    with pytest.raises(common.InputError, match=r"--temperature 0\.8 -> 0\.5"):
        R.main(R.parse_args(argv + ["--temperature", "0.5"]))
    with pytest.raises(common.InputError, match="--model"):
        R.main(R.parse_args(argv + ["--model", str(tmp_path / "other")]))
    R.main(R.parse_args(argv + ["--batch-size", "7"]))  # a setting that does not change traces: allowed
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    loads = []
    monkeypatch.setattr(R.engines, "from_args", lambda *a, **k: loads.append(a))
    try:
        if os.access(str(ro), os.W_OK):  # root ignores permissions: use a path under a file instead
            bad = str(inp) + "/t.jsonl"
        else:
            bad = str(ro / "t.jsonl")
        with pytest.raises(common.InputError, match="cannot write there"):
            R.main(R.parse_args(argv[:4] + ["--output", bad] + argv[6:]))
    finally:
        ro.chmod(0o700)
    assert loads == []


def test_cli_output_from_before_the_one_vocabulary(tmp_path, monkeypatch):
    """Traces recorded with the old dests (reason_budget, summary_budget, verify_budget) resume under today's
    names; old rc traces are refused, naming the change: their summaries were seeded --seed + 1, today's --seed."""
    fake = Scripted()
    monkeypatch.setattr(R.engines, "from_args", lambda *a, **k: fake)
    inp, out = tmp_path / "p.jsonl", tmp_path / "t.jsonl"
    for scaffold in ("direct", "rc"):
        inp.write_text(json.dumps({"id": "a", "problem": "Compute 1 + 1."}) + "\n")
        argv = ["--model", "m", "--input", str(inp), "--output", str(out), "--scaffold", scaffold,
                "--reason-budget", "8", "--summary-budget", "4", "--verify-budget", "5", "--no-progress"]
        out.unlink(missing_ok=True)
        R.main(R.parse_args(argv))
        old = {R.OLD_DESTS.get(k, k): k for k in ("reason_budget", "summary_budget", "verify_budget")}
        recs = common.read_jsonl(str(out))
        for r in recs:  # the record as the code before wrote it
            r["args"] = {old.get(k, k): v for k, v in r["args"].items()}
        out.write_text("".join(json.dumps(r) + "\n" for r in recs))
        inp.write_text(inp.read_text() + json.dumps({"id": "b", "problem": "Compute 2 + 2."}) + "\n")
        if scaffold == "direct":
            R.main(R.parse_args(argv))
            assert [r["id"] for r in common.read_jsonl(str(out))] == ["a", "b"]
            with pytest.raises(common.InputError, match=r"--reason-tokens 8 -> 9"):
                R.main(R.parse_args(argv + ["--reason-tokens", "9"]))
        else:
            with pytest.raises(common.InputError, match=r"rc traces made before the summaries were seeded"):
                R.main(R.parse_args(argv))


def test_cli_sigterm_exits_143_keeping_finished_traces(tmp_path):
    inp, out = tmp_path / "p.jsonl", tmp_path / "t.jsonl"
    inp.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"Compute {i} + 1."}) + "\n" for i in range(40)))
    cmd = [sys.executable, os.path.join(ROOT, "rc_decode.py"), "--preset", "tiny", "--input", str(inp), "--output",
           str(out), "--scaffold", "direct", "--reason-budget", "8", "--batch-size", "1", "--no-progress"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and len(common.read_jsonl(str(out))) < 2:
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 128 + signal.SIGTERM
    done = common.read_jsonl(str(out))
    assert 2 <= len(done) < 40 and [r["id"] for r in done] == [f"q{i}" for i in range(len(done))]


def test_cli_errors_file_then_retry(tmp_path, server):
    inp, out = tmp_path / "p.jsonl", tmp_path / "t.jsonl"
    inp.write_text(json.dumps({"id": "a", "problem": "ok:a"}) + "\n" + json.dumps({"id": "b", "problem": "dead:b"}) + "\n")
    argv = ["--engine", "openai", "--base-url", server.url, "--model", "m", "--input", str(inp), "--output",
            str(out), "--scaffold", "direct", "--max-retries", "0", "--no-progress"]
    R.main(R.parse_args(argv))
    errs = tmp_path / "t.errors.jsonl"
    assert [r["id"] for r in common.read_jsonl(str(out))] == ["a"]
    assert [r["id"] for r in common.read_jsonl(str(errs))] == ["b"]
    inp.write_text(inp.read_text().replace("dead:b", "ok:b"))  # the server heals (here: a new prompt)
    R.main(R.parse_args(argv))
    assert [r["id"] for r in common.read_jsonl(str(out))] == ["a", "b"]


def test_cli_single_problem_prints(capsys):
    R.main(R.parse_args(["--preset", "tiny", "--turns", "2", "--reason-budget", "6", "--summary-budget", "4",
                         "--show-trace", "--no-progress"]))
    text = capsys.readouterr().out
    assert "==== turn 2" in text and "==== final proof" in text
    # the tiny model thinks (its template opens <think>) and never closes it in 4 tokens: the failed summary
    # is shown as such, and turn 2 starts without one
    assert "---- summary failed (4 tokens): the summarizer thought" in text and "---- summary in:" not in text


