"""Grade proofs with an LLM judge on a 0-7 scale, and final answers with an LLM judge or math-verify.

A proof reward in QED-Nano comes from a judge that reads the problem, a marking scheme and the text
after </think>, and answers with a score tag holding 0..7 (shared/RECIPE.md, "Stage 2"). This file
is that judge's client: concurrent, retried, cached on disk as each grade arrives. The benchmark
graders of the released eval are prompts too (imo_proofbench, proofbench, and answerbench: an LLM
that compares the last \boxed{} answer with the gold answer).

    # the RL reward judge of the recipe: gpt-oss-20b served by vLLM, medium reasoning effort
    vllm serve openai/gpt-oss-20b --port 8000
    python judge.py --input proofs.jsonl --output grades.jsonl

    # IMO-ProofBench style grading (reference solution + guidelines, 7/6/1/0) with Gemini
    export JUDGE_API_KEY=...
    python judge.py --input proofs.jsonl --output grades.jsonl --prompt imo_proofbench \
        --base-url https://generativelanguage.googleapis.com/v1beta/openai --model gemini-3-pro-preview

Input rows: {"problem", "proof" (the raw completion, thinking included), "rubric", "reference",
"answer" (only for prompts that use them), "id" (optional)}. Each output row is the input's id/row number plus
the Grade. Rerunning the command skips rows already graded; errored rows are retried.

Python API (rl.py, eval.py):
    judge = Judge(base_url, model, prompt="rl_proof", cache_path="judge.sqlite")  # strip_self_eval=False
    future = judge.submit(items)        # non-blocking; items = [{problem, proof, rubric}, ...]
    grades = future.result()            # list[Grade]; grade.reward = score / 7
    answer_reward(completion, "42")     # 1.0 / 0.0 with math-verify, no LLM
"""

import argparse
import asyncio
import hashlib
import json
import os
import re
import sqlite3
import sys
import threading
import time
from dataclasses import asdict, dataclass

import common

PROMPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
RETRY_STATUS = {408, 409, 425, 429}  # plus every 5xx


# ---------------------------------------------------------------------------------------------
# reading the judge's reply and preparing the proof


# A tag whose content has no '<' (so "<score><score>5</score>" finds the inner one). The content
# must be an integer, optionally "out of 7" or "/ 7", with whitespace and markdown bold tolerated.
_TAG_RE = re.compile(r"<(score|points)>([^<]*)</\1\s*>", re.IGNORECASE)
_VALUE_RE = re.compile(r"^[\s*]*([-+]?\d+)[\s*]*(?:(?:/|out\s+of)\s*7)?[\s*.]*$", re.IGNORECASE)


def parse_score(text):
    """The integer 0..7 of the last well-formed <score> or <points> tag in `text`, else None.

    Well-formed: "<score>5</score>", "<points> 6 out of 7 </points>", "<score>**7**/7</score>".
    A tag holding anything else ("<score>N</score>", "3.5", "4 out of 10") is skipped. When the
    last well-formed value is out of range (9, -1), the answer is None: the judge broke the format,
    and an earlier tag is not a safer guess.
    """
    if not text:
        return None
    value = None
    for m in _TAG_RE.finditer(text):
        v = _VALUE_RE.match(m.group(2))
        if v:
            value = int(v.group(1))
    return value if value is not None and 0 <= value <= 7 else None


# The heading that opens a trailing self-evaluation section, as the released evaluation removes it
# (eval/src/imobench/evaluation.py, remove_self_evaluation): a markdown heading at the start of a line
# (one or more '#') reading "Evaluation", "Self Evaluation" or "Final Evaluation", '*' bold marks and
# spaces tolerated; everything from it to the end goes. Like the released pattern it is case-sensitive
# and needs the '#': "Self-evaluation:" or "**Self Evaluation**" alone are kept (they are not headings).
_SELF_EVAL_RE = re.compile(r"^#+[ \t*]*(?:(?:Self|Final)[ \t*]*){0,2}Evaluation\b", re.MULTILINE)


def strip_self_evaluation(text):
    """`text` up to the self-evaluation heading (see _SELF_EVAL_RE), stripped; all of it when there is none."""
    m = _SELF_EVAL_RE.search(text)
    return (text[:m.start()] if m else text).strip()


def prepare_proof(completion_text, *, require_think=True, strip_self_eval=False):
    """The proof a judge sees: the text after the last </think> (a completion from a Qwen3-Thinking-2507
    template has no opening <think>: its prompt ended with one). None when there is no </think> (a
    truncated rollout: score 0, no judge call). require_think=False takes the whole text when the model
    does not think (instruct models). strip_self_eval=True also cuts a trailing self-evaluation section
    (benchmark grading, as the released eval does); training rewards keep it (the default)."""
    _, answer, truncated = common.split_thinking(completion_text or "")
    if truncated:
        if require_think:
            return None
        answer = re.sub(r"^\s*<think>", "", completion_text or "").strip()
    return strip_self_evaluation(answer) if strip_self_eval else answer.strip()


def score_to_reward(score, threshold=None):
    """score / 7 (None -> 0.0); with `threshold`, 1.0 if score >= threshold else 0.0."""
    if score is None:
        return 0.0
    if threshold is not None:
        return 1.0 if score >= threshold else 0.0
    return score / 7.0


# ---------------------------------------------------------------------------------------------
# final answers (IMO-AnswerBench, and rl.py tasks with an `answer` column): no LLM


def last_boxed(text):
    """Content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced; None if none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0 or text[start:i].strip() not in ("\\boxed", "\\fbox"):
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j].strip()
    return None  # unclosed brace: the answer was cut off


def grade_answer(answer_text, reference):
    """True when the last \\boxed{} of `answer_text` equals `reference` (math-verify: numbers,
    fractions, sets, equations, intervals). math-verify's signal-based timeout only works in the
    main thread, so other threads run it without one."""
    from math_verify import parse, verify

    box = last_boxed(answer_text or "")
    if box is None or reference is None:
        return False
    reference = str(reference).strip()
    if " ".join(box.split()) == " ".join(reference.split()):
        return True
    t = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(reference if "$" in reference else f"${reference}$", parsing_timeout=t)
    if not gold:
        gold = parse("\\boxed{" + reference + "}", parsing_timeout=t)
    pred = parse("\\boxed{" + box + "}", parsing_timeout=t)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=t))


def answer_reward(completion_text, reference):
    """1.0 if the completion's final answer (after </think>) matches `reference`, else 0.0;
    0.0 for a truncated completion (no </think>)."""
    _, answer, truncated = common.split_thinking(completion_text or "")
    return 0.0 if truncated else float(grade_answer(answer, reference))


# ---------------------------------------------------------------------------------------------
# final answers graded by an LLM (IMO-AnswerBench as the released eval grades it)


def _boxes(text):
    """[(start, content)] of every complete top-level \\boxed{...} / \\fbox{...} (a box inside another
    box is part of the outer one's content; an unclosed box is skipped)."""
    out, pos = [], 0
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        if m.start() < pos:
            continue  # inside the previous box
        depth = 0
        for j in range(m.end() - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                out.append((m.start(), text[m.end():j].strip()))
                pos = j + 1
                break
    return out


def final_answer_excerpt(answer_text):
    """What the answer judge is shown of a response: its final boxed answer - every \\boxed{} on the
    last line holding one, joined by ", " (answers like "\\boxed{1}, \\boxed{2}" are lists) - or,
    when there is no box, its last five lines after "..." (the released eval's fallback)."""
    text = (answer_text or "").strip()
    boxes = _boxes(text)
    if boxes:
        last_line = text.count("\n", 0, boxes[-1][0])
        return ", ".join(c for s, c in boxes if text.count("\n", 0, s) == last_line)
    lines = text.split("\n")
    return "...\n" + "\n".join(lines[-5:]) if len(lines) >= 5 else text


_VERDICT_RE = re.compile(r"^[\s*]*(?:\\text(?:bf)?\{\s*)?(correct|incorrect)\s*\}?[\s*.]*$", re.IGNORECASE)


def parse_correctness(reply):
    """True / False from the answer judge's LAST \\boxed{Correct} / \\boxed{Incorrect} (\\text{...} and
    bold tolerated); None when the reply has no box or the last box holds anything else (a parse
    failure: counts 0)."""
    boxes = _boxes(reply or "")
    if not boxes:
        return None
    m = _VERDICT_RE.match(boxes[-1][1])
    return None if m is None else m.group(1).lower() == "correct"


# ---------------------------------------------------------------------------------------------
# prompts


def load_prompt(name):
    """Template text of prompts/judge_<name>.txt (or a path to a .txt file)."""
    path = name if name.endswith(".txt") else os.path.join(PROMPT_DIR, f"judge_{name}.txt")
    if not os.path.isfile(path):
        known = sorted(f[6:-4] for f in os.listdir(PROMPT_DIR) if f.startswith("judge_") and f.endswith(".txt"))
        raise common.InputError(f"judge prompt {name!r} not found at {path}; known prompts: {known} "
                         "(or pass a path to a .txt template with {problem} {rubric} {reference} {answer} {proof})")
    with open(path) as f:
        return f.read()


# The placeholders a judge template may use. {answer} is the gold answer: a template that uses it is
# an answer judge (the candidate's {proof} is then its final boxed answer, the reply a \boxed{} verdict).
TEMPLATE_FIELDS = ("problem", "rubric", "reference", "answer", "proof")


def template_fields(template):
    """The placeholders of TEMPLATE_FIELDS that `template` uses, in that order."""
    return [f for f in TEMPLATE_FIELDS if "{" + f + "}" in template]


def render_prompt(template, fields):
    """Fill the {placeholders} of `fields` in one pass (text inside a field, e.g. a problem quoting
    "{proof}", is never re-read as a placeholder). Not str.format: proofs are full of LaTeX braces."""
    pattern = re.compile(r"\{(" + "|".join(map(re.escape, fields)) + r")\}")
    return pattern.sub(lambda m: fields[m.group(1)], template) if fields else template


# ---------------------------------------------------------------------------------------------
# results and the on-disk cache


@dataclass
class Grade:
    """One graded proof. score None with error set: the judge could not be reached / failed after
    retries (not cached; a rerun retries it). score None with parse_failed: the judge replied but
    with no valid score (cached, counts 0). truncated: no </think>, 0 without a judge call."""
    score: int | None
    reward: float
    reply: str = ""
    error: str | None = None
    parse_failed: bool = False
    truncated: bool = False
    cached: bool = False
    latency_s: float = 0.0
    note: str = ""

    def to_dict(self):
        return asdict(self)


class GradeCache:
    """SQLite table key -> judge reply. WAL journal and one committed transaction per grade, so a
    process killed mid-batch keeps every reply that had arrived. Safe to share between processes."""

    def __init__(self, path):
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS grades (key TEXT PRIMARY KEY, model TEXT, prompt TEXT, "
                        "reply TEXT NOT NULL, latency_s REAL, created REAL)")
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            row = self.db.execute("SELECT reply, latency_s FROM grades WHERE key = ?", (key,)).fetchone()
        return row

    def put(self, key, model, prompt, reply, latency_s):
        with self.lock:  # autocommit: this INSERT is its own durable transaction
            self.db.execute("INSERT OR REPLACE INTO grades VALUES (?, ?, ?, ?, ?, ?)",
                            (key, model, prompt, reply, latency_s, time.time()))

    def __len__(self):
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM grades").fetchone()[0]

    def close(self):
        with self.lock:
            self.db.close()


class JudgeError(Exception):
    pass


def _reply_text(data):
    """choices[0].message.content of a chat completion; ValueError if the JSON is not one."""
    try:
        content = data["choices"][0]["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise ValueError(f"not a chat completion ({type(e).__name__}: {e}): {str(data)[:200]}") from None
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""  # None: the judge spent its max_tokens reasoning -> no score, parse failure


# ---------------------------------------------------------------------------------------------
# the client


class Judge:
    """OpenAI-compatible chat-completions judge (OpenAI, Gemini's compatible endpoint, `vllm serve`).

    Requests run on a private asyncio loop in a background thread, at most `concurrency` at once.
    429 (honouring Retry-After), 408/409/425, 5xx, timeouts, connection errors and malformed JSON
    are retried `max_retries` times with exponential backoff and jitter; other 4xx are not. A
    request that still fails becomes a Grade with `error` set, never a silent 0. Each reply is
    written to the cache the moment it arrives. The API key is read from `$api_key_env` (optional
    for a local vLLM server) and never logged.

    Two kinds of prompt: a proof judge (the reply's last <score>/<points> tag, 0..7) and an answer
    judge, any template using {answer} (judge_answerbench): it is shown the final boxed answer of the
    proof text (final_answer_excerpt) and the gold answer, and its last \\boxed{Correct} gives 7,
    \\boxed{Incorrect} 0, anything else a parse failure. strip_self_eval cuts a trailing
    self-evaluation section before grading (eval.py: True, as the released eval; RL rewards: False).
    """

    def __init__(self, base_url, model, *, api_key_env="JUDGE_API_KEY", prompt="rl_proof", cache_path=None,
                 concurrency=32, timeout=600.0, max_retries=6, reasoning_effort=None, max_tokens=None,
                 threshold=None, require_think=True, strip_self_eval=False, backoff_base=2.0, backoff_max=120.0,
                 retry_after_max=600.0, max_tokens_param="max_tokens", extra_body=None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.prompt_name = model, prompt
        self.template = load_prompt(prompt)
        self.fields = template_fields(self.template)
        self.answer_judge = "answer" in self.fields
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries
        self.reasoning_effort, self.max_tokens, self.max_tokens_param = reasoning_effort, max_tokens, max_tokens_param
        self.threshold, self.require_think, self.strip_self_eval = threshold, require_think, strip_self_eval
        self.backoff_base, self.backoff_max, self.retry_after_max = backoff_base, backoff_max, retry_after_max
        self.extra_body = dict(extra_body or {})
        self.api_key_env = api_key_env
        key = os.environ.get(api_key_env) if api_key_env else None
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.cache = GradeCache(cache_path) if cache_path else None
        self._loop = self._thread = None
        self._lock = threading.Lock()

    # ---- public API

    def submit(self, items, on_grade=None):
        """Start grading `items` (dicts with problem, proof, rubric, reference) and return a
        concurrent.futures.Future of list[Grade] in item order. on_grade(index, grade) is called
        (on the judge's thread) as each grade arrives. Bad items raise ValueError right here."""
        jobs = [self._job(i, item) for i, item in enumerate(items)]
        self._start()
        return asyncio.run_coroutine_threadsafe(self._grade_all(jobs, on_grade), self._loop)

    def grade(self, items, *, on_grade=None, progress=False, desc="judge"):
        """Blocking version of submit, with an optional tqdm bar."""
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=desc, disable=not progress, dynamic_ncols=True)

        def cb(i, g):
            bar.update(1)
            if on_grade is not None:
                on_grade(i, g)

        future = self.submit(items, on_grade=cb)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise
        finally:
            bar.close()

    def close(self):
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result(timeout=30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()
            self._loop = None
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- one item -> a request, a cache key, or an immediate Grade

    def _job(self, i, item):
        if not isinstance(item, dict) or "proof" not in item or "problem" not in item:
            raise common.InputError(f"judge item {i}: needs a dict with 'problem' and 'proof' (got {str(item)[:100]})")
        proof = prepare_proof(item["proof"], require_think=self.require_think, strip_self_eval=self.strip_self_eval)
        if proof is None:
            return Grade(0, 0.0, truncated=True, note="no </think> (truncated): scored 0 without a judge call")
        if not proof:
            return Grade(0, 0.0, note="empty proof after removing the thinking: scored 0 without a judge call")
        if self.answer_judge:
            proof = final_answer_excerpt(proof)
        fields = {"problem": item["problem"], "rubric": item.get("rubric"), "reference": item.get("reference"),
                  "answer": None if item.get("answer") is None else str(item["answer"]), "proof": proof}
        for f in self.fields:
            if not isinstance(fields[f], str) or not fields[f].strip():
                raise common.InputError(f"judge item {i}: prompt {self.prompt_name!r} uses {{{f}}} but the item's "
                                 f"{f!r} is empty or missing; give it, or choose a prompt that does not use it")
        content = render_prompt(self.template, {f: fields[f] for f in self.fields})
        key = hashlib.sha256(json.dumps([self.model, self.prompt_name, self.reasoning_effort, content])
                             .encode()).hexdigest()
        return key, [{"role": "user", "content": content}]

    def _grade_from_reply(self, reply, latency_s, cached):
        if self.answer_judge:
            ok = parse_correctness(reply)
            score = None if ok is None else 7 if ok else 0
            failed = "no \\boxed{Correct} or \\boxed{Incorrect} as the reply's last box: counts 0"
        else:
            score = parse_score(reply)
            failed = "no valid <score>/<points> tag 0..7 in the reply: counts 0"
        return Grade(score, score_to_reward(score, self.threshold), reply=reply, parse_failed=score is None,
                     cached=cached, latency_s=round(latency_s, 3), note="" if score is not None else failed)

    # ---- the event loop side

    def _start(self):
        with self._lock:
            if self._loop is not None:
                return
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="judge-loop", daemon=True)
            self._thread.start()
            asyncio.run_coroutine_threadsafe(self._setup(), self._loop).result()

    async def _setup(self):
        import httpx

        self._sem = asyncio.Semaphore(self.concurrency)
        self._inflight = {}  # key -> Task, so identical proofs in flight cost one request
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout, connect=min(30.0, self.timeout)),
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency))

    async def _grade_all(self, jobs, on_grade):
        async def one(i, job):
            g = job if isinstance(job, Grade) else await self._grade_one(*job)
            if on_grade is not None:
                on_grade(i, g)
            return g
        return list(await asyncio.gather(*(one(i, j) for i, j in enumerate(jobs))))

    async def _grade_one(self, key, messages):
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return self._grade_from_reply(hit[0], 0.0, cached=True)
        shared = key in self._inflight
        if not shared:
            self._inflight[key] = asyncio.ensure_future(self._request(key, messages))
        task = self._inflight[key]
        try:
            reply, latency = await asyncio.shield(task)
        except JudgeError as e:
            return Grade(None, 0.0, error=str(e), note="judge request failed: not graded, a rerun retries it")
        finally:
            if task.done() and self._inflight.get(key) is task:
                del self._inflight[key]
        return self._grade_from_reply(reply, 0.0 if shared else latency, cached=shared)

    async def _request(self, key, messages):
        import httpx

        body = {"model": self.model, "messages": messages, **self.extra_body}
        if self.reasoning_effort:
            body["reasoning_effort"] = self.reasoning_effort
        if self.max_tokens:
            body[self.max_tokens_param] = self.max_tokens
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            async with self._sem:
                t0 = time.monotonic()
                try:
                    r = await self._client.post(self.url, json=body, headers=self._headers)
                except httpx.TimeoutException as e:
                    last = f"timed out after {self.timeout:g}s ({type(e).__name__})"
                except httpx.TransportError as e:
                    last = f"could not reach the judge at {self.url} ({type(e).__name__}: {e})"
                else:
                    latency = time.monotonic() - t0
                    if r.status_code == 200:
                        try:
                            reply = _reply_text(r.json())
                        except ValueError as e:  # includes json.JSONDecodeError
                            last = f"malformed reply from the judge: {str(e)[:300]}"
                        else:
                            if self.cache is not None:
                                self.cache.put(key, self.model, self.prompt_name, reply, latency)
                            return reply, latency
                    elif r.status_code in RETRY_STATUS or r.status_code >= 500:
                        last = f"HTTP {r.status_code}: {r.text[:300]}"
                        retry_after = common.retry_after_s(r.headers)
                    else:
                        hint = (f" (is the API key in ${self.api_key_env} right?)"
                                if r.status_code in (401, 403) else "")
                        raise JudgeError(f"HTTP {r.status_code} from the judge, not retried{hint}: {r.text[:500]}")
            if attempt == self.max_retries:
                break
            await asyncio.sleep(common.retry_delay(attempt, self.backoff_base, self.backoff_max, retry_after,
                                                   self.retry_after_max))
        raise JudgeError(f"gave up after {self.max_retries + 1} attempts; last error: {last}")


# ---------------------------------------------------------------------------------------------
# CLI: grade a JSONL file of proofs, incrementally and resumably


def grade_file(judge, input_path, output_path, *, progress=True):
    """Grade every row of `input_path` not yet graded in `output_path` (rows with an error are
    retried), appending each grade as it arrives; at the end the output is rewritten in row order
    with one line per row. Returns (rows graded now, rows with an error)."""
    rows = common.read_jsonl(input_path)
    done = {r["row"]: r for r in common.read_jsonl(output_path) if r.get("error") is None}
    todo = [i for i in range(len(rows)) if i not in done]
    print(f"{input_path}: {len(rows)} rows, {len(done)} already graded, {len(todo)} to grade", flush=True)

    def record(i, g):
        common.append_jsonl(output_path, {"row": todo[i], "id": rows[todo[i]].get("id"), **g.to_dict()})

    items = []
    for i in todo:
        r = rows[i]
        missing = [k for k in ("problem", "proof") if k not in r]
        if missing:
            raise common.InputError(f"{input_path}: row {i + 1} has no {missing} field(s); each row needs "
                             "'problem' and 'proof' (and 'rubric'/'reference'/'answer' as the prompt requires)")
        try:  # the fields the prompt needs, checked now and named by row (submit numbers items, not rows)
            judge._job(i, r)
        except ValueError as e:
            raise common.InputError(f"{input_path}: row {i + 1}: {e}") from None
        items.append(r)
    grades = judge.grade(items, on_grade=record, progress=progress) if items else []
    final = {r["row"]: r for r in common.read_jsonl(output_path)}  # last line per row wins
    tmp = output_path + ".tmp"
    with open(tmp, "w") as f:
        for i in sorted(final):
            f.write(json.dumps(final[i], ensure_ascii=False) + "\n")
    os.replace(tmp, output_path)
    return len(grades), sum(g.error is not None for g in grades)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # ---- io
    p.add_argument("--input", required=True,
                   help="JSONL with problem, proof (raw completion), rubric, [reference], [id]")
    p.add_argument("--output", required=True, help="JSONL of grades, appended as they arrive; rerun to resume")
    p.add_argument("--cache", default="",
                   help="SQLite cache of judge replies ('' = <output>.cache.sqlite, 'none' = off)")
    # ---- judge
    p.add_argument("--base-url", default="http://localhost:8000/v1", help="OpenAI-compatible base URL (ends in /v1)")
    p.add_argument("--model", default="openai/gpt-oss-20b", help="judge model name as the server knows it")
    p.add_argument("--api-key-env", default="JUDGE_API_KEY", help="environment variable holding the API key "
                   "(unset = no Authorization header, fine for a local vLLM server)")
    p.add_argument("--prompt", default="rl_proof", help="prompts/judge_<name>.txt: rl_proof (the RL reward: "
                   "correctness first, scheme advisory; <score>), proofbench (ProofBench: scheme, alternative "
                   "approaches mapped onto it; <points>), marking_scheme (strict scheme; <score>), imo_proofbench "
                   "(reference + guidelines; <points>), answerbench (answer judge: rows need 'answer'; "
                   "\\boxed{Correct}), or a .txt path")
    p.add_argument("--reasoning-effort", default="medium",
                   help="low|medium|high, sent as reasoning_effort ('' = not sent)")
    p.add_argument("--max-tokens", type=int, default=-1, help="judge reply budget in tokens (-1 = server default)")
    p.add_argument("--max-tokens-param", default="max_tokens", choices=["max_tokens", "max_completion_tokens"],
                   help="request field for --max-tokens (OpenAI reasoning models want max_completion_tokens)")
    # ---- reliability
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight at once")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--max-retries", type=int, default=6, help="retries on 429/5xx/timeouts/malformed replies")
    p.add_argument("--backoff", type=float, default=2.0, help="first retry delay in seconds (doubles, with jitter)")
    # ---- rewards
    p.add_argument("--threshold", type=int, default=-1, help="reward 1 if score >= this else 0 (-1 = score/7)")
    p.add_argument("--allow-no-think", action="store_true", help="grade the whole text when there is no "
                   "</think> (non-thinking models) instead of scoring it 0 as truncated")
    p.add_argument("--strip-self-eval", action="store_true", help="cut a trailing self-evaluation section (a "
                   "'# Evaluation' / '## Self Evaluation' / '## Final Evaluation' heading to the end) before "
                   "grading, as benchmark grading does (eval.py); off = RL rewards, which keep it")
    args = p.parse_args(argv)

    if not os.path.isfile(args.input):
        raise common.InputError(f"--input {args.input}: no such file")
    common.writable_path(args.output, "--output")  # before any request is paid for
    cache = None if args.cache == "none" else (args.cache or args.output + ".cache.sqlite")
    judge = Judge(args.base_url, args.model, api_key_env=args.api_key_env, prompt=args.prompt, cache_path=cache,
                  concurrency=args.concurrency, timeout=args.timeout, max_retries=args.max_retries,
                  reasoning_effort=args.reasoning_effort or None,
                  max_tokens=args.max_tokens if args.max_tokens > 0 else None, max_tokens_param=args.max_tokens_param,
                  threshold=args.threshold if args.threshold >= 0 else None, require_think=not args.allow_no_think,
                  strip_self_eval=args.strip_self_eval, backoff_base=args.backoff)
    if not judge._headers:
        print(f"note: ${args.api_key_env} is not set; sending requests without an API key", flush=True)
    with open(args.output + ".args.json", "w") as f:
        json.dump(vars(args), f, indent=2)
    t0 = time.time()
    try:
        n, n_err = grade_file(judge, args.input, args.output)
    finally:
        judge.close()
    rows = common.read_jsonl(args.output)
    scores = [r["score"] or 0 for r in rows if r.get("error") is None]  # a parse failure counts 0
    print(f"graded {n} rows in {time.time() - t0:.1f}s | mean score {sum(scores) / max(1, len(scores)):.2f}/7 over "
          f"{len(scores)} rows | parse failures {sum(r['parse_failed'] for r in rows)} | truncated "
          f"{sum(r['truncated'] for r in rows)} | errors {n_err} -> {args.output}", flush=True)
    if n_err:
        print(f"{n_err} rows failed after retries (see their 'error'); rerun the same command to retry them",
              file=sys.stderr, flush=True)
    return 1 if n_err else 0


if __name__ == "__main__":
    common.exit_on_signals()  # SIGTERM/Ctrl-C: what is written (generations, grades, the judge cache) stays
    sys.exit(common.cli(main))
