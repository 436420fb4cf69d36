"""judge.py: score parsing, proof preparation, the final-answer grader, and the HTTP client against
a local fake OpenAI-compatible judge on 127.0.0.1 that produces the faults a real API produces
(429 with Retry-After, 5xx, timeouts, malformed JSON, replies with no or a bad score, a 400 for an
overlong request, a server that is down), plus the cache surviving a SIGKILL mid-batch.

    python -m pytest -q -x tests/test_judge.py
"""

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

import common
import judge
from judge import Grade, Judge, parse_score, prepare_proof

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# a fake OpenAI-compatible judge server with scripted faults


class FakeJudge:
    """Chat-completions server on 127.0.0.1. Each request's problem carries a tag [[pid]]; the
    script maps pid -> actions for successive attempts (the last one repeats). Actions:
    "ok:N" (a reply ending in <score>N</score>), "text:..." (that reply text), "429:S" (429 with
    Retry-After S), "500"/"502"/"503", "400" (context length exceeded), "401", "sleep:S" (answer
    after S seconds, for client timeouts), "badjson" (200 with a non-JSON body), "nochoices"
    (200 with JSON that is not a completion). Unscripted pids get "ok:7"."""

    def __init__(self, script=None, delay=0.0):
        self.script, self.delay = dict(script or {}), delay
        self.log = []  # dicts: pid, t, content_chars, auth, action
        self.answered = 0
        self.inflight = self.max_inflight = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][0]["content"]
                m = re.search(r"\[\[([\w-]+)\]\]", content)
                pid = m.group(1) if m else "?"
                with fake.lock:
                    n = sum(e["pid"] == pid for e in fake.log)
                    actions = fake.script.get(pid, ["ok:7"])
                    action = actions[min(n, len(actions) - 1)]
                    fake.log.append({"pid": pid, "t": time.monotonic(), "content_chars": len(content),
                                     "auth": self.headers.get("Authorization"), "action": action, "body": body})
                    fake.inflight += 1
                    fake.max_inflight = max(fake.max_inflight, fake.inflight)
                if fake.delay:
                    time.sleep(fake.delay)
                try:
                    self.respond(action)
                    with fake.lock:
                        fake.answered += 1
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with fake.lock:
                        fake.inflight -= 1

            def send(self, code, payload, headers=()):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def completion(self, text):
                return {"id": "x", "object": "chat.completion", "choices": [
                    {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]}

            def respond(self, action):
                kind, _, arg = action.partition(":")
                if kind == "ok":
                    self.send(200, self.completion(f"The proof is checked step by step.\n<score>{arg}</score>"))
                elif kind == "text":
                    self.send(200, self.completion(arg))
                elif kind == "429":
                    self.send(429, {"error": {"message": "rate limited"}}, [("Retry-After", arg)])
                elif kind in ("500", "502", "503"):
                    self.send(int(kind), {"error": {"message": "server error"}})
                elif kind == "400":
                    self.send(400, {"error": {"message": "This model's maximum context length is 131072 tokens"}})
                elif kind == "401":
                    self.send(401, {"error": {"message": "invalid api key"}})
                elif kind == "sleep":
                    time.sleep(float(arg))
                    self.send(200, self.completion("<score>0</score>"))
                elif kind == "badjson":
                    self.send(200, b'{"choices": [{"message": {"content": "<score>3</sco')
                elif kind == "nochoices":
                    self.send(200, {"error": "upstream overloaded"})
                elif kind == "trickle":  # headers at once, then the body's first S bytes one every 0.25 s
                    data = b" " * int(arg) + json.dumps(self.completion("<score>5</score>")).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    for i in range(int(arg)):
                        self.wfile.write(data[i:i + 1])
                        self.wfile.flush()
                        time.sleep(0.25)
                    self.wfile.write(data[int(arg):])
                elif kind == "echo500":  # a server that puts the request's Authorization header in its replies
                    self.send(500, {"error": {"message": f"bad auth header {self.headers.get('Authorization')}"}})
                elif kind == "echo401":
                    self.send(401, {"error": {"message": f"key {self.headers.get('Authorization')} refused"}})
                elif kind == "echo200":
                    self.send(200, self.completion(f"You sent {self.headers.get('Authorization')}. <score>5</score>"))
                else:
                    raise AssertionError(action)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def requests(self, pid=None):
        with self.lock:
            return [e for e in self.log if pid is None or e["pid"] == pid]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def fake():
    servers = []

    def make(script=None, delay=0.0):
        servers.append(FakeJudge(script, delay))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


def item(pid, proof="A complete argument. Hence the claim holds.", rubric="7 points for a full proof."):
    return {"problem": f"[[{pid}]] Prove that 1 + 1 = 2.", "proof": f"<think>scratch work</think>\n{proof}",
            "rubric": rubric}


FAST = dict(backoff_base=0.01, backoff_max=0.05, timeout=5.0, max_retries=3, concurrency=4)


# ---------------------------------------------------------------------------------------------
# pure functions


@pytest.mark.parametrize("text,expected", [
    ("<score>5</score>", 5),
    ("<score> 7 </score>", 7),
    ("<score>\n  3\n</score>", 3),
    ("<SCORE>4</SCORE>", 4),
    ("<points>6 out of 7</points>", 6),
    ("<points> 1  out  of 7 </points>", 1),
    ("<points>0 out of 7</points>", 0),
    ("<score>6/7</score>", 6),
    ("<score>**2**</score>", 2),
    ("<score>0</score>", 0),
    ("template: <score>N</score> ... final <score>4</score>", 4),
    ("first <score>2</score> then revised <score>5</score>", 5),
    ("final <score>6</score> and an echo of the format <score>N</score>", 6),  # last *well-formed*
    ("<score><score>3</score>", 3),
    ("<points>7 out of 7</points> <score>1</score>", 1),
    ("<score>9</score>", None),
    ("<score>3</score> ... <score>9</score>", None),
    ("<score>-1</score>", None),
    ("<score>10</score>", None),
    ("<score>3.5</score>", None),
    ("<points>4 out of 10</points>", None),
    ("<score>5", None),
    ("score: 5", None),
    ("The proof deserves 7 out of 7.", None),
    ("", None),
    (None, None),
])
def test_parse_score(text, expected):
    assert parse_score(text) == expected


def test_prepare_proof():
    assert prepare_proof("<think>a\nb</think>\n\nThe proof.\n") == "The proof."
    assert prepare_proof("thinking only, cut by the budget") is None  # truncated
    assert prepare_proof("no think at all", require_think=False) == "no think at all"
    # the opening tag may be missing (Qwen3-Thinking-2507's template adds it to the prompt)
    assert prepare_proof("reasoning </think> Proof body") == "Proof body"
    # only the text after the *last* </think>
    assert prepare_proof("<think>x</think> draft </think> final") == "final"


# headings that open a self-evaluation section as the released eval removes it (remove_self_evaluation
# in eval/src/imobench/evaluation.py): 1+ '#', then Evaluation / Self Evaluation / Final Evaluation,
# '*' bold marks and spaces tolerated
@pytest.mark.parametrize("head", ["## Self Evaluation", "# Evaluation", "### Final Evaluation", "##Self Evaluation",
                                  "## **Self Evaluation**", "#### *Final* Evaluation:", "## Final Self Evaluation",
                                  "## Evaluation of the proof"])
def test_self_evaluation_heading_is_cut_in_eval_only(head):
    text = f"<think>t</think>\nStep 1. x = 1.\nStep 2. Done.\n\n{head}\nMy proof is correct.\n\\boxed{{1}}"
    assert prepare_proof(text, strip_self_eval=True) == "Step 1. x = 1.\nStep 2. Done.", head
    # training rewards keep it: the default, and what rl.py passes
    assert prepare_proof(text) == prepare_proof(text, strip_self_eval=False) == text.split("</think>")[1].strip()


# lines that are not such a heading: nothing is cut (the old heuristic cut the first four)
@pytest.mark.parametrize("line", ["Self-evaluation: the bound holds.", "**Self Evaluation**", "### 3. Self-Assessment",
                                  "SELF VERIFICATION", "## Evaluating the sum", "We now turn to the evaluation of S.",
                                  "## Self Evaluations", "  In the evaluation below, # Evaluation is a phrase."])
def test_non_heading_lines_are_kept(line):
    body = f"Step 1. Let S = 1.\n{line}\nStep 2. Hence S = 1, and the claim follows."
    assert prepare_proof("</think>" + body, strip_self_eval=True) == body, line


def test_rewards_and_prompt_errors(tmp_path):
    assert judge.score_to_reward(7) == 1.0 and judge.score_to_reward(None) == 0.0
    assert abs(judge.score_to_reward(3) - 3 / 7) < 1e-12
    assert judge.score_to_reward(5, threshold=5) == 1.0 and judge.score_to_reward(4, threshold=5) == 0.0
    with pytest.raises(ValueError, match="known prompts.*imo_proofbench"):
        judge.load_prompt("no_such_prompt")
    j = Judge("http://127.0.0.1:9/v1", "m", prompt="imo_proofbench")
    with pytest.raises(ValueError, match=r"item 1: prompt 'imo_proofbench' uses \{reference\}"):
        j.submit([dict(item("a"), reference="ref"), item("b")])
    j.close()
    r = httpx.Response(429, headers={"Retry-After": "2"})
    assert common.retry_after_s(r.headers) == 2.0
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < common.retry_after_s(httpx.Response(429, headers={"Retry-After": date}).headers) <= 31


# ---------------------------------------------------------------------------------------------
# the client against the fault-injecting server


def test_client_faults(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test-123")
    srv = fake({
        "ok": ["ok:6"],
        "rate": ["429:1", "ok:5"],
        "five": ["500", "502", "503", "ok:4"],
        "slow": ["sleep:2", "ok:3"],
        "badjson": ["badjson", "nochoices", "ok:2"],
        "alwaysbad": ["badjson"],
        "noscore": ["text:The proof looks fine to me."],
        "nine": ["text:Excellent work. <score>9</score>"],
        "long": ["ok:1"],
        "ctx": ["400"],
        "down": ["503"],
    })
    long_proof = "x" * 200_000
    items = [item("ok"), item("rate"), item("five"), item("slow"), item("badjson"), item("alwaysbad"),
             item("noscore"), item("nine"), item("long", proof=long_proof), item("ctx"), item("down"),
             {"problem": "[[trunc]] p", "proof": "<think>never finished", "rubric": "r"}]
    cache = str(tmp_path / "cache.sqlite")
    seen = []
    j = Judge(srv.url, "judge-m", api_key_env="JUDGE_TEST_KEY", cache_path=cache, reasoning_effort="medium",
              max_tokens=1000, **dict(FAST, timeout=0.5))
    grades = j.grade(items, on_grade=lambda i, g: seen.append(i))
    j.close()
    g = dict(zip(["ok", "rate", "five", "slow", "badjson", "alwaysbad", "noscore", "nine", "long", "ctx", "down",
                  "trunc"], grades))
    assert sorted(seen) == list(range(len(items)))
    assert (g["ok"].score, g["ok"].reward, g["ok"].error) == (6, 6 / 7, None)
    assert g["ok"].reply.endswith("<score>6</score>")
    assert g["rate"].score == 5
    t429, tok = [e["t"] for e in srv.requests("rate")]
    assert tok - t429 >= 0.9, "Retry-After: 1 not honoured"
    assert g["five"].score == 4 and len(srv.requests("five")) == 4
    assert g["slow"].score == 3 and len(srv.requests("slow")) == 2  # first attempt timed out
    assert g["badjson"].score == 2 and len(srv.requests("badjson")) == 3
    bad = g["alwaysbad"]
    assert bad.score is None and bad.reward == 0.0 and "malformed" in bad.error and not bad.parse_failed
    assert len(srv.requests("alwaysbad")) == 4  # 1 + max_retries
    for k in ("noscore", "nine"):  # replied but unusable: parse failure, counts 0, no error
        assert g[k].score is None and g[k].parse_failed and g[k].error is None and g[k].reward == 0.0
        assert len(srv.requests(k)) == 1
    assert g["nine"].reply == "Excellent work. <score>9</score>"
    assert g["long"].score == 1 and srv.requests("long")[0]["content_chars"] > 200_000  # sent whole
    assert "HTTP 400" in g["ctx"].error and "context length" in g["ctx"].error
    assert len(srv.requests("ctx")) == 1  # a 400 is not retried
    assert "gave up after 4 attempts" in g["down"].error and "HTTP 503" in g["down"].error
    assert g["trunc"].truncated and g["trunc"].score == 0 and not srv.requests("trunc")
    # the request carried the key, the model, the reasoning effort and max_tokens
    body = srv.requests("ok")[0]["body"]
    assert srv.requests("ok")[0]["auth"] == "Bearer sk-test-123"
    assert (body["model"], body["reasoning_effort"], body["max_tokens"]) == ("judge-m", "medium", 1000)
    assert "scratch work" not in body["messages"][0]["content"]  # the thinking never reaches the judge

    # a second run on the same cache: only the failed items are requested again
    before = len(srv.requests())
    j2 = Judge(srv.url, "judge-m", api_key_env="JUDGE_TEST_KEY", cache_path=cache, reasoning_effort="medium",
               **dict(FAST, max_retries=0))
    again = j2.grade(items)
    j2.close()
    asked = {e["pid"] for e in srv.requests()[before:]}
    assert asked == {"alwaysbad", "ctx", "down"}
    for k, a in zip(g, again):
        if g[k].error is None and not g[k].truncated:
            assert a.cached and a.score == g[k].score and a.reply == g[k].reply, k


def test_judge_down_and_bad_key(fake, tmp_path):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    j = Judge(f"http://127.0.0.1:{port}/v1", "m", **dict(FAST, max_retries=1))
    grades = j.grade([item("a"), item("b")])
    j.close()
    assert all(g.score is None and "could not reach the judge" in g.error for g in grades)
    srv = fake({"a": ["401"]})
    j = Judge(srv.url, "m", **FAST)
    (g,) = j.grade([item("a")])
    j.close()
    assert "HTTP 401" in g.error and "$JUDGE_API_KEY" in g.error and len(srv.requests()) == 1


def test_submit_is_non_blocking_and_dedups(fake):
    srv = fake(delay=0.3)
    j = Judge(srv.url, "m", **FAST)
    arrived = []
    t0 = time.monotonic()
    fut = j.submit([item("a"), item("b"), item("a")], on_grade=lambda i, g: arrived.append(i))
    assert time.monotonic() - t0 < 0.2 and not fut.done()
    grades = fut.result(timeout=10)
    j.close()
    assert [g.score for g in grades] == [7, 7, 7] and sorted(arrived) == [0, 1, 2]
    assert len(srv.requests("a")) == 1 and grades[2].cached  # identical proofs in flight: one request


def test_concurrency_is_bounded(fake):
    srv = fake(delay=0.1)
    j = Judge(srv.url, "m", **dict(FAST, concurrency=3))
    grades = j.grade([item(f"p{i}") for i in range(10)])
    j.close()
    assert all(g.score == 7 for g in grades) and srv.max_inflight == 3


def test_threshold_and_grade_type(fake):
    srv = fake({"a": ["ok:5"], "b": ["ok:4"]})
    j = Judge(srv.url, "m", threshold=5, **FAST)
    a, b = j.grade([item("a"), item("b")])
    j.close()
    assert isinstance(a, Grade) and (a.reward, b.reward) == (1.0, 0.0)


# A completion as Qwen3-4B-Thinking-2507 writes it: its generation prompt ends with "<think>\n", so the
# completion has no opening tag, and a proof-then-self-evaluation answer ends with its own verdict.
THINKING_2507 = ("Let me check small cases: 1 + 1 = 2, and the successor of 1 is 2.\n</think>\n\n"
                 "**Proof.** By the definition of 2 as the successor of 1, 1 + 1 = 2. QED\n\n"
                 "## Self Evaluation\nEvery step is justified. \\boxed{1}")


def test_what_the_judge_is_sent_for_a_thinking_2507_completion(fake):
    srv = fake({"rl": ["ok:7"], "ev": ["ok:7"]})
    sent = {}
    for pid, strip in (("rl", False), ("ev", True)):
        j = Judge(srv.url, "m", prompt="rl_proof", strip_self_eval=strip, **FAST)
        (g,) = j.grade([dict(item(pid), proof=THINKING_2507)])
        j.close()
        assert g.score == 7 and not g.truncated
        sent[pid] = srv.requests(pid)[0]["body"]["messages"][0]["content"]
    for content in sent.values():  # the thinking never reaches the judge, the proof does
        assert "Let me check small cases" not in content and "</think>" not in content
        assert "**Proof.** By the definition of 2 as the successor of 1, 1 + 1 = 2. QED" in content
    assert "## Self Evaluation\nEvery step is justified." in sent["rl"]  # RL rewards keep the self-evaluation
    assert "Self Evaluation" not in sent["ev"] and "\\boxed{1}" not in sent["ev"]  # benchmark grading cuts it
    # the same completion cut by the budget before </think> is truncated: 0, no judge call
    j = Judge(srv.url, "m", **FAST)
    (g,) = j.grade([dict(item("cut"), proof=THINKING_2507.split("</think>")[0])])
    j.close()
    assert g.truncated and g.score == 0 and not srv.requests("cut")


def test_judge_prompts_of_the_released_eval_and_rl():
    # ProofBench: the marking scheme, no reference, alternative approaches mapped onto its checkpoints,
    # <points>N</points>; RL: correctness first, the scheme advisory, <score>N</score>
    for name, tag in (("proofbench", "<points>N</points>"), ("rl_proof", "<score>N</score>")):
        t = judge.load_prompt(name)
        assert judge.template_fields(t) == ["problem", "rubric", "proof"], name
        assert tag in t and "checkpoint" in t and "different" in t and "approach" in t, name
    rl = judge.load_prompt("rl_proof")
    assert rl.index("correctness") < rl.index("advisory")
    t = judge.load_prompt("answerbench")
    assert judge.template_fields(t) == ["problem", "answer", "proof"]
    assert "\\boxed{Correct}" in t and "\\boxed{Incorrect}" in t
    assert parse_score("Checkpoints 1 and 2 are earned.\n<points>5</points>") == 5


def test_answer_judge(fake):
    """IMO-AnswerBench's grader: the judge gets the problem, the gold answer and the response's final
    boxed answer (not the reasoning, not the rest of the answer); its last \\boxed{} verdict gives 7 or 0."""
    srv = fake({"ok": ["text:Both are 5.\n\\boxed{Correct}"], "no": ["text:\\boxed{Incorrect}"],
                "odd": ["text:I cannot tell."], "five": ["text:\\boxed{Incorrect}"]})

    def ans(pid, completion, gold="5"):
        return {"problem": f"[[{pid}]] Compute 2 + 3.", "proof": completion, "answer": gold}
    j = Judge(srv.url, "m", prompt="answerbench", strip_self_eval=True, **FAST)
    lines = "\n".join(f"line {i}" for i in range(8))
    ok, no, odd, five, trunc = j.grade([
        ans("ok", "2 + 3 is 5.\n</think>\n\nWe add: the answer is \\boxed{5}.\n\n## Self Evaluation\nSure: \\boxed{1}"),
        ans("no", "<think>hm</think>So \\boxed{6}."), ans("odd", "</think>\\boxed{5}"),
        ans("five", "</think>" + lines), ans("trunc", "2 + 3 = 5, so \\boxed{5}")])
    j.close()
    assert (ok.score, ok.reward, no.score, no.reward) == (7, 1.0, 0, 0.0)
    assert odd.score is None and odd.parse_failed and odd.reward == 0.0 and "Correct" in odd.note
    assert five.score == 0 and trunc.truncated and not srv.requests("trunc")
    content = srv.requests("ok")[0]["body"]["messages"][0]["content"]
    assert "Compute 2 + 3." in content and "\nGold answer:\n5\n" in content
    assert "\n5\n" in content.split("Gold answer:")[0].split("Compute 2 + 3.")[1]  # the extracted answer
    assert "We add" not in content and "2 + 3 is 5" not in content and "boxed{1}" not in content
    assert "...\nline 3\nline 4\nline 5\nline 6\nline 7\n" in srv.requests("five")[0]["body"]["messages"][0]["content"]
    j = Judge(srv.url, "m", prompt="answerbench", **FAST)
    with pytest.raises(ValueError, match=r"item 0: prompt 'answerbench' uses \{answer\}"):
        j.submit([{"problem": "p", "proof": "</think>\\boxed{1}"}])
    j.close()


def test_cli_strip_self_eval_flag(fake, tmp_path):
    srv = fake({"a": ["ok:6"]})
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps(dict(item("a"), proof=THINKING_2507)) + "\n")
    base = ["--input", str(inp), "--base-url", srv.url, "--model", "m", "--backoff", "0.01", "--cache", "none"]
    # default: the RL reward keeps the self-evaluation
    assert judge.main(judge.parse_args(base + ["--output", str(out)])) == 0
    assert judge.main(judge.parse_args(base + ["--output", str(tmp_path / "out2.jsonl"), "--strip-self-eval"])) == 0
    first, second = (e["body"]["messages"][0]["content"] for e in srv.requests("a"))
    assert "## Self Evaluation" in first and "Self Evaluation" not in second
    assert "correctness" in first  # the default prompt is rl_proof
    assert [r["score"] for r in common.read_jsonl(str(out))] == [6]
    # the answer judge needs each row's gold answer: a row without one is named
    inp.write_text(json.dumps(dict(item("a"), proof=THINKING_2507)) + "\n"
                   + json.dumps({"problem": "[[b]] p", "proof": "</think>\\boxed{1}"}) + "\n")
    with pytest.raises(ValueError, match=r"in.jsonl: row 1: .*prompt 'answerbench' uses \{answer\}"):
        judge.main(judge.parse_args(base + ["--output", str(tmp_path / "out3.jsonl"), "--prompt", "answerbench"]))


# ---------------------------------------------------------------------------------------------
# the CLI: SIGKILL mid-batch, then a restart re-grades nothing already graded


def test_cli_cache_survives_kill(fake, tmp_path):
    srv = fake({f"p{i}": [f"ok:{i % 8}"] for i in range(16)}, delay=0.25)
    inp, out = str(tmp_path / "proofs.jsonl"), str(tmp_path / "grades.jsonl")
    with open(inp, "w") as f:
        for i in range(16):
            f.write(json.dumps(dict(item(f"p{i}"), id=f"id{i}")) + "\n")
    env = dict(os.environ, JUDGE_API_KEY="sk-secret-kill", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, os.path.join(ROOT, "judge.py"), "--input", inp, "--output", out, "--base-url", srv.url,
           "--model", "m", "--concurrency", "2", "--backoff", "0.01"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 60
    while srv.answered < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first_log = proc.stdout.read().decode()
    assert srv.answered < 16, "the run finished before the kill; the test did not test anything"
    db = sqlite3.connect(out + ".cache.sqlite")
    n_cached = db.execute("SELECT COUNT(*) FROM grades").fetchone()[0]
    db.close()
    graded_before = {r["id"] for r in common.read_jsonl(out)}  # skips a torn last line
    assert n_cached >= 3 and len(graded_before) >= 3
    n_first = len(srv.requests())

    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    second = [e["pid"] for e in srv.requests()[n_first:]]
    assert not {f"p{k[2:]}" for k in graded_before} & set(second), "a graded row was requested again"
    assert len(second) == 16 - n_cached  # everything in the cache was reused, nothing else
    rows = [json.loads(line) for line in open(out)]
    assert [r["row"] for r in rows] == list(range(16))
    assert [r["score"] for r in rows] == [i % 8 for i in range(16)]
    assert all(r["error"] is None for r in rows)
    assert "sk-secret-kill" not in first_log + res.stdout + res.stderr  # the key is never printed
    assert srv.requests()[0]["auth"] == "Bearer sk-secret-kill"
    # a third run has nothing to do
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0 and "0 to grade" in res.stdout
    assert len(srv.requests()) == n_first + len(second)


def test_cli_missing_input_and_unwritable_output_are_one_line(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"problem": "p", "proof": "x</think>y", "rubric": "r"}) + "\n")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for argv, msg in ((["--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "g.jsonl")], "--input"),
                      (["--input", str(inp), "--output", str(blocker / "g.jsonl")], "--output")):
        p = subprocess.run([sys.executable, "judge.py", *argv, "--base-url", "http://127.0.0.1:9/v1"], cwd=root,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and p.stderr.startswith("error: ") and msg in p.stderr, p.stderr[-1500:]
        assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# resume by content, total deadlines, redaction (issue 16), and the grader interface (issue 13)


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_cli_resume_is_keyed_by_content(fake, tmp_path):
    """A rerun on a reordered input with one proof edited regrades exactly that proof (the old row-number
    resume sent nothing and kept row 0's grade for what had become another proof); another judge model
    regrades every row."""
    srv = fake({"p0": ["ok:1"], "p1": ["ok:2", "ok:6"], "p2": ["ok:3"], "p3": ["ok:4"]})
    rows = [dict(item(f"p{i}"), id=f"id{i}") for i in range(4)]
    inp, out = tmp_path / "in.jsonl", str(tmp_path / "out.jsonl")
    _write_rows(inp, rows)
    base = ["--input", str(inp), "--output", out, "--judge-base-url", srv.url, "--judge-backoff", "0.01"]
    assert judge.main(judge.parse_args(base + ["--judge-model", "m1"])) == 0
    assert len(srv.requests()) == 4
    _write_rows(inp, [rows[2], dict(rows[1], proof=rows[1]["proof"] + " Also by induction."), rows[3], rows[0]])
    assert judge.main(judge.parse_args(base + ["--judge-model", "m1"])) == 0
    assert [e["pid"] for e in srv.requests()[4:]] == ["p1"]  # the edited proof, nothing else
    got = [(r["row"], r["id"], r["score"]) for r in common.read_jsonl(out)]
    assert got == [(0, "id2", 3), (1, "id1", 6), (2, "id3", 4), (3, "id0", 1)]
    assert judge.main(judge.parse_args(base + ["--judge-model", "m2"])) == 0
    assert len(srv.requests()) == 9 and {e["body"]["model"] for e in srv.requests()[5:]} == {"m2"}
    assert not any(r["cached"] for r in common.read_jsonl(out))  # every grade is the new judge's
    assert json.load(open(out + ".args.json"))["judge_model"] == "m2"


def test_deadline_is_total_and_retried(fake):
    """A server that trickles a byte every 0.25 s: each read is quick, so httpx's per-read timeout never
    fires; the request's deadline covers all of it, and a timed-out request is retried."""
    srv = fake({"drip": ["trickle:24"]})  # 6 s of trickle before the body is complete
    j = Judge(srv.url, "m", **dict(FAST, timeout=1.0, max_retries=1))
    t0 = time.monotonic()
    (g,) = j.grade([item("drip")])
    j.close()
    assert g.score is None and "timed out after 1s" in g.error and "gave up after 2 attempts" in g.error
    assert len(srv.requests("drip")) == 2 and time.monotonic() - t0 < 4.5


def test_api_key_is_redacted_from_everything_stored_or_printed(fake, tmp_path, capsys, monkeypatch):
    """A server echoing the Authorization header in error bodies (retried 500, final 401) and in a 200
    reply: the key reaches no grade, no grades.jsonl line, no cache row and no printed line."""
    secret = "sk-leak-987654"
    monkeypatch.setenv("JUDGE_API_KEY", secret)
    srv = fake({"a": ["echo500"], "b": ["echo200"], "c": ["echo401"]})
    inp, out = tmp_path / "in.jsonl", str(tmp_path / "out.jsonl")
    _write_rows(inp, [item("a"), item("b"), item("c")])
    argv = ["--input", str(inp), "--output", out, "--judge-base-url", srv.url, "--judge-model", "m",
            "--judge-backoff", "0.01", "--judge-max-retries", "1"]
    assert judge.main(judge.parse_args(argv)) == 1
    assert {e["auth"] for e in srv.requests()} == {f"Bearer {secret}"}  # it was sent, and echoed
    rows = common.read_jsonl(out)
    assert "HTTP 500" in rows[0]["error"] and "[redacted]" in rows[0]["error"]
    assert rows[1]["score"] == 5 and "[redacted]" in rows[1]["reply"]
    assert "HTTP 401" in rows[2]["error"] and "[redacted]" in rows[2]["error"]
    # grades.jsonl, its args.json and the SQLite cache (its WAL file too)
    stored = "".join(open(os.path.join(tmp_path, f), "rb").read().decode("latin-1") for f in os.listdir(tmp_path))
    printed = capsys.readouterr()
    assert secret not in stored + printed.out + printed.err
    # the Python API too: grades and their messages
    j = Judge(srv.url, "m", **FAST)
    grades = j.grade([item("a"), item("b"), item("c")])
    j.close()
    assert all(secret not in f"{g.error} {g.reply} {g.note}" for g in grades)


class Brevity(judge.Grader):
    """A toy grader with no server: 7 for an answer of at most 20 characters after </think>, else 0."""

    def score(self, answer, item):
        return 7 if len(answer) <= 20 else 0


def test_graders_by_name_and_a_registered_toy_grader(monkeypatch):
    monkeypatch.setitem(judge.GRADERS, "brevity", Brevity)
    g = judge.make_grader("brevity")
    items = [{"problem": "p", "proof": "t</think>\nShort."}, {"problem": "p", "proof": "t</think>\n" + "long " * 9},
             {"problem": "p", "proof": "never finished"}]
    assert [(x.score, x.reward, x.truncated) for x in g.grade(items)] == [(7, 1.0, False), (0, 0.0, False),
                                                                          (0, 0.0, True)]
    assert g.key(items[0]) != g.key(items[1]) and g.key(items[0]) == judge.make_grader("brevity").key(dict(items[0]))
    # a scorer that fails or returns nonsense: that item is ungraded (error), never a 0
    monkeypatch.setattr(Brevity, "score", lambda self, answer, item: 9)
    (bad,) = g.grade(items[:1])
    assert bad.score is None and "not an int 0..7" in bad.error
    # the registry, and judge prompts as grader names
    assert isinstance(judge.make_grader("answer"), judge.AnswerGrader)
    j = judge.make_grader("proofbench", base_url="http://127.0.0.1:9/v1", model="m")
    assert isinstance(j, judge.Judge) and j.prompt_name == "proofbench"
    assert judge.required_fields("answer") == ["answer"] and judge.required_fields("imo_proofbench")[0] == "problem"
    assert judge.required_fields("judge", "answerbench") == ["problem", "answer"]
    with pytest.raises(ValueError, match="known prompts.*judge.GRADERS"):
        judge.make_grader("no_such_grader")


def test_answer_grader_is_math_verify_behind_the_interface():
    g = judge.AnswerGrader()  # rl.py's settings: the self-evaluation is kept
    a, b, c = g.grade([{"proof": "<think>5</think> \\boxed{5}", "answer": "5"},
                       {"proof": "<think>5</think> \\boxed{4}", "answer": "5"},
                       {"proof": "<think>\\boxed{5} and then the budget ran out", "answer": "5"}])
    assert (a.score, a.reward, b.score, c.truncated) == (7, 1.0, 0, True) and "extracted answer: '5'" in a.reply
    with pytest.raises(ValueError, match="grade item 0: grader AnswerGrader needs a non-empty 'answer'"):
        g.submit([{"proof": "</think>\\boxed{1}", "answer": ""}])
