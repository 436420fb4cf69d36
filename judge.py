"""Graders: proofs by an LLM judge on a 0-7 scale, final answers by math-verify or an LLM judge.

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
    python judge.py --input proofs.jsonl --output grades.jsonl --judge-prompt imo_proofbench \
        --judge-base-url https://generativelanguage.googleapis.com/v1beta/openai --judge-model gemini-3-pro-preview

Input rows: {"problem", "proof" (the raw completion, thinking included), "rubric", "reference",
"answer" (only for prompts that use them), "id" (optional)}. Each output row is the input's id/row
number, the grade's `key` (a hash of what was graded: problem, proof, rubric/reference/answer, judge
model, prompt text and settings) and the Grade. Rerunning the command skips rows whose key is already
graded, so a reordered, edited or re-judged input regrades exactly what changed; errored rows are retried.

One grader interface (rl.py's rewards and eval.py's grading use nothing else):
    grader = make_grader(name, **settings)  # or from_args(args): the stage's --judge-* flags
    future = grader.submit(items)           # items = [{problem, proof, rubric, reference, answer}, ...]
    grades = future.result()                # list[Grade] in item order; grader.grade(items) blocks
    grader.required_fields()                # the item fields it reads besides the proof
    grader.key(item)                        # what a grade is stored and resumed under
GRADERS names them: "judge" (Judge, the LLM judge with --judge-prompt; any other name that is a judge
prompt means Judge with that prompt) and "answer" (AnswerGrader, math-verify, no LLM). A new grader
that needs no server is a Grader subclass with `needs` and `score(answer, item)`, plus its name in
GRADERS (README, "Hacking: adding a grader").

The Grade contract, for every grader: `score` is an int 0..7, or None. `error` set means ungraded
(the judge could not be reached, or the grader failed after retries): reward 0.0 but never counted as
a score of 0 (eval leaves it out and counts it, rl re-grades it then applies --judge-failures), never
cached, and a rerun grades it again. score None without an error is a parse failure (the judge replied
with no valid score: counts 0). `truncated`: no </think>, score 0 without grading. `reward` is score / 7
(or 1/0 against a threshold). API keys never reach a Grade, the cache, a file or a message.
"""
import argparse
import asyncio
import concurrent.futures
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
# the final-answer helpers live in answers.py; judge.grade_answer / judge.answer_reward keep working
from answers import answer_reward, final_answer_excerpt, grade_answer, last_boxed, parse_correctness  # noqa: F401

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


def render_prompt(template, fields, what="the judge prompt"):
    """Fill the {placeholders} of `fields` in one pass (common.fill_template: text inside a field, e.g. a
    problem quoting "{proof}", is never re-read as a placeholder; LaTeX braces are left alone)."""
    return common.fill_template(template, fields, known=TEMPLATE_FIELDS, what=what)


# ---------------------------------------------------------------------------------------------
# results and the on-disk cache


@dataclass
class Grade:
    """One graded proof, under the contract of the module docstring: score 0..7 or None; error set =
    ungraded (not cached, never scored as 0; a rerun retries it); parse_failed = the judge replied with
    no valid score (cached, counts 0); truncated = no </think>, 0 without grading."""
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


def redact(text, secrets):
    """`text` with every secret in `secrets` (API keys) replaced by [redacted]: a server may echo the
    Authorization header in an error body or a reply, and those reach grades.jsonl, logs and messages."""
    for secret in secrets:
        if secret and text:
            text = text.replace(secret, "[redacted]")
    return text


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
# the grader interface, and the graders that need no server


class Grader:
    """What rl.py and eval.py grade with: submit(items) -> Future of list[Grade], grade(items), key(item),
    required_fields(), close(). This base class is also the whole machinery of a grader that needs no
    server: a subclass sets `needs` (the item fields it reads besides the proof, each a non-empty string)
    and writes score(answer, item), where `answer` is the proof as a judge would see it (the text after
    </think>, self-evaluation cut with strip_self_eval) and the return value is an int 0..7, None (a
    parse failure) or a Grade. submit() grades at once on the caller's thread; a score() that raises
    gives that item a Grade with `error` set (ungraded), never a 0. Settings meant for the LLM judge
    (base_url, model, cache_path, ...) are accepted and unused, so make_grader can pass every grader
    the same settings."""

    needs = ()

    def __init__(self, *, require_think=True, strip_self_eval=False, threshold=None, **judge_settings):
        self.require_think, self.strip_self_eval, self.threshold = require_think, strip_self_eval, threshold

    @classmethod
    def fields_for(cls, prompt=None):
        """The item fields this grader class reads besides the proof (Judge: those of `prompt`)."""
        return list(cls.needs)

    def required_fields(self):
        return list(self.needs)

    def settings(self):
        """Everything besides the item that decides a grade: part of key()."""
        return dict(grader=type(self).__name__, require_think=self.require_think,
                    strip_self_eval=self.strip_self_eval, threshold=self.threshold)

    def key(self, item):
        """Hash of what is graded (problem, proof, the fields the grader reads) and of settings(): the
        grade of `item` is stored and resumed under it, so an edited item or another judge regrades."""
        fields = {f: item.get(f) for f in ["problem", "proof", *self.required_fields()]}
        return hashlib.sha256(json.dumps([self.settings(), fields], sort_keys=True, default=str).encode()).hexdigest()

    def check(self, i, item):
        """InputError naming item `i` when it cannot be graded (no proof, a needed field empty)."""
        if not isinstance(item, dict) or "proof" not in item:
            raise common.InputError(f"grade item {i}: needs a dict with 'proof' (got {str(item)[:100]})")
        for f in self.required_fields():
            v = item.get(f)
            if v is None or not str(v).strip():
                raise common.InputError(f"grade item {i}: grader {type(self).__name__} needs a non-empty {f!r} "
                                        f"(got {v!r}); give it, or choose a grader that does not use it")

    def prepare(self, item):
        """The proof text score() sees, or the Grade decided without grading (truncated, empty)."""
        proof = prepare_proof(item["proof"], require_think=self.require_think, strip_self_eval=self.strip_self_eval)
        if proof is None:
            return Grade(0, 0.0, truncated=True, note="no </think> (truncated): scored 0 without a judge call")
        if not proof:
            return Grade(0, 0.0, note="empty proof after removing the thinking: scored 0 without a judge call")
        return proof

    def score(self, answer, item):
        raise NotImplementedError(f"{type(self).__name__}.score(answer, item) -> int 0..7 | None | Grade")

    def _grade_one(self, item):
        answer = self.prepare(item)
        if isinstance(answer, Grade):
            return answer
        t0 = time.monotonic()
        try:
            out = self.score(answer, item)
            if not isinstance(out, Grade):
                if out is not None and (isinstance(out, bool) or not isinstance(out, int) or not 0 <= out <= 7):
                    raise ValueError(f"score() returned {out!r}, not an int 0..7 or None")
                out = Grade(out, score_to_reward(out, self.threshold), parse_failed=out is None)
        except Exception as e:  # noqa: BLE001 - one item's failure is that item's error, as a judge outage
            return Grade(None, 0.0, error=f"{type(self).__name__} failed: {type(e).__name__}: {e}",
                         note="grader failed: not graded, a rerun retries it")
        out.latency_s = round(time.monotonic() - t0, 3)
        return out

    def submit(self, items, on_grade=None):
        """Grade `items` and return a concurrent.futures.Future of list[Grade] in item order (done at once
        here; the Judge's runs in the background). on_grade(index, grade) is called as each grade is
        ready. Bad items raise InputError before anything is graded."""
        for i, item in enumerate(items):
            self.check(i, item)
        grades = []
        for i, item in enumerate(items):
            grades.append(self._grade_one(item))
            if on_grade is not None:
                on_grade(i, grades[-1])
        future = concurrent.futures.Future()
        future.set_result(grades)
        return future

    def grade(self, items, *, on_grade=None, progress=False, desc="grade"):
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
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AnswerGrader(Grader):
    """Final answers with math-verify, no LLM (eval.py --grader answer, rl.py --reward answer): 7 when the
    last \\boxed{} of the proof text equals the item's gold 'answer' (grade_answer), else 0."""

    needs = ("answer",)

    def score(self, answer, item):
        ok = grade_answer(answer, item["answer"])
        reply = f"extracted answer: {last_boxed(answer)!r}; reference: {item['answer']!r}"
        return Grade(7 if ok else 0, score_to_reward(7 if ok else 0, self.threshold), reply=reply)


# ---------------------------------------------------------------------------------------------
# the LLM judge


class Judge(Grader):
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
        super().__init__(require_think=require_think, strip_self_eval=strip_self_eval, threshold=threshold)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.prompt_name = model, prompt
        self.template = load_prompt(prompt)
        self.fields = template_fields(self.template)
        self.answer_judge = "answer" in self.fields
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries
        self.reasoning_effort, self.max_tokens, self.max_tokens_param = reasoning_effort, max_tokens, max_tokens_param
        self.backoff_base, self.backoff_max, self.retry_after_max = backoff_base, backoff_max, retry_after_max
        self.extra_body = dict(extra_body or {})
        self.api_key_env = api_key_env
        key = os.environ.get(api_key_env) if api_key_env else None
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._secrets = [key] if key else []  # redacted from every reply and error text
        self.cache = GradeCache(cache_path) if cache_path else None
        self._loop = self._thread = None
        self._lock = threading.Lock()

    # ---- public API (the rest is Grader's: grade, key, __enter__/__exit__)

    @classmethod
    def fields_for(cls, prompt="rl_proof"):
        return [f for f in template_fields(load_prompt(prompt)) if f != "proof"]

    def required_fields(self):
        return [f for f in self.fields if f != "proof"]

    def settings(self):
        # the prompt's text, not its name: an edited prompt file regrades
        return dict(super().settings(), model=self.model, prompt=self.template, reasoning_effort=self.reasoning_effort,
                    max_tokens=self.max_tokens, max_tokens_param=self.max_tokens_param, extra_body=self.extra_body)

    def check(self, i, item):
        self._job(i, item)

    def submit(self, items, on_grade=None):
        """Start grading `items` (dicts with problem, proof, rubric, reference, answer) and return a
        concurrent.futures.Future of list[Grade] in item order. on_grade(index, grade) is called
        (on the judge's thread) as each grade arrives. Bad items raise ValueError right here."""
        jobs = [self._job(i, item) for i, item in enumerate(items)]
        self._start()
        return asyncio.run_coroutine_threadsafe(self._grade_all(jobs, on_grade), self._loop)

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

    # ---- one item -> a request, a cache key, or an immediate Grade

    def _job(self, i, item):
        if not isinstance(item, dict) or "proof" not in item or "problem" not in item:
            raise common.InputError(f"judge item {i}: needs a dict with 'problem' and 'proof' (got {str(item)[:100]})")
        proof = self.prepare(item)
        if isinstance(proof, Grade):
            return proof
        if self.answer_judge:
            proof = final_answer_excerpt(proof)
        fields = {"problem": item["problem"], "rubric": item.get("rubric"), "reference": item.get("reference"),
                  "answer": None if item.get("answer") is None else str(item["answer"]), "proof": proof}
        for f in self.fields:
            if not isinstance(fields[f], str) or not fields[f].strip():
                raise common.InputError(f"judge item {i}: prompt {self.prompt_name!r} uses {{{f}}} but the item's "
                                 f"{f!r} is empty or missing; give it, or choose a prompt that does not use it")
        content = render_prompt(self.template, {f: fields[f] for f in self.fields})
        parts = [self.model, self.prompt_name, self.reasoning_effort, content]
        if self.extra_body:  # sampling settings change the reply too (absent: the keys of older caches). The
            parts.append(self.extra_body)  # reply budget is left out: a reply it did not cut is reused
        key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
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
            if hit is not None:  # redacted again: a cache written before redaction may hold an echoed key
                return self._grade_from_reply(redact(hit[0], self._secrets), 0.0, cached=True)
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
                try:  # httpx's timeout is per read: a server trickling bytes would never end without wait_for
                    r = await asyncio.wait_for(self._client.post(self.url, json=body, headers=self._headers),
                                               self.timeout)
                except (TimeoutError, httpx.TimeoutException) as e:
                    last = f"timed out after {self.timeout:g}s ({type(e).__name__})"
                except httpx.TransportError as e:
                    last = self._redact(f"could not reach the judge at {self.url} ({type(e).__name__}: {e})")
                else:
                    latency = time.monotonic() - t0
                    text = self._redact(r.text)
                    if r.status_code == 200:
                        try:
                            reply = self._redact(_reply_text(r.json()))
                        except ValueError as e:  # includes json.JSONDecodeError
                            last = f"malformed reply from the judge: {self._redact(str(e))[:300]}"
                        else:
                            if self.cache is not None:
                                self.cache.put(key, self.model, self.prompt_name, reply, latency)
                            return reply, latency
                    elif r.status_code in RETRY_STATUS or r.status_code >= 500:
                        last = f"HTTP {r.status_code}: {text[:300]}"
                        retry_after = common.retry_after_s(r.headers)
                    else:
                        hint = (f" (is the API key in ${self.api_key_env} right?)"
                                if r.status_code in (401, 403) else "")
                        raise JudgeError(f"HTTP {r.status_code} from the judge, not retried{hint}: {text[:500]}")
            if attempt == self.max_retries:
                break
            await asyncio.sleep(common.retry_delay(attempt, self.backoff_base, self.backoff_max, retry_after,
                                                   self.retry_after_max))
        raise JudgeError(f"gave up after {self.max_retries + 1} attempts; last error: {last}")

    def _redact(self, text):
        return redact(text, self._secrets)


# ---------------------------------------------------------------------------------------------
# graders by name, and from a stage's flags

# name -> grader class. Any name not here is a judge prompt (prompts/judge_<name>.txt or a .txt path):
# the Judge with that prompt, so eval.py's --grader imo_proofbench is --grader judge with that prompt.
GRADERS = {"judge": Judge, "answer": AnswerGrader}


def grader_class(name, prompt="rl_proof"):
    """(class, prompt) for a grader name: a GRADERS entry, or a judge prompt name meaning Judge with it."""
    if name in GRADERS:
        return GRADERS[name], prompt
    try:
        load_prompt(name)
    except common.InputError as e:
        raise common.InputError(f"{e}; or a grader of judge.GRADERS: {sorted(GRADERS)}") from None
    return Judge, name


def required_fields(name, prompt="rl_proof"):
    """The item fields grader `name` reads besides the proof (before one is built: eval checks columns)."""
    cls, prompt = grader_class(name, prompt)
    return cls.fields_for(prompt)


def make_grader(name, **settings):
    """The grader `name` names (see GRADERS), built with `settings`: Judge's keyword arguments (base_url,
    model, prompt, cache_path, ...), of which the other graders take require_think, strip_self_eval and
    threshold."""
    cls, settings["prompt"] = grader_class(name, settings.get("prompt") or "rl_proof")
    return cls(**settings)


def from_args(args, name=None, *, cache_path=None):
    """make_grader from a stage's flags: the grader `name` (rl.py: --reward, eval.py: --grader; default
    'judge'), the judge flags --judge-base-url --judge-model --judge-api-key-env --judge-prompt and the
    other --judge-* settings, --allow-no-think, --strip-self-eval / --keep-self-eval, --threshold. A flag
    a stage does not have keeps Judge's default, so this is the only flags-to-grader adapter."""
    def flag(dest, default=None):
        return getattr(args, dest, default)

    temperature = flag("judge_temperature")
    max_tokens = flag("judge_max_tokens", -1)
    threshold = flag("threshold", -1)
    settings = dict(base_url=args.judge_base_url, model=args.judge_model, api_key_env=args.judge_api_key_env,
                    prompt=flag("judge_prompt") or "rl_proof", cache_path=cache_path,
                    reasoning_effort=flag("judge_reasoning_effort") or None,
                    max_tokens=max_tokens if max_tokens and max_tokens > 0 else None,
                    max_tokens_param=flag("judge_max_tokens_param", "max_tokens"),
                    extra_body=None if temperature is None else {"temperature": temperature},
                    threshold=threshold if threshold is not None and threshold >= 0 else None,
                    require_think=not flag("allow_no_think", False),
                    # eval.py cuts the self-evaluation unless --keep-self-eval; rl.py keeps it; judge.py asks
                    strip_self_eval=flag("strip_self_eval", not flag("keep_self_eval", True)))
    for dest, kw in (("judge_concurrency", "concurrency"), ("judge_timeout", "timeout"),
                     ("judge_max_retries", "max_retries"), ("judge_backoff", "backoff_base")):
        if flag(dest) is not None:
            settings[kw] = flag(dest)
    return make_grader(name or "judge", **settings)


# ---------------------------------------------------------------------------------------------
# CLI: grade a JSONL file of proofs, incrementally and resumably


def grades_by_key(records):
    """key -> the grade record to use: a key's last record without an error, else its last record (one
    with an error). Records without a key (written before grades were keyed) are left out."""
    out = {}
    for r in records:
        k = r.get("key")
        if k and (k not in out or r.get("error") is None or out[k].get("error") is not None):
            out[k] = r
    return out


def grade_file(grader, input_path, output_path, *, progress=True):
    """Grade every row of `input_path` whose key (Grader.key: the content graded and the grader's
    settings) has no grade without an error in `output_path`, appending each grade as it arrives; at
    the end the output is rewritten in input order, one line per row. Returns (rows graded now, rows
    with an error)."""
    rows = common.read_jsonl(input_path, torn_tail_ok=False)
    if not rows:
        raise common.InputError(f"--input {input_path} holds no rows; give a JSONL file with one {{\"problem\", "
                                "\"proof\", ...} object per line")
    for i, r in enumerate(rows):  # every row checked before the first request is paid for
        if not isinstance(r, dict):
            raise common.InputError(f"{input_path}: row {i + 1} is a JSON {type(r).__name__}, not an object")
        missing = [k for k in ("problem", "proof") if k not in r]
        if missing:
            raise common.InputError(f"{input_path}: row {i + 1} has no {missing} field(s); each row needs "
                                    "'problem' and 'proof' (and 'rubric'/'reference'/'answer' as the prompt requires)")
        try:  # the fields the prompt needs, named by row (submit numbers items, not rows)
            grader.check(i, r)
        except ValueError as e:
            raise common.InputError(f"{input_path}: row {i + 1}: {e}") from None
    keys = [grader.key(r) for r in rows]
    done = {r["key"] for r in common.read_jsonl(output_path) if r.get("error") is None and r.get("key")}
    todo = [i for i in range(len(rows)) if keys[i] not in done]
    print(f"{input_path}: {len(rows)} rows, {len(rows) - len(todo)} already graded, {len(todo)} to grade", flush=True)

    def record(j, g):
        i = todo[j]
        common.append_jsonl(output_path, {"row": i, "id": rows[i].get("id"), "key": keys[i], **g.to_dict()})

    grades = grader.grade([rows[i] for i in todo], on_grade=record, progress=progress) if todo else []
    by_key = grades_by_key(common.read_jsonl(output_path))
    tmp = output_path + ".tmp"
    with open(tmp, "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps(dict(by_key[keys[i]], row=i, id=r.get("id")), ensure_ascii=False) + "\n")
    os.replace(tmp, output_path)
    return len(grades), sum(g.error is not None for g in grades)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    hidden = dict(default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old spellings, same dest
    # ---- io
    p.add_argument("--input", required=True,
                   help="JSONL with problem, proof (raw completion), rubric, [reference], [id]")
    p.add_argument("--output", required=True, help="JSONL of grades, appended as they arrive; rerun to resume")
    p.add_argument("--cache", default="",
                   help="SQLite cache of judge replies ('' = <output>.cache.sqlite, 'none' = off)")
    # ---- judge
    p.add_argument("--judge-base-url", default="http://localhost:8000/v1",
                   help="OpenAI-compatible base URL (ends in /v1)")
    p.add_argument("--base-url", dest="judge_base_url", **hidden)
    p.add_argument("--judge-model", default="openai/gpt-oss-20b", help="judge model name as the server knows it")
    p.add_argument("--model", dest="judge_model", **hidden)
    p.add_argument("--judge-api-key-env", default="JUDGE_API_KEY", help="environment variable holding the API "
                   "key (unset = no Authorization header, fine for a local vLLM server)")
    p.add_argument("--api-key-env", dest="judge_api_key_env", **hidden)
    p.add_argument("--judge-prompt", default="rl_proof", help="prompts/judge_<name>.txt: rl_proof (the RL reward: "
                   "correctness first, scheme advisory; <score>), proofbench (ProofBench: scheme, alternative "
                   "approaches mapped onto it; <points>), marking_scheme (strict scheme; <score>), imo_proofbench "
                   "(reference + guidelines; <points>), answerbench (answer judge: rows need 'answer'; "
                   "\\boxed{Correct}), or a .txt path")
    p.add_argument("--prompt", dest="judge_prompt", **hidden)
    p.add_argument("--judge-reasoning-effort", default="medium",
                   help="low|medium|high, sent as reasoning_effort ('' = not sent)")
    p.add_argument("--reasoning-effort", dest="judge_reasoning_effort", **hidden)
    p.add_argument("--judge-max-tokens", type=int, default=-1,
                   help="judge reply budget in tokens (-1 = server default)")
    p.add_argument("--max-tokens", dest="judge_max_tokens", type=int, **hidden)
    p.add_argument("--judge-max-tokens-param", default="max_tokens", choices=["max_tokens", "max_completion_tokens"],
                   help="request field for --judge-max-tokens (OpenAI reasoning models want max_completion_tokens)")
    p.add_argument("--max-tokens-param", dest="judge_max_tokens_param", choices=["max_tokens", "max_completion_tokens"],
                   **hidden)
    # ---- reliability
    p.add_argument("--judge-concurrency", type=int, default=64, help="requests in flight at once")
    p.add_argument("--concurrency", dest="judge_concurrency", type=int, **hidden)
    p.add_argument("--judge-timeout", type=float, default=600.0, help="seconds per request, all of it (connect, "
                   "sending, every read of the reply); a timed-out request is retried")
    p.add_argument("--timeout", dest="judge_timeout", type=float, **hidden)
    p.add_argument("--judge-max-retries", type=int, default=6, help="retries on 429/5xx/timeouts/malformed replies")
    p.add_argument("--max-retries", dest="judge_max_retries", type=int, **hidden)
    p.add_argument("--judge-backoff", type=float, default=2.0,
                   help="first retry delay in seconds (doubles, with jitter)")
    p.add_argument("--backoff", dest="judge_backoff", type=float, **hidden)
    # ---- rewards
    p.add_argument("--threshold", type=int, default=-1, help="reward 1 if score >= this else 0 (-1 = score/7)")
    p.add_argument("--allow-no-think", action="store_true", help="grade the whole text when there is no "
                   "</think> (non-thinking models) instead of scoring it 0 as truncated")
    p.add_argument("--strip-self-eval", action="store_true", help="cut a trailing self-evaluation section (a "
                   "'# Evaluation' / '## Self Evaluation' / '## Final Evaluation' heading to the end) before "
                   "grading, as benchmark grading does (eval.py); off = RL rewards, which keep it")
    return p.parse_args(argv)


def main(args):
    if not os.path.isfile(args.input):
        raise common.InputError(f"--input {args.input}: no such file")
    common.writable_path(args.output, "--output")  # before any request is paid for
    cache = None if args.cache == "none" else (args.cache or args.output + ".cache.sqlite")
    judge = from_args(args, "judge", cache_path=cache)
    if not judge._headers:
        print(f"note: ${args.judge_api_key_env} is not set; sending requests without an API key", flush=True)
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
    sys.exit(common.cli(lambda: main(parse_args())))
