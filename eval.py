"""Evaluate a model on IMO-ProofBench, ProofBench or IMO-AnswerBench: generate with rc_decode
(direct, the reasoning cache, or verify-and-refine), grade with judge.py, and print the paper's
table: score in percent as avg@n with the sample std of the n run means in parentheses, plus breakdowns.

    python eval.py --model lm-provers/QED-Nano --benchmark imo-proofbench --n 3
    python eval.py --model lm-provers/QED-Nano --benchmark proofbench --n 3 --scaffold direct
    python eval.py --model lm-provers/QED-Nano --benchmark imo-answerbench --n 3
    python eval.py --model ./ckpt --benchmark mine.jsonl --columns "problem=Question,rubric=Scheme" --grader marking_scheme
    python eval.py --model lm-provers/QED-Nano --benchmark imo-proofbench --temperature 0.6 --top-p 0.95  # model card
    python eval.py --preset tiny      # offline on CPU: tiny Qwen3, data/tiny_eval.jsonl, math-verify grader

The defaults are the released eval's (github CMU-AIRe/QED-Nano, eval/): temperature 0.8, top_p 1, no
top-k, up to 229,376 new tokens per call (a cap: the hf/vllm engines clamp it to what the context
leaves after the prompt); rc summaries by the model itself, thinking, with the same sampling and
budget, none after the last turn; the self-evaluation section is cut before grading; avg@n's std is
the sample std (ddof=1) of the run means. Every benchmark is judge-graded (IMO-AnswerBench too: an
LLM compares the last \\boxed{} with the gold answer; --grader answer = math-verify, offline); the
default judge is Gemini 3 Pro through its OpenAI-compatible endpoint, key in $JUDGE_API_KEY; any
`vllm serve` judge works with --judge-base-url/--judge-model. Everything goes to
--output-dir, line by line as it is produced: generations.jsonl, grades.jsonl (with the judge's full
reply), summary.json, report.md, scores.png, args.json, judge_cache.sqlite. Rerunning the same
command resumes: finished samples are not regenerated and graded ones are not re-graded (a grade
that failed after retries is retried). A larger --n adds samples to the same directory.
"""

import argparse
import json
import math
import os
import re
import sys
import threading
import time

import common
import engines as engine_lib
import judge as judge_lib
import rc_decode
import viewer

HERE = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------------------------------------
# benchmarks: where they live, how they are graded, and which column holds each field.
# Each field lists candidate column names, the first present wins, --columns field=Column overrides.
# The hub datasets' real columns come first (shared/RECIPE.md, "Evaluation"): IMO-ProofBench has
# question_id (PB-Basic-001: the basic/advanced set is only in the id), problem, solution,
# grading_guidelines, category, level, source, answer; ProofBench problem_id, problem, solution,
# grading_scheme; IMO-AnswerBench problem, answer. The rest are other layouts' names (Google's
# original IMO-Bench files: "Problem ID", "Problem", "Short Answer", ...; data/tiny_eval.jsonl).

CANDIDATES = {
    "id": ["question_id", "problem_id", "Problem ID", "id", "problem_idx", "uid"],
    "problem": ["problem", "Problem", "question", "statement"],
    "answer": ["answer", "Short Answer", "short_answer", "final_answer"],
    "rubric": ["grading_guidelines", "grading_scheme", "Grading guidelines", "marking_scheme", "Marking scheme",
               "rubric", "rubrics", "guidelines"],
    "reference": ["solution", "Solution", "reference_solution", "reference", "proof"],
    "set": ["set", "subset", "Set", "split"],
    "level": ["level", "Level", "difficulty"],
    "category": ["category", "Category", "competition"],
    "subcategory": ["subcategory", "Subcategory"],
}
# task_prompt: the prompts/<name>.txt that turns a problem into the model's task (the released run
# scripts: the proof prompt for the proof benchmarks, "reason step by step, \boxed{}" for answers).
BENCHMARKS = {
    # 60 problems; "set" (basic/advanced) comes from a column or else from the id (PB-Basic-001)
    "imo-proofbench": dict(source="lm-provers/IMOProofBench", grader="imo_proofbench", task_prompt="direct_proof",
                           fields=["id", "problem", "reference", "rubric", "set", "level", "category"],
                           breakdowns=["set", "category"]),
    # 145 problems with expert marking schemes; the judge gets the scheme, no reference, and credits a
    # different valid approach mapped onto the scheme's checkpoints
    "proofbench": dict(source="lm-provers/ProofBench", grader="proofbench", task_prompt="direct_proof",
                       fields=["id", "problem", "rubric", "category"], breakdowns=["category"]),
    # 400 short-answer problems: an LLM judge compares the last \boxed{} with the gold answer
    # (--grader answer: math-verify, offline)
    "imo-answerbench": dict(source="lm-provers/IMOBench-FinalAnswer", grader="answerbench", task_prompt="answerbench",
                            fields=["id", "problem", "answer", "category", "subcategory"], breakdowns=["category"]),
}
TINY_DATA = os.path.join(HERE, "data", "tiny_eval.jsonl")


# ---------------------------------------------------------------------------------------------
# CLI

TINY = dict(model=common.TINY_MODEL_DIR, benchmark=TINY_DATA, grader="answer", engine="hf", device="cpu", dtype="float32",
            scaffold="direct", n=2, limit=-1, reason_tokens=20, turns=2, summary_tokens=16, verify_tokens=16,
            n_proofs=2, n_verify=1, refine_rounds=1, chunk_size=64, out_dir=os.path.join("runs", "eval-tiny"))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="", choices=["", "tiny"], help="tiny = offline CPU run (flags you pass win)")
    # ---- model and engine
    p.add_argument("--model", default="lm-provers/QED-Nano", help="hub id or folder (openai engine: served name)")
    p.add_argument("--tokenizer", default=None, help="tokenizer hub id or folder, when not --model's own")
    p.add_argument("--engine", default="vllm", choices=engine_lib.kinds(), help="generation engine (engines.py)")
    p.add_argument("--device", default="auto", help="hf engine: auto|cpu|cuda")
    p.add_argument("--dtype", default="bfloat16", help="hf/vllm weights dtype")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per model")
    p.add_argument("--max-model-len", type=int, default=-1, help="vllm: context length (-1 = the model's)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm: fraction of GPU memory")
    p.add_argument("--base-url", default="http://localhost:8000/v1", help="openai engine: server URL")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="openai engine: env var with the key")
    # ---- scaffold and sampling
    p.add_argument("--scaffold", default="rc", choices=["rc", "direct", "verify-refine"],
                   help="rc = reasoning cache (the paper's QED-Nano eval), direct = one proof, verify-refine = "
                        "DeepSeek-Math-V2-style self-verification")
    p.add_argument("--n", type=int, default=3, help="samples per problem = independent runs for avg@n")
    # --temperature 0.8 --top-p 1 --top-k 0 --reason-tokens 229376 (the released run scripts' sampling; the model
    # card's is --temperature 0.6 --top-p 0.95), rc and verify-refine flags: rc_decode's, one vocabulary
    rc_decode.add_scaffold_flags(p)
    p.add_argument("--summarizer-model", default="", help="rc: separate summarizer ('' = the model itself, as the "
                   "released eval); set --summary-tokens/--summary-temperature/--summary-top-p for it")
    p.add_argument("--task-prompt", default="", help="prompts/<name>.txt that turns a problem into the model's "
                   "task ('' = the benchmark's own: answerbench for IMO-AnswerBench and answer-graded files, "
                   "direct_proof otherwise); direct and rc scaffolds")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (-1 = unseeded)")
    p.add_argument("--chunk-size", type=int, default=64, help="completions per generate call (saved after each)")
    # ---- benchmark
    p.add_argument("--benchmark", default="imo-proofbench", help=f"{list(BENCHMARKS)} or a local .jsonl/.json/.parquet")
    p.add_argument("--columns", default="", help="field=Column pairs overriding the column guesses, e.g. "
                   "\"problem=Problem,answer=Short Answer\"; fields: " + ", ".join(CANDIDATES))
    p.add_argument("--split", default="train", help="dataset split")
    p.add_argument("--config", default="", help="dataset config ('' = default)")
    p.add_argument("--limit", type=int, default=-1, help="first N problems only (-1 = all)")
    p.add_argument("--grader", default="", help="a grader of judge.GRADERS (answer = math-verify, offline; judge = "
                   "the LLM judge with rl_proof) or a judge prompt, meaning the LLM judge with it: answerbench (LLM "
                   "answer judge) | imo_proofbench | proofbench | marking_scheme | rl_proof | a prompt .txt ('' = "
                   "the benchmark's own: imo_proofbench, proofbench, answerbench)")
    p.add_argument("--judge-prompt", dest="grader", default=argparse.SUPPRESS, help="the same setting as --grader, "
                   "by the name judge.py and rl.py give the judge's prompt")
    p.add_argument("--allow-no-think", action="store_true", help="grade the whole text of completions that "
                   "have no </think> (non-thinking models) instead of scoring them 0 as truncated")
    p.add_argument("--keep-self-eval", action="store_true", help="grade the answer with its trailing self-evaluation "
                   "section (default: cut from a '#' heading reading Evaluation / Self Evaluation / Final Evaluation "
                   "to the end, as the released eval; RL rewards keep it)")
    # ---- judge (proof benchmarks)
    p.add_argument("--judge-base-url", default="https://generativelanguage.googleapis.com/v1beta/openai",
                   help="OpenAI-compatible judge endpoint (default: Gemini's)")
    p.add_argument("--judge-model", default="gemini-3-pro-preview", help="judge model (paper: Gemini 3 Pro)")
    p.add_argument("--judge-api-key-env", default="JUDGE_API_KEY", help="env var holding the judge's API key")
    p.add_argument("--judge-reasoning-effort", default="", help="low|medium|high ('' = not sent)")
    p.add_argument("--judge-max-tokens", type=int, default=-1, help="judge reply budget (-1 = server default)")
    p.add_argument("--judge-concurrency", type=int, default=16, help="judge requests in flight")
    p.add_argument("--judge-timeout", type=float, default=900.0, help="seconds per judge request")
    p.add_argument("--judge-max-retries", type=int, default=6, help="retries on 429/5xx/timeouts")
    p.add_argument("--judge-backoff", type=float, default=2.0, help="first retry delay in seconds (doubles, jitter)")
    # ---- output
    p.add_argument("--output-dir", "--out-dir", dest="out_dir", default="",
                   help="results folder ('' = runs/eval/<model>-<benchmark>-<scaffold>); --out-dir is its old name")
    p.add_argument("--view", default="", metavar="RUN_DIR", help="only (re)write RUN_DIR/report.html, the trace "
                   "viewer, from the files an eval.py run wrote there (no model, no judge)")
    p.add_argument("--compare", nargs="+", default=[], metavar="DIR", help="compare finished eval folders of one "
                   "benchmark: compare.md (avg@n (std) per folder and subset, per-problem deltas vs the first), "
                   "compare.png and report.html with the folders side by side, into --output-dir "
                   "('' = runs/compare-<names>)")
    return p



# ---------------------------------------------------------------------------------------------
# benchmark loading


def parse_columns(spec):
    """'problem=Problem,answer=Short Answer' -> {'problem': 'Problem', 'answer': 'Short Answer'}."""
    out = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        field, eq, col = part.partition("=")
        field, col = field.strip(), col.strip().strip("'\"")
        if not eq or not col or field not in CANDIDATES:
            raise common.InputError(f"--columns: cannot read {part!r}; write field=Column with field in "
                             f"{list(CANDIDATES)}, e.g. --columns \"problem=Problem,answer=Short Answer\"")
        out[field] = col
    return out


def resolve_columns(names, fields, explicit, required, source):
    """field -> column of the dataset, from --columns or the candidate names; a clear error for a
    required field that has no column."""
    mapping = {}
    for f in fields:
        if f in explicit:
            if explicit[f] not in names:
                raise common.InputError(f"{source}: --columns maps {f}={explicit[f]!r} but there is no such column; "
                                 f"columns are {names}")
            mapping[f] = explicit[f]
        else:
            hit = next((c for c in CANDIDATES[f] if c in names), None)
            if hit is not None:
                mapping[f] = hit
    missing = [f for f in required if f not in mapping]
    if missing:
        raise common.InputError(f"{source}: no column for {missing} (looked for {[CANDIDATES[f] for f in missing]}); "
                         f"the data has columns {names}. Name them with --columns, e.g. --columns \""
                         + ",".join(f"{f}=<column>" for f in missing) + '"')
    return mapping


def load_benchmark(benchmark, *, columns="", grader="", split="train", config=None, limit=-1):
    """(problems, grader, breakdowns, source, mapping): problems are dicts with the canonical fields
    (id, problem, answer, rubric, reference, set, level, category, subcategory). A local file's grader,
    unless given: answerbench (the LLM answer judge) when it has answers and no rubric, imo_proofbench
    with a reference and a rubric, else marking_scheme."""
    spec = BENCHMARKS.get(benchmark)
    source = spec["source"] if spec else benchmark
    if spec is None and not os.path.exists(benchmark):
        raise common.InputError(f"--benchmark {benchmark!r}: not one of {list(BENCHMARKS)} and not an existing "
                         ".jsonl/.json/.parquet file")
    ds = common.load_rows(source, split=split, config=config)
    names = list(ds.column_names)
    explicit = parse_columns(columns)
    fields = spec["fields"] if spec else list(CANDIDATES)
    fields = fields + [f for f in explicit if f not in fields]
    probe = resolve_columns(names, fields, explicit, ["problem"], source)
    if not grader:  # a local file: answer-style if it has answers, else judge-graded
        grader = spec["grader"] if spec else ("answerbench" if "answer" in probe and "rubric" not in probe else
                                              "imo_proofbench" if "reference" in probe and "rubric" in probe else
                                              "marking_scheme")
    try:  # the grader's fields (a judge prompt: those its template uses), and a problem to generate from
        required = ["problem"] + [f for f in judge_lib.required_fields(grader) if f != "problem"]
    except ValueError as e:
        raise common.InputError(f"--grader {grader!r}: {e}") from None
    mapping = resolve_columns(names, fields, explicit, required, source)
    problems, seen = [], set()
    for i, row in enumerate(ds):
        if isinstance(row[mapping["problem"]], (int, float)):  # graded as text, but said: a column mix-up?
            print(f"{source}: row {i}: the problem is a number ({row[mapping['problem']]!r}); check --columns",
                  flush=True)
        # every field as text: a numeric answer column (42) is compared and hashed as the string "42"
        p = {f: (None if row[c] is None else str(row[c])) for f, c in mapping.items()}
        p["id"] = p.get("id") or f"row-{i}"
        if p["id"] in seen:
            raise common.InputError(f"{source}: row {i}: duplicate id {p['id']!r}; "
                             "map a unique id column with --columns id=...")
        seen.add(p["id"])
        for f in required:
            if not (p.get(f) or "").strip():
                raise common.InputError(f"{source}: row {i} (id {p['id']!r}) has an empty {f!r} (column {mapping[f]!r})")
        if benchmark == "imo-proofbench" and not p.get("set"):
            m = re.search(r"basic|advanced", p["id"], re.IGNORECASE)
            p["set"] = m.group(0).lower() if m else None
        problems.append(p)
    if limit > 0:
        problems = problems[:limit]
    breakdowns = spec["breakdowns"] if spec else ["category"]
    return problems, grader, breakdowns, source, mapping


# ---------------------------------------------------------------------------------------------
# scores: avg@n with the sample std of the n run means


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def avg_at_n(scores_by_problem, n):
    """scores_by_problem: {id: {sample_index: score 0..7}} (a parse failure already counted 0; an
    ungraded sample is absent). Run k's mean is the mean over problems of score/7 in percent;
    returns (mean of the run means, their sample std (ddof=1, as the released eval/scripts/stats.py;
    nan with a single run), run means)."""
    runs = []
    for k in range(n):
        vals = [100.0 * s[k] / 7.0 for s in scores_by_problem.values() if k in s]
        if vals:
            runs.append(_mean(vals))
    if not runs:
        return float("nan"), float("nan"), []
    mu = _mean(runs)
    if len(runs) < 2:
        return mu, float("nan"), runs
    return mu, math.sqrt(sum((r - mu) ** 2 for r in runs) / (len(runs) - 1)), runs


def summarize(problems, grades, n, breakdowns):
    """Summary dict from problems and the grade records (id, sample, score, error, parse_failed,
    truncated). Records with an error are ungraded: left out and counted."""
    by_id = {p["id"]: p for p in problems}
    scores = {p["id"]: {} for p in problems}
    counts = dict(graded=0, ungraded=0, parse_failed=0, truncated=0)
    for g in grades:
        if g["id"] not in by_id or g["sample"] >= n:
            continue
        if g.get("error"):
            counts["ungraded"] += 1
            continue
        counts["graded"] += 1
        counts["parse_failed"] += bool(g.get("parse_failed"))
        counts["truncated"] += bool(g.get("truncated"))
        scores[g["id"]][g["sample"]] = g["score"] if g["score"] is not None else 0
    counts["missing"] = len(problems) * n - counts["graded"] - counts["ungraded"]
    rows = []

    def add(name, ids):
        mu, sd, runs = avg_at_n({i: scores[i] for i in ids}, n)
        rows.append(dict(subset=name, problems=len(ids), avg=mu, std=sd, runs=runs))

    add("all", list(scores))
    for field in breakdowns:
        values = sorted({p.get(field) for p in problems if p.get(field)})
        # one value would repeat the "all" row; a set (basic / advanced) is shown even alone, since
        # IMO-ProofBench scores are reported per set
        if len(values) < 2 and field != "set":
            continue
        for v in values:
            add(f"{field}={v}", [p["id"] for p in problems if p.get(field) == v])
    per_problem = {i: dict(mean=_mean(list(s.values())) if s else None, scores=[s.get(k) for k in range(n)])
                   for i, s in scores.items()}
    return dict(n=n, table=rows, counts=counts, per_problem=per_problem)


def format_table(summary, title=""):
    n = summary["n"]
    lines = [f"| subset | problems | avg@{n} (std) | run means |", "|---|---|---|---|"]
    for r in summary["table"]:
        sd = "-" if math.isnan(r["std"]) else f"{r['std']:.1f}"  # one run: no spread to report
        cell = "-" if math.isnan(r["avg"]) else f"{r['avg']:.1f} ({sd})"
        lines.append(f"| {r['subset']} | {r['problems']} | {cell} | {', '.join(f'{x:.1f}' for x in r['runs'])} |")
    c = summary["counts"]
    foot = (f"graded {c['graded']}, parse failures {c['parse_failed']} (counted 0), truncated {c['truncated']} "
            f"(counted 0), ungraded after judge errors {c['ungraded']}, not yet generated/graded {c['missing']}")
    return (f"{title}\n\n" if title else "") + "\n".join(lines) + "\n\n" + foot


def plot_scores(path, summary, title):
    """Per-problem score distribution: the mean over samples as a bar, each sample as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # best problems first; an ungraded problem sorts last (-1) and is drawn as an empty bar
    items = sorted(((v["mean"] if v["mean"] is not None else -1, i, v["scores"])
                    for i, v in summary["per_problem"].items()), reverse=True)
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(items) + 2), 4))
    xs = range(len(items))
    ax.bar(xs, [max(m, 0) for m, _, _ in items], color="#9ecae1", label="mean over samples")
    for x, (_, _, ss) in zip(xs, items):
        pts = [s for s in ss if s is not None]
        ax.scatter([x] * len(pts), pts, s=10, color="#08519c", zorder=3)
    ax.set_ylim(-0.3, 7.3)
    ax.set_ylabel("score (0-7)")
    ax.set_xlabel("problem (sorted by mean score)")
    ax.set_title(title, fontsize=9)
    if len(items) <= 40:
        ax.set_xticks(list(xs), [i for _, i, _ in items], rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out_dir, summary, args, title):
    lines = [f"# {title}", "", format_table(summary), "", "![scores per problem](scores.png)", "",
             "## Per problem", "", "| id | mean score | samples |", "|---|---|---|"]
    for i, v in summary["per_problem"].items():
        m = "-" if v["mean"] is None else f"{v['mean']:.2f}"
        lines.append(f"| {i} | {m} | {' '.join('-' if s is None else str(s) for s in v['scores'])} |")
    lines += ["", "## Arguments", "", "```json", json.dumps(args, indent=2), "```", ""]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# generation (rc_decode) and grading (judge.py), both written line by line as they finish

# What the generations depend on. The grader's settings are not here: each grade is stored under its
# Grader.key (problem, proof, rubric/reference/answer, judge model, prompt text, ...), so another judge or
# prompt regrades exactly what it changes and keeps the generations.
RESUME_KEYS = ["model", "tokenizer", "benchmark", "columns", "split", "config", "scaffold", "temperature", "top_p",
               "top_k", "reason_tokens", "turns", "summary_tokens", "summary_temperature", "summary_top_p",
               "summary_top_k", "summary_thinking", "final_summary", "summarizer_model", "n_proofs", "n_verify",
               "refine_rounds", "n_critiques", "verify_tokens", "task_prompt", "seed", "dtype"]


def recorded_args(old):
    """The settings of an args.json under today's names. One written before eval.py shared rc_decode's flags
    has max_tokens and rounds (renamed) and none of the summary's top-p/top-k, thinking, final summary and
    critiques: those were fixed then, to the values their defaults give today (its samples match today's)."""
    if "reason_tokens" in old:
        return old
    implied = dict(summary_top_p=old.get("top_p"), summary_top_k=old.get("top_k"), summary_thinking=True,
                   final_summary=False, n_critiques=2)
    return {**implied, **rc_decode.renamed_dests(old)}


def answer_grade(text, reference, allow_no_think, strip_self_eval=True):
    """One completion graded by --grader answer (judge.AnswerGrader, math-verify) as a grade record: 7 if
    the last \\boxed{} of the text after </think>, its self-evaluation section cut, matches the reference."""
    grader = judge_lib.make_grader("answer", require_think=not allow_no_think, strip_self_eval=strip_self_eval)
    return grader.grade([{"proof": text, "answer": reference}])[0].to_dict()


class GradeLog:
    """grades.jsonl of one eval folder. Each line is a generation's grade under its Grader.key (the
    problem, the completion, rubric/reference/answer and the grader's settings), so a grade counts only
    for the generation, data and grader it was made with; grading runs in the background (a judge) or at
    once (math-verify), every grade appended as it arrives."""

    def __init__(self, path, grader, name, by_id):
        from tqdm import tqdm

        self.path, self.grader, self.name, self.by_id = path, grader, name, by_id
        lines = common.read_jsonl(path)
        # keys graded without an error are never resubmitted (an errored grade is retried on this run);
        # `done` holds each one's grade (without the line's own fields), `have` the (id, sample, key)
        # that already have their own line
        own = ("id", "sample", "grader", "key")
        self.done = {r["key"]: {k: v for k, v in r.items() if k not in own}
                     for r in lines if r.get("key") and not r.get("error")}
        self.have = {(r.get("id"), r.get("sample"), r["key"]) for r in lines if r.get("key") in self.done}
        self.waiting = {}  # key -> generations waiting for its grade (the first one submitted it)
        self.lock = threading.Lock()
        self.futures = []
        self.bar = tqdm(total=0, desc="grade", position=1, dynamic_ncols=True)

    def key(self, gen):
        p = self.by_id[gen["id"]]
        item = dict(problem=p["problem"], proof=gen["final_completion"], rubric=p.get("rubric"),
                    reference=p.get("reference"), answer=p.get("answer"))
        return self.grader.key(item), item

    def _write(self, gen, key, grade):
        common.append_jsonl(self.path, dict(id=gen["id"], sample=gen["sample"], grader=self.name, key=key, **grade))

    def grade(self, gens):
        """Start grading the generations (dicts id, sample, final_completion) not graded yet. Samples with
        the same text share a key: it is graded once and each sample gets its own line (viewer.py and
        --compare read grades by id and sample), also when a resume finds the key already graded."""
        items, keys = [], []
        with self.lock:
            for gen in gens:
                if gen["id"] not in self.by_id:
                    continue
                key, item = self.key(gen)
                if key in self.done:
                    if (gen["id"], gen["sample"], key) not in self.have:
                        self._write(gen, key, self.done[key])
                        self.have.add((gen["id"], gen["sample"], key))
                elif key in self.waiting:
                    self.waiting[key].append(gen)
                else:
                    self.waiting[key] = [gen]
                    items.append(item)
                    keys.append(key)
        if not items:
            return

        def on_grade(i, g):
            grade = g.to_dict()
            with self.lock:
                for gen in self.waiting.pop(keys[i]):
                    self._write(gen, keys[i], grade)
                if not grade.get("error"):
                    self.done[keys[i]] = grade
            self.bar.update(1)
        self.bar.total += len(items)
        self.bar.refresh()
        self.futures.append(self.grader.submit(items, on_grade=on_grade))  # overlaps generation

    def wait(self):
        for f in self.futures:
            f.result()

    def cancel(self):
        for f in self.futures:  # stop grading; what arrived is on disk, a rerun grades the rest
            f.cancel()

    def close(self):
        self.bar.close()
        self.grader.close()

    def current(self, gens):
        """The grade line of each generation (its key's last line without an error, else its last line),
        under the generation's own id and sample: samples with the same text share a key, and each counts."""
        by_key = judge_lib.grades_by_key(common.read_jsonl(self.path))
        keys = {(g["id"], g["sample"]): self.key(g)[0] for g in gens if g["id"] in self.by_id}
        return [dict(by_key[k], id=i, sample=s) for (i, s), k in keys.items() if k in by_key]


def check_run_dir(args, out, grader):
    """Resolve --task-prompt (the benchmark's, else by grader), refuse to resume `out` with other settings
    (RESUME_KEYS, each named), then record the args."""
    if not args.task_prompt:
        spec = BENCHMARKS.get(args.benchmark)
        # a grader of gold answers gets IMO-AnswerBench's "\\boxed{} answer" task, any other the proof task
        answers = "answer" in judge_lib.required_fields(grader)
        args.task_prompt = spec["task_prompt"] if spec else "answerbench" if answers else "direct_proof"
    try:  # a missing or malformed task prompt fails now, not after the model has loaded
        rc_decode.task_text("problem", args.task_prompt)
    except ValueError as e:
        raise common.InputError(f"--task-prompt {args.task_prompt!r}: {e}") from None
    args_path = os.path.join(out, "args.json")
    if os.path.exists(args_path) and os.path.exists(os.path.join(out, "generations.jsonl")):
        with open(args_path) as f:
            old = json.load(f)
        old = recorded_args(old)
        diff = [k for k in RESUME_KEYS if k in old and old[k] != getattr(args, k)]
        if diff:
            was = ", ".join(f"--{k.replace('_', '-')} {old[k]!r}" for k in diff)
            raise common.InputError(f"{out} holds a run made with different settings ({was}); "
                                    "rerun with those flags to resume it, or pass a new --output-dir")
    with open(args_path, "w") as f:
        json.dump(vars(args), f, indent=2)


def evaluate(args):
    """Generate what is missing, grade what is ungraded, write the summary; returns the summary."""
    out = args.out_dir
    common.writable_path(out, "--output-dir (--out-dir)", folder=True)  # before the benchmark, the model or the judge
    problems, grader, breakdowns, source, mapping = load_benchmark(
        args.benchmark, columns=args.columns, grader=args.grader, split=args.split, config=args.config or None,
        limit=args.limit)
    check_run_dir(args, out, grader)
    args.grader = args.grader or grader
    title = f"{args.model} on {args.benchmark} ({args.scaffold}, {grader} grader)"
    print(f"{source}: {len(problems)} problems, columns {mapping}, grader {grader!r}, n={args.n}", flush=True)

    gen_path, grade_path = os.path.join(out, "generations.jsonl"), os.path.join(out, "grades.jsonl")
    gens = {(r["id"], r["sample"]): r for r in common.read_jsonl(gen_path) if not r.get("error")}
    by_id = {p["id"]: p for p in problems}
    log = GradeLog(grade_path, judge_lib.from_args(args, grader, cache_path=os.path.join(out, "judge_cache.sqlite")),
                   grader, by_id)
    todo_gen = [(k, i) for k in range(args.n) for i, p in enumerate(problems) if (p["id"], k) not in gens]
    n_graded = sum(not g.get("error") for g in log.current(gens.values()))
    print(f"{out}: {len(gens)} generations and {n_graded} grades on disk; {len(todo_gen)} to generate", flush=True)

    t0 = time.time()
    try:
        log.grade(list(gens.values()))  # generations from an earlier run that were never graded
        if todo_gen:
            engines = {"model": engine_lib.from_args(args)}
            if args.scaffold == "rc" and args.summarizer_model:
                engines["summarizer"] = engine_lib.from_args(args, args.summarizer_model)
            for c0 in range(0, len(todo_gen), args.chunk_size):
                chunk = todo_gen[c0:c0 + args.chunk_size]
                # the chunk's seed from its first (sample k, problem i): 1,000,003 exceeds any benchmark's
                # problem count, so (k, i) -> seed is one-to-one and two chunks never share a seed
                k0, i0 = chunk[0]
                traces = rc_decode.run_scaffold(args, [problems[i]["problem"] for _, i in chunk], engines["model"],
                                                engines.get("summarizer"),
                                                seed=None if args.seed < 0 else args.seed + 1_000_003 * k0 + i0)
                records = []
                for (k, i), tr in zip(chunk, traces):
                    rec = dict(id=problems[i]["id"], sample=k, scaffold=args.scaffold,
                               final_completion=tr["final_completion"], final_answer=tr["final_answer"],
                               truncated=tr["truncated"], total_tokens=tr["total_tokens"], error=tr.get("error"),
                               turns=tr["turns"])
                    common.append_jsonl(gen_path, rec)
                    if not rec["error"]:
                        records.append(rec)
                log.grade(records)
                viewer.refresh(out, problems, breakdowns, grader)  # report.html of what is on disk so far
                print(f"generated {min(c0 + args.chunk_size, len(todo_gen))}/{len(todo_gen)} "
                      f"({time.time() - t0:.0f}s)", flush=True)
        log.wait()
    except BaseException:
        log.cancel()
        raise
    finally:
        log.close()

    gens = {(r["id"], r["sample"]): r for r in common.read_jsonl(gen_path) if not r.get("error")}
    grades = log.current(gens.values())
    summary = summarize(problems, grades, args.n, breakdowns)
    # generation errors: the last line of each (id, sample) of this run, so one a rerun fixed is not counted
    summary.update(title=title, grader=grader, source=source, columns=mapping, args=vars(args),
                   generation_errors=sum(1 for r in {(r["id"], r["sample"]): r for r in common.read_jsonl(gen_path)
                                                     if r["id"] in by_id and r["sample"] < args.n}.values()
                                         if r.get("error")))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    plot_scores(os.path.join(out, "scores.png"), summary, title)
    write_report(out, summary, vars(args), title)
    viewer.refresh(out, problems, breakdowns, grader, announce=True)
    print(format_table(summary, title), flush=True)
    print(f"wrote {out}/report.md, summary.json, scores.png ({time.time() - t0:.0f}s)", flush=True)
    return summary


# ---------------------------------------------------------------------------------------------
# entry point


def parse_args(argv=None):
    args = common.parse_with_preset(build_parser(), argv, {"tiny": TINY})
    if args.view or args.compare:  # viewer.cli: no preset, no model
        return args
    # -1 sentinels resolve here, so args.json records (and a resume compares) the values really used
    rc_decode.resolve_scaffold_flags(args)
    if not args.out_dir:
        name = lambda s: re.sub(r"[^\w.-]+", "_", os.path.basename(os.path.normpath(s)) or s)  # noqa: E731
        args.out_dir = os.path.join("runs", "eval", f"{name(args.model)}-{name(args.benchmark)}-{args.scaffold}")
    if args.n < 1 or args.chunk_size < 1:
        raise common.InputError("--n and --chunk-size must be >= 1")
    if args.limit == 0 or args.limit < -1:  # 0 used to mean "everything" (limit > 0 cut the list)
        raise common.InputError(f"--limit {args.limit}: give N >= 1 problems, or -1 for all of them")
    return args


def main(args):
    if args.view or args.compare:
        return viewer.cli(args)
    if args.model == common.TINY_MODEL_DIR:
        common.make_tiny_model()
    summary = evaluate(args)
    c = summary["counts"]
    if c["ungraded"] or c["missing"] or summary["generation_errors"]:
        print(f"incomplete: {c['ungraded']} grades failed, {c['missing']} samples missing, "
              f"{summary['generation_errors']} generation errors; rerun the same command to finish",
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    common.exit_on_signals()  # SIGTERM/Ctrl-C: what is written (generations, grades, the judge cache) stays
    sys.exit(common.cli(lambda: main(parse_args())))
