"""The reasoning-cache (RC), direct and verify-refine scaffolds over any engine (engines.py), and their CLI.

One proof, three turns of summarize-and-refine, the final proof printed (the recipe's defaults):
    python rc_decode.py --model lm-provers/QED-Nano --problem "Prove that ..." --show-trace
A batch that resumes where it stopped (finished traces are appended one by one):
    python rc_decode.py --model lm-provers/QED-Nano --input problems.jsonl --output traces.jsonl
Other engines and scaffolds:
    python rc_decode.py --engine vllm --model lm-provers/QED-Nano --input p.jsonl --output t.jsonl
    python rc_decode.py --engine openai --base-url http://localhost:8000/v1 --model lm-provers/QED-Nano \
        --api-key-env OPENAI_API_KEY --input p.jsonl --output t.jsonl --scaffold verify-refine
    python rc_decode.py --summarizer-model Qwen/Qwen3-4B-Instruct-2507 --problem "..."   # RL's summarizer
Offline on the tiny random model (CPU, seconds):
    python rc_decode.py --preset tiny --show-trace

Python API (rl.py and eval.py import these; see README; Sampling, Completion and make_engine are engines.py's):
    engine = make_engine("hf", "lm-provers/QED-Nano")            # or "vllm", "openai", "remote"
    traces = run_rc(problems, engine, turns=3, reason_sampling=Sampling(49152), summary_sampling=...)
"""

import argparse
import dataclasses
import json
import os
import re

import torch

import common
import engines
from engines import Completion, Sampling, _reseed, make_engine, num_generated  # noqa: F401 (re-exported)

PROMPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")


# ---------------------------------------------------------------------------------------------
# prompts: text files under prompts/, loaded by name; placeholders are {problem}, {summary}, ...

PLACEHOLDERS = ("problem", "summary", "reasoning", "proof", "reviews")  # what prompts/*.txt may hold


def load_prompt(name):
    """The text of prompts/<name>.txt (re-read on every call, so edits apply without a restart)."""
    path = os.path.join(PROMPT_DIR, name + ".txt")
    if not os.path.exists(path):
        raise ValueError(f"prompt {name!r} not found: expected the file {path}")
    with open(path) as f:
        return f.read().strip()


def fill_prompt(name, **fields):
    """prompts/<name>.txt with each {field} replaced in one pass (text inside a field is never re-read
    as a placeholder, so LaTeX braces in a problem are safe). A template missing a field is an error."""
    return common.fill_template(load_prompt(name), fields, known=PLACEHOLDERS, what=f"prompts/{name}.txt")


def _user(text):
    return [{"role": "user", "content": text}]


def task_text(problem, task_prompt="direct_proof"):
    """The task a model is given for `problem`: prompts/<task_prompt>.txt filled with it ("direct_proof":
    the evaluation and RL proof prompt; "answerbench": reason step by step, answer in \boxed{});
    task_prompt None = the problem text itself."""
    return problem if task_prompt is None else fill_prompt(task_prompt, problem=problem)


def direct_messages(problem, task_prompt="direct_proof"):
    return _user(task_text(problem, task_prompt))


# What the RC reasoning prompt holds in its summary slot before any attempt was summarized: every turn,
# the first included, uses the same prompt (the released eval and RL code do the same).
NO_SUMMARY = "(no previous summary: this is the first attempt)"


def reasoning_messages(problem, summary=None, task_prompt="direct_proof"):
    """The reasoner's prompt for one RC turn: the task text and the previous summary (None on turn 1 and
    for RL's empty state: the same prompt with the NO_SUMMARY marker in the summary slot)."""
    return _user(fill_prompt("rc_reasoning", problem=task_text(problem, task_prompt),
                             summary=NO_SUMMARY if summary is None else summary))


def summary_messages(problem, summary, reasoning):
    """The summarizer's prompt: problem, previous summary (None on turn 1) and the turn's thinking text."""
    return _user(fill_prompt("rc_summary", problem=problem, summary=NO_SUMMARY if summary is None else summary,
                             reasoning=reasoning))


def opened_thinking(c, tokenizer=None):
    """True when completion `c` started inside a <think> block: the chat template's generation prompt
    ended with <think> (Qwen3-4B-Thinking-2507's always does, whatever enable_thinking says) or the
    text opens one itself. Read from what came back, so no flag has to say that a model thinks."""
    if c.text.lstrip().startswith("<think>"):
        return True
    if tokenizer is not None and c.prompt_token_ids:
        # the generation prompt's tail ("<think>" and a newline) lies in the prompt's last few tokens:
        # decoding four reads it without decoding a prompt of thousands
        return tokenizer.decode(c.prompt_token_ids[-4:]).rstrip().endswith("<think>")
    return False


def summary_text(c, tokenizer=None):
    """(summary, error) from a summarizer's completion. A summarizer that thinks gives its summary as the
    text after its last </think>; one that opened <think> and never closed it gave none (an error: its
    reasoning is never kept as the summary); a non-thinking summarizer's whole text is the summary."""
    if c.error:
        return None, c.error
    if "</think>" in c.text:
        text = common.split_thinking(c.text)[1]
    elif opened_thinking(c, tokenizer):
        return None, (f"the summarizer thought for {num_generated(c)} tokens and never closed </think> "
                      f"({c.finish_reason}); no summary")
    else:
        text = c.text.strip()
    return (text, None) if text else (None, "the summarizer returned an empty summary")


def verify_messages(problem, proof):
    return _user(fill_prompt("verify_proof", problem=problem, proof=proof))


def refine_messages(problem, proof, reviews):
    text = "\n\n".join(f"<review {i + 1}>\n{r}\n</review {i + 1}>" for i, r in enumerate(reviews))
    return _user(fill_prompt("refine_proof", problem=problem, proof=proof, reviews=text))


_SOLUTION_HEAD = re.compile(r"^[ \t]*#+[ \t]*\**[ \t]*solution\b.*$", re.IGNORECASE | re.MULTILINE)
_SELF_EVAL_HEAD = re.compile(r"^[ \t]*#+[ \t]*\**[ \t]*self[ \t-]*evaluation\b", re.IGNORECASE | re.MULTILINE)
_SELF_EVAL_ANY = re.compile(r"self[ \t-]*evaluation", re.IGNORECASE)


def extract_proof(answer):
    """The proof of a proof-then-self-evaluation answer (prompts/proof_self_eval.txt): the text after a
    "## Solution" heading and before the "## Self Evaluation" heading (or, without that heading, before
    the first mention of a self evaluation); the whole answer when neither marker is there."""
    start = _SOLUTION_HEAD.search(answer)
    body = answer[start.end():] if start else answer
    end = _SELF_EVAL_HEAD.search(body) or _SELF_EVAL_ANY.search(body)
    return (body[:end.start()] if end else body).strip()


_VERDICT = re.compile(r"\\boxed\{\s*(0|0\.5|1)\s*\}")


def parse_verdict(text):
    """A verification's score: the FIRST \\boxed{0}, \\boxed{0.5} or \\boxed{1} in the text after
    </think> (boxes holding anything else are skipped); None when the verification was cut before
    </think> or holds no such box (both count 0)."""
    _, answer, truncated = common.split_thinking(text)
    if truncated:
        return None
    m = _VERDICT.search(answer)
    return float(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------
# scaffolds: reasoning cache, direct, verify-and-refine. All batched across problems x samples.


def _items(problems, samples):
    # [(problem index, sample index)] problem-major: every scaffold batches all of them in one engine call
    if isinstance(problems, str):
        raise ValueError("problems must be a list of strings, not one string")
    for i, p in enumerate(problems):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"problem {i} is empty or not text ({str(p)[:80]!r})")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    return [(pi, si) for pi in range(len(problems)) for si in range(samples)]


def _turn(messages, c, thinking=True, keep_tokens=False):
    reasoning, answer, truncated = common.split_thinking(c.text) if thinking else ("", c.text.strip(), False)
    t = {"prompt": messages, "reasoning": reasoning, "answer": answer, "completion": c.text,
         "tokens": num_generated(c), "budget": c.max_tokens, "finish_reason": c.finish_reason,
         "truncated": truncated or bool(c.error)}
    if c.error:
        t["error"] = c.error
    if keep_tokens:
        t.update(token_ids=c.token_ids, logprobs=c.logprobs, prompt_token_ids=c.prompt_token_ids)
    return t


def _bar(progress, total, desc):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="seq", disable=not progress, dynamic_ncols=True)


def _finish(trace, turn):
    # total_tokens counts every generated token of the trace (reasoning and summaries): the decoding cost
    trace.update(final_answer=turn["answer"], final_completion=turn["completion"], truncated=turn["truncated"])
    trace["total_tokens"] = sum(t["tokens"] + (t.get("summary_tokens") or 0) for t in trace["turns"])
    return trace


def run_rc(problems, reasoner, *, summarizer=None, turns=3, reason_sampling=None, summary_sampling=None,
           samples=1, progress=True, summary_thinking=True, final_summary=False, keep_tokens=False,
           task_prompt="direct_proof"):
    """Reasoning cache: per turn, reason from (task, summary), then summarize that turn's thinking
    together with the old summary into a new summary that REPLACES it. Only the summary crosses turns;
    the answer is the last turn's text after </think>.

    Every turn uses the same prompt (rc_reasoning: turn 1 holds the NO_SUMMARY marker). The summary is
    read from what came back (summary_text): after the last </think> when the summarizer thought; a
    summarizer that opened <think> and never closed it fails that summary (turn["summary_error"], counted
    in trace["summary_failures"]) and the next turn starts from the last good summary. summary_thinking
    is only the enable_thinking the summarizer's chat template is asked for (a Thinking-2507 template
    thinks regardless). Each turn is one reasoner call and one summarizer call over every (problem,
    sample) still running; an engine error stops only its own trace. No summary follows the last turn
    unless final_summary=True (rl.py's states need it: None, S1, ..., S_turns).
    Returns one trace per (problem, sample), problem-major: dict(problem, problem_index, sample_index,
    scaffold, turns=[{prompt, summary_in, reasoning, answer, completion, summary_out, summary_error,
    tokens, budget, summary_tokens, finish_reason, summary_finish_reason, truncated}], states,
    summary_failures, final_answer, final_completion, truncated, total_tokens[, error]).
    """
    reason_sampling = reason_sampling or Sampling(49152)
    summary_sampling = summary_sampling or reason_sampling
    summarizer = summarizer or reasoner
    items = _items(problems, samples)
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    traces = [{"problem": problems[pi], "problem_index": pi, "sample_index": si, "scaffold": "rc",
               "turns": [], "states": [None], "summary_failures": 0} for pi, si in items]
    summary = [None] * len(items)  # the summary each (problem, sample) carries into its next turn
    active = list(range(len(items)))
    bar = _bar(progress, len(items) * (2 * turns - (0 if final_summary else 1)), "rc")
    # engines seed request i with seed + i; call c of the scaffold (reasoning of turn t: c = 2t, its summary:
    # 2t + 1) shifts the seed by c * 100,003, so no two calls of a batch under 100,003 sequences share a seed
    for t in range(turns):
        msgs = [reasoning_messages(problems[items[k][0]], summary[k], task_prompt) for k in active]
        comps = reasoner.generate(msgs, _reseed(reason_sampling, 2 * t * 100_003), thinking=True,
                                  progress=bar.update)
        for k, m, c in zip(active, msgs, comps):
            turn = _turn(m, c, True, keep_tokens)
            turn.update(turn=t, summary_in=summary[k], summary_out=None, summary_error=None, summary_tokens=0,
                        summary_finish_reason=None)
            traces[k]["turns"].append(turn)
            if c.error:
                traces[k]["error"] = f"turn {t + 1} reasoning: {c.error}"
        active = [k for k in active if "error" not in traces[k]]
        if t == turns - 1 and not final_summary:
            break
        msgs = [summary_messages(problems[items[k][0]], summary[k], traces[k]["turns"][-1]["reasoning"])
                for k in active]
        comps = summarizer.generate(msgs, _reseed(summary_sampling, (2 * t + 1) * 100_003),
                                    thinking=summary_thinking, progress=bar.update)
        for k, c in zip(active, comps):
            turn = traces[k]["turns"][-1]
            text, err = summary_text(c, getattr(summarizer, "tokenizer", None))
            turn.update(summary_out=text, summary_error=err, summary_tokens=num_generated(c),
                        summary_finish_reason=c.finish_reason)
            if c.error:  # the engine failed (a server error after retries): the trace stops, a rerun redoes it
                traces[k]["error"] = f"turn {t + 1} summary: {c.error}"
            elif err:  # no usable summary: counted; the next turn keeps the last good one
                traces[k]["summary_failures"] += 1
            else:
                summary[k] = text  # replaces the old summary
                traces[k]["states"].append(text)
        active = [k for k in active if "error" not in traces[k]]
    bar.close()
    return [_finish(tr, tr["turns"][-1]) for tr in traces]


def run_direct(problems, engine, sampling=None, samples=1, progress=True, keep_tokens=False,
               task_prompt="direct_proof"):
    """One answer per (problem, sample) from prompts/<task_prompt>.txt; same trace shape as run_rc (one turn)."""
    sampling = sampling or Sampling(49152)
    items = _items(problems, samples)
    msgs = [direct_messages(problems[pi], task_prompt) for pi, _ in items]
    bar = _bar(progress, len(items), "direct")
    comps = engine.generate(msgs, sampling, thinking=True, progress=bar.update)
    bar.close()
    traces = []
    for (pi, si), m, c in zip(items, msgs, comps):
        tr = {"problem": problems[pi], "problem_index": pi, "sample_index": si, "scaffold": "direct",
              "turns": [dict(_turn(m, c, True, keep_tokens), turn=0, summary_in=None, summary_out=None)]}
        if c.error:
            tr["error"] = c.error
        traces.append(_finish(tr, tr["turns"][0]))
    return traces


def proof_messages(problem):
    """The verify-and-refine agent's first proofs: the proof, then a self-evaluation section (cut off
    by extract_proof before anything sees the proof)."""
    return _user(fill_prompt("proof_self_eval", problem=problem))


def run_verify_refine(problems, engine, *, proof_sampling=None, verify_sampling=None, refine_sampling=None,
                      n_proofs=4, n_verify=4, rounds=2, n_critiques=2, samples=1, verifier=None, progress=True):
    """Verify-and-refine in the style of DeepSeek-Math-V2, as the released agent runs it.

    Per (problem, sample): a pool of n_proofs proofs written with the proof-then-self-evaluation prompt
    (the proof is cut before its self-evaluation); each proof verified n_verify times, a verification
    scored by its FIRST \\boxed{0|0.5|1} after </think> (none: 0), a proof scored by the mean. Then up
    to `rounds` iterations: stop when some proof's mean reached 1; else refine each of the n_proofs best
    proofs by mean once, giving it its n_critiques lowest-scored verifications; the new proofs are
    verified the same way and join the pool. The answer is the best mean over the whole pool, the
    first on ties. A proof cut at its budget (no </think>) scores 0 without verification.
    turns = every candidate in pool order (round, parent, proof, verifications, score);
    final_answer/final_completion = the best candidate's proof and raw completion."""
    proof_sampling = proof_sampling or Sampling(49152)
    verify_sampling = verify_sampling or proof_sampling
    refine_sampling = refine_sampling or proof_sampling
    verifier = verifier or engine
    items = _items(problems, samples)
    traces = [{"problem": problems[pi], "problem_index": pi, "sample_index": si, "scaffold": "verify-refine",
               "turns": []} for pi, si in items]
    bar = _bar(progress, len(items) * n_proofs * (1 + n_verify) * (1 + rounds), "verify-refine")
    calls = [0]

    def add(jobs, rnd, sampling):  # jobs: [(trace k, messages, parent index)] -> new candidates, verified
        comps = engine.generate([m for _, m, _ in jobs], _reseed(sampling, calls[0] * 100_003),
                                thinking=True, progress=bar.update)
        calls[0] += 1
        new = []
        for (k, m, parent), c in zip(jobs, comps):
            cand = dict(_turn(m, c, True), turn=len(traces[k]["turns"]), round=rnd, parent=parent,
                        verifications=[], score=0.0)
            cand["proof"] = extract_proof(cand["answer"])
            traces[k]["turns"].append(cand)
            new.append((k, cand))
        # n_verify copies of each untruncated candidate's verification prompt in one call (seeds differ per
        # request); a truncated candidate is scored 0 unverified, and its share of the bar is ticked now
        vjobs = [(cand, verify_messages(problems[items[k][0]], cand["proof"])) for k, cand in new
                 if not cand["truncated"]] * n_verify
        bar.update(len(new) * n_verify - len(vjobs))
        comps = verifier.generate([m for _, m in vjobs], _reseed(verify_sampling, calls[0] * 100_003),
                                  thinking=True, progress=bar.update)
        calls[0] += 1
        for (cand, _), c in zip(vjobs, comps):
            cand["verifications"].append({"verdict": parse_verdict(c.text), "analysis": common.split_thinking(c.text)[1],
                                          "completion": c.text, "tokens": num_generated(c),
                                          "finish_reason": c.finish_reason, "error": c.error})
        for _, cand in new:
            vs = [v["verdict"] or 0.0 for v in cand["verifications"]]
            cand["score"] = sum(vs) / len(vs) if vs else 0.0

    def ranked(k):  # pool indices by mean score, best first; ties: the earlier candidate first
        cands = traces[k]["turns"]
        return sorted(range(len(cands)), key=lambda j: (-cands[j]["score"], j))

    add([(k, proof_messages(problems[pi]), None) for k, (pi, _) in enumerate(items) for _ in range(n_proofs)], 0,
        proof_sampling)
    for rnd in range(1, rounds + 1):
        jobs = []
        for k, (pi, _) in enumerate(items):
            cands = traces[k]["turns"]
            if cands[ranked(k)[0]]["score"] >= 1.0:
                continue  # a proof every verification accepted: done
            for j in ranked(k)[:n_proofs]:
                # the harshest reviews say what to fix; the pool keeps growing, only the best n_proofs refine
                crit = sorted(cands[j]["verifications"], key=lambda v: v["verdict"] or 0.0)[:n_critiques]
                reviews = [v["analysis"] or v["completion"] for v in crit]
                jobs.append((k, refine_messages(problems[pi], cands[j]["proof"], reviews), j))
        if not jobs:
            break
        add(jobs, rnd, refine_sampling)
    bar.close()
    for k, tr in enumerate(traces):
        b = ranked(k)[0]
        tr["best_turn"], tr["best_score"] = b, tr["turns"][b]["score"]
        if all(c.get("error") for c in tr["turns"]):
            tr["error"] = tr["turns"][0]["error"]
        _finish(tr, tr["turns"][b])
        # graders read the text after </think>: the best proof alone, its self-evaluation cut (as released)
        c = tr["final_completion"]
        if not tr["truncated"]:
            tr["final_completion"] = c[:c.rfind(common.THINK_END) + len(common.THINK_END)] + "\n\n" + tr["turns"][b]["proof"]
        tr["final_answer"] = tr["turns"][b]["proof"]
    return traces


# ---------------------------------------------------------------------------------------------
# CLI

TINY_PRESET = dict(engine="hf", device="cpu", dtype="float32", turns=2, reason_tokens=48, summary_tokens=24,
                   verify_tokens=24, n_proofs=2, n_verify=2, refine_rounds=1, n_critiques=1, max_batch_size=16)
TINY_PROBLEM = "Compute 2 + 3. Put the final answer in \\boxed{}."


def build_parser():
    p = argparse.ArgumentParser(description="Reasoning-cache / direct / verify-refine decoding with hf, vllm or "
                                            "an OpenAI-compatible server.")
    p.add_argument("--preset", choices=["tiny"], default=None,
                   help="tiny: the offline random tiny Qwen3 on CPU with small budgets (explicit flags still win)")
    # ---- model and engine
    p.add_argument("--model", default="lm-provers/QED-Nano",
                   help="hub id or local folder (hf, vllm); the served model name (openai)")
    p.add_argument("--tokenizer", default=None, help="tokenizer hub id/folder (default: --model)")
    p.add_argument("--engine", default="auto", choices=["auto", *engines.kinds()],
                   help="auto = vllm when it is installed and a GPU is present, else hf")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="hf engine device")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="weights dtype (hf, vllm)")
    p.add_argument("--hf-impl", default="auto", choices=["auto", "static", "dynamic"],
                   help="hf decode loop: static KV cache (+CUDA graphs on GPU) or HF's DynamicCache")
    p.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"],
                   help="hf static loop: capture decode steps as CUDA graphs (auto = on when on a GPU)")
    p.add_argument("--max-batch-size", type=int, default=64, help="hf: rows per micro-batch")
    p.add_argument("--max-model-len", type=int, default=None, help="vllm: context length in tokens (default: model's)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm: fraction of GPU memory to use")
    p.add_argument("--base-url", default="http://localhost:8000/v1", help="openai: server URL up to /v1")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="openai: NAME of the env variable holding the key")
    p.add_argument("--concurrency", type=int, default=32, help="openai: requests in flight")
    p.add_argument("--timeout", type=float, default=3600.0, help="openai: seconds per request")
    p.add_argument("--max-retries", type=int, default=6, help="openai: retries per request (429/5xx/timeouts)")
    p.add_argument("--no-template-kwargs", action="store_true",
                   help="openai: do not send chat_template_kwargs.enable_thinking (for hosted APIs that reject it)")
    # ---- summarizer (rc)
    p.add_argument("--summarizer-model", default=None,
                   help="default: the reasoner summarizes itself (test time); RL used Qwen/Qwen3-4B-Instruct-2507")
    p.add_argument("--summarizer-engine", default=None, choices=["hf", "vllm", "openai"], help="default: --engine")
    p.add_argument("--summarizer-base-url", default=None, help="openai summarizer URL (default: --base-url)")
    # ---- scaffold, budgets (tokens) and sampling: the flags run_scaffold reads, shared with eval.py
    p.add_argument("--scaffold", default="rc", choices=["rc", "direct", "verify-refine"], help="decoding scaffold")
    p.add_argument("--task-prompt", default="direct_proof",
                   help="prompts/<name>.txt that turns a problem into the task (direct_proof; answerbench)")
    add_scaffold_flags(p)
    p.add_argument("--samples", type=int, default=1, help="independent traces per problem")
    p.add_argument("--seed", type=int, default=0, help="base seed (-1 = nondeterministic)")
    # ---- input / output
    p.add_argument("--problem", default=None, help="one problem's text (prints the final proof)")
    p.add_argument("--input", default=None, help="JSONL of problems (one object per line)")
    p.add_argument("--problem-key", default=None, help="problem column (default: problem, Problem or question)")
    p.add_argument("--id-key", default=None, help="id column (default: id, Problem ID or problem_id; else line number)")
    p.add_argument("--output", default=None, help="JSONL of traces, appended as they finish; rerun to resume")
    p.add_argument("--batch-size", type=int, default=1024,
                   help="sequences (problems x samples) sent to the engine at once; traces are written after each")
    p.add_argument("--show-trace", action="store_true", help="print every turn, summary and verification")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = common.parse_with_preset(parser, argv, {"tiny": dict(model=common.TINY_MODEL_DIR, **TINY_PRESET)})
    if args.preset == "tiny" and args.problem is None and args.input is None:
        args.problem = TINY_PROBLEM
    if (args.problem is None) == (args.input is None):
        parser.error("give exactly one of --problem TEXT or --input problems.jsonl")
    if args.problem is not None and not args.problem.strip():
        parser.error("--problem is empty")
    resolve_scaffold_flags(args)
    for flag in ("samples", "batch_size", "max_batch_size", "concurrency"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.engine == "auto":
        import importlib.util
        args.engine = "vllm" if importlib.util.find_spec("vllm") and torch.cuda.is_available() else "hf"
    return args


def read_problems(path, problem_key=None, id_key=None):
    """[(id, problem text)] from a JSONL file; a bad line is an error naming the line and the fix."""
    if not os.path.exists(path):
        raise common.InputError(f"--input {path!r} does not exist")
    out, seen = [], set()
    lines = common.read_utf8(path, f"--input {path}").split("\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise common.InputError(f"{path}: line {n} is not valid JSON ({e.msg} at column {e.colno}); fix or "
                                    "delete that line") from None
        if not isinstance(row, dict):
            raise common.InputError(f"{path}: line {n} is not a JSON object")
        pk = problem_key or next((k for k in ("problem", "Problem", "question") if k in row), None)
        if pk not in row:
            raise common.InputError(f"{path}: line {n} has no problem column (keys: {sorted(row)}); pass --problem-key")
        if not isinstance(row[pk], str) or not row[pk].strip():
            raise common.InputError(f"{path}: line {n}: empty problem text in column {pk!r}")
        ik = id_key or next((k for k in ("id", "Problem ID", "problem_id") if k in row), None)
        if id_key and id_key not in row:
            raise common.InputError(f"{path}: line {n} has no id column {id_key!r}")
        pid = str(row[ik]) if ik else f"line-{n}"
        if pid in seen:
            raise common.InputError(f"{path}: line {n}: duplicate id {pid!r}; ids must be unique for resume")
        seen.add(pid)
        out.append((pid, row[pk]))
    if not out:
        raise common.InputError(f"--input {path} holds no problems; give a JSONL file with one "
                                "{\"problem\": ...} object per line")
    return out


# ---------------------------------------------------------------------------------------------
# flags -> scaffold: the one adapter (rc_decode's CLI and eval.py both call run_scaffold), its flags added
# to both parsers by add_scaffold_flags so that one concept has one flag and one dest in both stages

# New tokens per call in the released run scripts (eval/configs/models/workflows/vllm_agent.yaml,
# max_tokens 229376): direct proofs, every RC turn and summary, every verify-refine call.
DEFAULT_REASON_TOKENS = 229376
# A flag at -1 takes the value of the flag it names: summaries and verifications sample like the reasoning
SAME_AS = {"summary_tokens": "reason_tokens", "verify_tokens": "reason_tokens", "summary_temperature": "temperature",
           "summary_top_p": "top_p", "summary_top_k": "top_k"}
# The spellings of before (eval.py's and rc_decode.py's), still parsed, hidden from --help: old flag -> dest
OLD_FLAGS = {"--max-tokens": "reason_tokens", "--reason-budget": "reason_tokens", "--summary-budget": "summary_tokens",
             "--verify-budget": "verify_tokens", "--rounds": "refine_rounds"}
# The dests of before: an args dict a run recorded then (eval's args.json, rc_decode's traces) under today's names
OLD_DESTS = {"max_tokens": "reason_tokens", "reason_budget": "reason_tokens", "summary_budget": "summary_tokens",
             "verify_budget": "verify_tokens", "rounds": "refine_rounds"}


def add_scaffold_flags(p):
    """Add the flags run_scaffold reads to parser `p` (each stage adds --scaffold, --task-prompt and --seed
    itself: their defaults and meaning differ). Defaults are the released eval's."""
    p.add_argument("--temperature", type=float, default=0.8,
                   help="reasoner temperature (0 = greedy; the released eval's 0.8; the model card's 0.6)")
    p.add_argument("--top-p", type=float, default=1.0, help="reasoner nucleus (1 = off; the model card's 0.95)")
    p.add_argument("--top-k", type=int, default=0, help="reasoner top-k (0 = off)")
    p.add_argument("--reason-tokens", type=int, default=DEFAULT_REASON_TOKENS,
                   help="max new tokens per call: a direct proof, each rc reasoning turn, each verify-refine "
                        "proof/refinement (-1 = 229376, the released eval's budget for every call); a cap, "
                        "clamped per request to what the model's context leaves after the prompt")
    p.add_argument("--turns", type=int, default=3, help="rc: reasoning turns")
    p.add_argument("--summary-tokens", type=int, default=-1,
                   help="rc: max new tokens per summary (-1 = --reason-tokens, the released eval; RL's "
                        "instruct summarizer used 2048)")
    p.add_argument("--summary-temperature", type=float, default=-1,
                   help="rc: summarizer temperature (-1 = --temperature: the model summarizes itself, as at eval; "
                        "RL's instruct summarizer used 0.7)")
    p.add_argument("--summary-top-p", type=float, default=-1, help="rc: summarizer nucleus (-1 = --top-p; RL: 0.8)")
    p.add_argument("--summary-top-k", type=int, default=-1, help="rc: summarizer top-k (-1 = --top-k; RL: 20)")
    p.add_argument("--summary-thinking", action=argparse.BooleanOptionalAction, default=True,
                   help="rc: ask the summarizer's chat template for thinking (enable_thinking); the summary is read "
                        "from what comes back either way (the text after </think> when it thought)")
    p.add_argument("--final-summary", action="store_true",
                   help="rc: also summarize the last turn (only RL's states need it; off in the released eval)")
    p.add_argument("--n-proofs", type=int, default=4, help="verify-refine: proofs in the pool, and proofs refined "
                   "per round")
    p.add_argument("--n-verify", type=int, default=4, help="verify-refine: verifications per proof")
    p.add_argument("--refine-rounds", type=int, default=2, help="verify-refine: refinement rounds (0 = none)")
    p.add_argument("--n-critiques", type=int, default=2, help="verify-refine: lowest-scored reviews used to refine")
    p.add_argument("--verify-tokens", type=int, default=-1,
                   help="verify-refine: max new tokens per verification (-1 = --reason-tokens, as the released agent)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    hidden = dict(default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old spellings, same dest
    for old, dest in OLD_FLAGS.items():
        p.add_argument(old, dest=dest, type=int, **hidden)


def resolve_scaffold_flags(args):
    """Resolve the -1 sentinels of add_scaffold_flags' flags in place (so the args a run records, and a resume
    compares, hold the values really used); a count below 1 is an InputError naming the flag."""
    if args.reason_tokens < 0:
        args.reason_tokens = DEFAULT_REASON_TOKENS
    for dest, same in SAME_AS.items():
        if getattr(args, dest) < 0:
            setattr(args, dest, getattr(args, same))
    for dest in ("turns", "reason_tokens", "summary_tokens", "verify_tokens", "n_proofs", "n_verify"):
        if getattr(args, dest) < 1:
            raise common.InputError(f"--{dest.replace('_', '-')} must be >= 1, got {getattr(args, dest)}")


def renamed_dests(old):
    """An args dict recorded before the one flag vocabulary, with OLD_DESTS' keys under today's names."""
    return {OLD_DESTS.get(k, k): v for k, v in old.items()}


def run_scaffold(args, problems, reasoner, summarizer=None, *, seed=None):
    """Traces for `problems` (a list of texts, one sample each) with the scaffold and the add_scaffold_flags
    settings in `args`. seed: request i of every call is seeded seed + i (None = unseeded); the summaries and
    verifications take the same seed, as run_rc and run_verify_refine shift each call's seeds apart. Each
    stage picks the seed: rc_decode's --seed, eval.py one per chunk (its resume and avg@n need that)."""
    reason = Sampling(args.reason_tokens, args.temperature, args.top_p, args.top_k, seed)
    progress = not args.no_progress
    if args.scaffold == "rc":
        summ = Sampling(args.summary_tokens, args.summary_temperature, args.summary_top_p, args.summary_top_k, seed)
        return run_rc(problems, reasoner, summarizer=summarizer, turns=args.turns, reason_sampling=reason,
                      summary_sampling=summ, progress=progress, summary_thinking=args.summary_thinking,
                      final_summary=args.final_summary, task_prompt=args.task_prompt)
    if args.scaffold == "direct":
        return run_direct(problems, reasoner, reason, progress=progress, task_prompt=args.task_prompt)
    verify = dataclasses.replace(reason, max_tokens=args.verify_tokens)
    return run_verify_refine(problems, reasoner, proof_sampling=reason, verify_sampling=verify,
                             n_proofs=args.n_proofs, n_verify=args.n_verify, rounds=args.refine_rounds,
                             n_critiques=args.n_critiques, progress=progress)


def print_trace(tr):
    print(f"\n######## {tr.get('id', '')} sample {tr['sample_index']} ({tr['scaffold']}, "
          f"{tr['total_tokens']} tokens)")
    for t in tr["turns"]:
        head = f"==== turn {t['turn'] + 1}" + (f" (round {t['round']}, score {t['score']:.2f})" if "round" in t else "")
        print(f"{head}: {t['tokens']} tokens, {t['finish_reason']}")
        if t.get("summary_in"):
            print(f"---- summary in:\n{t['summary_in']}")
        print(f"---- reasoning:\n{t['reasoning']}\n---- answer:\n{t['answer'] or '(none: cut at the budget)'}")
        for j, v in enumerate(t.get("verifications", [])):
            print(f"---- verification {j + 1}: verdict {v['verdict']}\n{v['analysis']}")
        if t.get("summary_out") is not None:
            print(f"---- summary out ({t['summary_tokens']} tokens, {t['summary_finish_reason']}):\n{t['summary_out']}")
        elif t.get("summary_error"):
            print(f"---- summary failed ({t['summary_tokens']} tokens): {t['summary_error']}")


def _drop_torn_tail(path):
    """Cut a last line left half-written by a kill, so that new records start on a line of their own."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            common.print0(f"{path}: dropped a torn last line (an interrupted write); it will be redone")


# Flags that do not change what a trace holds: a rerun into the same --output may change them freely.
RESUME_FREE = {"input", "output", "problem", "show_trace", "no_progress", "batch_size", "max_batch_size",
               "concurrency", "timeout", "max_retries", "preset", "device", "cuda_graphs", "hf_impl"}


def check_same_run(path, args):
    """Refuse to append to `path` traces made with other settings (model, sampling, scaffold, budgets, ...):
    the first trace in it records the arguments that made it. Raises InputError naming each differing flag."""
    for r in common.read_jsonl(path):
        old = r.get("args") or {}
        if "reason_budget" in old and old.get("scaffold") == "rc":
            raise common.InputError(f"--output {path} holds rc traces made before the summaries were seeded as "
                                    "eval.py seeds them (--seed, no longer --seed + 1); a resume would mix the two "
                                    "schemes: write to another --output")
        old = renamed_dests(old)  # --reason-budget and the other old spellings: today's dests
        new = vars(args)
        diff = [f"--{k.replace('_', '-')} {old[k]!r} -> {new.get(k)!r}" for k in sorted(old)
                if k not in RESUME_FREE and old[k] != new.get(k)]
        if diff:
            raise common.InputError(f"--output {path} holds traces made with other settings ({'; '.join(diff)}); "
                                    "rerun with those flags to continue it, or write to another --output")
        return


def main(args):
    if args.problem is not None:
        problems = [("problem", args.problem)]
    else:
        problems = read_problems(args.input, args.problem_key, args.id_key)
    order = {pid: n for n, (pid, _) in enumerate(problems)}
    done = set()
    err_path = None
    if args.output:
        err_path = os.path.splitext(args.output)[0] + ".errors.jsonl"
        common.writable_path(args.output, "--output")  # before any model loads or generates
        _drop_torn_tail(args.output)
        check_same_run(args.output, args)
        done = {(r["id"], r["sample_index"]) for r in common.read_jsonl(args.output) if "id" in r}
    todo = [(pid, text, s) for pid, text in problems for s in range(args.samples) if (pid, s) not in done]
    common.print0(f"{len(problems)} problems x {args.samples} samples: {len(done)} done, {len(todo)} to run "
                  f"| scaffold {args.scaffold} | engine {args.engine} | model {args.model}")
    if not todo:
        return []
    if args.model == common.TINY_MODEL_DIR:
        common.make_tiny_model()
    reasoner = engines.from_args(args)
    summarizer = reasoner
    s_kind = args.summarizer_engine or args.engine
    if args.scaffold == "rc" and (args.summarizer_model not in (None, args.model) or s_kind != args.engine):
        summarizer = engines.from_args(args, args.summarizer_model or args.model, s_kind, args.summarizer_base_url)
    results, n_err = [], 0
    for b in range(0, len(todo), args.batch_size):
        chunk = todo[b:b + args.batch_size]
        # request seeds follow each job's place in the whole run (problem-major), not in this batch: two
        # batches never share seeds (a problem's samples in two batches were identical), and a resumed run
        # seeds the jobs left as the uninterrupted run did
        first = order[chunk[0][0]] * args.samples + chunk[0][2]
        traces = run_scaffold(args, [text for _, text, _ in chunk], reasoner, summarizer,
                              seed=None if args.seed < 0 else args.seed + first)
        for (pid, _, s), tr in zip(chunk, traces):
            tr.update(id=pid, sample_index=s, problem_index=order[pid])
            if args.output:
                tr["args"] = vars(args)
                common.append_jsonl(err_path if "error" in tr else args.output, tr)
            n_err += "error" in tr
            results.append(tr)
    for tr in results:
        if args.show_trace:
            print_trace(tr)
        if args.problem is not None:
            print(f"\n==== final proof (sample {tr['sample_index']}):\n"
                  + (tr["final_answer"] or "(no final answer: the last turn was cut at the token budget)"))
    if n_err:
        common.print0(f"{n_err} traces failed (see {err_path or 'the error fields'}); rerun the same command to retry")
    if args.output:
        common.print0(f"wrote {len(results) - n_err} traces to {args.output}")
    return results


if __name__ == "__main__":
    common.exit_on_signals()  # finished traces are already on disk (fsync'd per batch)
    common.cli(lambda: main(parse_args()))
