"""report.html: an eval folder, or several side by side, as one self-contained page.

    python eval.py --view runs/eval/QED-Nano-imo-proofbench-rc          # (re)writes its report.html
    python eval.py --compare runs/eval/base-... runs/eval/sft-... runs/eval/rl-...   # -> runs/compare-<names>

eval.py calls refresh() after every generation chunk is graded and at the end, so a run in progress
can be opened from file:// and reloaded. The page needs no server and no network: CSS and JS are
inline, and the data sits in <script type="application/json"> blocks, one small index of the table
rows and one block per problem with its samples' traces. A problem's traces become DOM only when its
row is expanded, and reasoning is built only when its <details> is opened, so a run of 1,200
samples of 50k-token traces opens as a table of a few hundred rows.

What a sample shows: every turn's reasoning (collapsed, with its token count), the summary that
crossed to the next turn, the final proof, the judge's input and full reply with the parsed score,
and flags (truncated, parse failed, ungraded, generation error, missing). The judge's input is the
prompt recorded in grades.jsonl when there is one; otherwise it is rebuilt from the problem and the
judge prompt file, and marked verified when its cache key is in the run's judge_cache.sqlite (then it
is byte for byte what was sent).
"""

import html
import json
import math
import os
import re
import sqlite3
import sys
import time

import common
import judge as judge_lib

# flag -> (letter on the score chip, meaning); the letters are explained on the page
FLAGS = {"truncated": ("T", "no </think>: scored 0 without a judge call"),
         "parse_failed": ("P", "the judge's reply had no valid score: counted 0"),
         "ungraded": ("U", "the judge failed after retries: left out of the score, a rerun retries it"),
         "gen_error": ("G", "generation failed: a rerun regenerates it"),
         "missing": ("-", "not generated or graded yet")}


# ---------------------------------------------------------------------------------------------
# reading an eval folder


def _last_per_key(rows, keep=lambda r: True):
    """{(id, sample): record}, the last line per key winning (as eval.py reads them)."""
    out = {}
    for r in rows:
        # a record failing keep() (an error) only fills an empty slot: it never hides a retry that succeeded
        if keep(r) or (r["id"], r["sample"]) not in out:
            out[(r["id"], r["sample"])] = r
    return out


def load_run(run_dir, problems=None, breakdowns=None, grader=None):
    """What the page shows of one eval folder. `problems`, `breakdowns` and `grader` come from
    eval.py during a run; --view and --compare reload them from args.json with eval.load_benchmark
    (when that fails, e.g. a hub dataset offline, the page says so and shows ids and traces only)."""
    import eval as ev  # eval.py imports this module: import it back lazily

    args_path = os.path.join(run_dir, "args.json")
    if not os.path.isfile(args_path):
        raise ValueError(f"{run_dir}: no args.json, so this is not an eval.py output folder "
                         "(pass the --output-dir of an eval.py run)")
    with open(args_path) as f:
        args = json.load(f)
    summary = None
    if os.path.isfile(os.path.join(run_dir, "summary.json")):
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    notice = ""
    if problems is None:
        try:
            problems, grader, breakdowns, _, _ = ev.load_benchmark(
                args["benchmark"], columns=args.get("columns", ""), grader=args.get("grader", ""),
                split=args.get("split", "train"), config=args.get("config") or None, limit=args.get("limit", -1))
        except Exception as e:  # shown on the page and printed: the scores still come from summary.json
            notice = (f"the benchmark {args['benchmark']!r} could not be loaded ({type(e).__name__}: {e}); "
                      "problem statements, rubrics and judge inputs are not shown")
            print(f"viewer: {run_dir}: {notice}", file=sys.stderr, flush=True)
            problems, breakdowns = None, []
    grader = grader or args.get("grader") or (summary or {}).get("grader") or ""
    # a generation that failed is superseded by a later successful one (eval.py regenerates it)
    gens = _last_per_key(common.read_jsonl(os.path.join(run_dir, "generations.jsonl")), lambda r: not r.get("error"))
    grades = _last_per_key(common.read_jsonl(os.path.join(run_dir, "grades.jsonl")))
    n = int(args.get("n") or (summary or {}).get("n") or 1)
    if problems is not None:  # recomputed from grades.jsonl: current while the run is in progress
        summary = dict(summary or {}, **ev.summarize(problems, list(grades.values()), n, breakdowns or []))
    elif summary is None:
        raise ValueError(f"{run_dir}: no summary.json and the benchmark could not be loaded ({notice})")
    if problems is None:  # ids only, in the summary's order
        problems = [{"id": i} for i in summary["per_problem"]]
    title = (summary.get("title") or f"{args.get('model')} on {args.get('benchmark')} "
             f"({args.get('scaffold')}, {grader} grader)")
    return dict(dir=run_dir, name=os.path.basename(os.path.normpath(run_dir)), args=args, title=title, n=n,
                grader=grader, problems=problems, breakdowns=breakdowns or [], gens=gens, grades=grades,
                summary=summary, notice=notice)


# ---------------------------------------------------------------------------------------------
# one sample: flags, the judge's input, the trace in the page's shape


def sample_flags(gen, grade):
    """The flags of one (generation, grade) pair, in FLAGS order."""
    if gen is None and grade is None:
        return ["missing"]
    flags = []
    # graded: the grade says whether it was scored as truncated (--allow-no-think grades those texts)
    if grade.get("truncated") if grade is not None else (gen.get("truncated") and not gen.get("error")):
        flags.append("truncated")
    if (grade or {}).get("parse_failed"):
        flags.append("parse_failed")
    if grade is not None and grade.get("error"):
        flags.append("ungraded")
    if gen is not None and gen.get("error"):
        flags.append("gen_error")
    if gen is not None and grade is None and not gen.get("error"):
        flags.append("missing")  # generated, grade not back yet
    return flags


class _JudgeInputs:
    """What the judge was sent for each sample: rebuilt by judge.Judge's own request builder (so the
    proof preparation and prompt filling are exactly the grader's), and marked verified when the
    request's cache key is in the run's judge_cache.sqlite (the key hashes exactly that text)."""

    def __init__(self, run):
        self.run, self.grader, self.args = run, run["grader"], run["args"]
        self.judge, self.error, self.db = None, "", None
        if self.grader and self.grader != "answer":
            try:  # no request is made and no key is read: only the request builder is used
                self.judge = judge_lib.Judge("http://unused", self.args.get("judge_model") or "", api_key_env="",
                                             prompt=self.grader, require_think=not self.args.get("allow_no_think"),
                                             reasoning_effort=self.args.get("judge_reasoning_effort") or None,
                                             strip_self_eval=True)  # as eval.py's judge
            except ValueError as e:
                self.error = str(e)
            path = os.path.join(run["dir"], "judge_cache.sqlite")
            if os.path.isfile(path):
                try:  # read-only: the run may be writing to it right now
                    self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
                except sqlite3.Error:
                    self.db = None

    def _cached(self, key):
        try:
            return self.db is not None and self.db.execute("SELECT 1 FROM grades WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error:
            return False

    def __call__(self, problem, gen, grade):
        """dict(text, source) or None when there is nothing to show."""
        for k in ("judge_prompt", "prompt", "messages"):  # recorded by the grader: shown as is
            rec = (grade or {}).get(k)
            if isinstance(rec, list):
                rec = "\n\n".join(f"[{m.get('role')}]\n{m.get('content')}" for m in rec if isinstance(m, dict))
            if isinstance(rec, str) and rec:
                return dict(text=rec, source="recorded in grades.jsonl")
        if gen is None or gen.get("error"):
            return None
        completion = gen.get("final_completion") or ""
        if self.grader == "answer":
            proof = judge_lib.prepare_proof(completion, require_think=not self.args.get("allow_no_think"),
                                            strip_self_eval=True)
            if proof is None:
                return dict(text="", source="nothing graded: no </think> (truncated), scored 0")
            return dict(text=proof, source=f"math-verify, no LLM: the last \\boxed{{}} of this text against the "
                                           f"reference {problem.get('answer')!r}")
        if self.judge is None or "problem" not in problem:
            why = self.error or self.run["notice"] or f"grader {self.grader!r} unknown"
            return dict(text="", source=f"not shown: the judge's input cannot be rebuilt ({why})")
        item = {f: problem.get(f) for f in ("problem", "rubric", "reference", "answer")}
        try:  # the judge's own request builder: the same proof cut, prompt fill and cache key as when it graded
            job = self.judge._job(0, dict(item, proof=completion))
        except ValueError as e:
            return dict(text="", source=f"not shown: {e}")
        if isinstance(job, judge_lib.Grade):  # decided without a judge call
            return dict(text="", source=f"nothing sent: {job.note}")
        key, messages = job
        text = "\n\n".join(m["content"] for m in messages)
        src = ("rebuilt; verified: its cache key is in judge_cache.sqlite, so this is what was sent"
               if self._cached(key) else
               f"rebuilt with the current prompt file for {self.grader!r}; not found in judge_cache.sqlite "
               "(no cache, or the prompt or judge settings changed since the run)")
        return dict(text=text, source=src)

    def close(self):
        if self.db is not None:
            self.db.close()
        if self.judge is not None:
            self.judge.close()


def _turn_view(t):
    """A trace turn without what the page can rebuild (completion = reasoning + answer) or does not
    show (token ids)."""
    keep = ("turn", "reasoning", "answer", "tokens", "finish_reason", "truncated", "error", "summary_out",
            "summary_tokens", "summary_finish_reason", "summary_error", "round", "parent", "score", "proof")
    v = {k: t[k] for k in keep if t.get(k) is not None}
    prompt = t.get("prompt")
    if isinstance(prompt, list) and prompt:  # chat messages: the last one is the turn's own prompt
        v["prompt"] = str(prompt[-1].get("content", ""))
    for ver in t.get("verifications") or []:
        thinking = common.split_thinking(ver.get("completion") or "")[0]
        kept = {k: ver.get(k) for k in ("verdict", "analysis", "tokens", "finish_reason", "error")}
        v.setdefault("verifications", []).append(dict(kept, reasoning=thinking))
    return v


def sample_view(run, problem, k, judge_inputs):
    gen, grade = run["gens"].get((problem["id"], k)), run["grades"].get((problem["id"], k))
    v = dict(k=k, flags=sample_flags(gen, grade), score=None if grade is None else grade.get("score"))
    if gen is not None:
        v.update(scaffold=gen.get("scaffold"), total_tokens=gen.get("total_tokens"), gen_error=gen.get("error"),
                 final=gen.get("final_answer") or "", best_turn=gen.get("best_turn"),
                 turns=[_turn_view(t) for t in gen.get("turns") or []])
        if v["best_turn"] is None and gen.get("scaffold") == "verify-refine":  # eval.py does not save it
            v["best_turn"] = next((j for j, t in enumerate(gen.get("turns") or [])
                                   if t.get("completion") == gen.get("final_completion")), None)
    if grade is not None:
        v["grade"] = {f: grade.get(f) for f in ("score", "reply", "error", "note", "parse_failed", "truncated",
                                                "cached", "latency_s", "grader")}
    v["judge"] = judge_inputs(problem, gen, grade)
    return v


# ---------------------------------------------------------------------------------------------
# the page


def json_for_script(obj):
    """JSON that is safe inside <script type="application/json">: no '<', '>' or '&' survives
    literally, so neither "</script>" nor "<!--" in a trace can end the block early; JSON.parse
    reads the \\u escapes back to the original characters."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=str)
    return (s.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _num(x):
    # summary.json writes NaN for a subset with no graded sample yet: shown as "-", never as 0
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _fmt(x, digits=1):
    return "-" if _num(x) is None else f"{x:.{digits}f}"


def _cell_avg(row):
    return "-" if row is None or _num(row["avg"]) is None else f"{row['avg']:.1f} ({row['std']:.1f})"


def _chip(sample_score, flags):
    # class s0..s7 colours the chip (CSS below); flag letters follow the score: a truncated 0 reads "0T"
    letters = "".join(FLAGS[f][0] for f in flags if f != "missing")
    if "missing" in flags and sample_score is None:
        cls, txt = "chip miss", "-"
    elif sample_score is None:
        cls, txt = "chip none", letters or "?"
    else:
        cls, txt = f"chip s{int(sample_score)}", f"{sample_score}{letters}"
    title = "; ".join(FLAGS[f][1] for f in flags) or "graded"
    return f'<span class="{cls}" title="{html.escape(title)}">{html.escape(txt)}</span>'


def _problem_subsets(problem, table_names):
    names = []
    for field in ("set", "level", "category", "subcategory"):
        v = problem.get(field)
        if v and f"{field}={v}" in table_names:
            names.append(f"{field}={v}")
    return names


def write_html(path, runs, title):
    """report.html for one run or several (side by side, deltas against the first). Written to a
    temporary file and renamed, so a browser reloading mid-write sees the old page or the new one."""
    t0 = time.time()
    compare = len(runs) > 1
    base = runs[0]
    ids = [p["id"] for p in base["problems"]]
    seen = set(ids)
    for r in runs[1:]:  # problems only another run has go last
        ids += [p["id"] for p in r["problems"] if p["id"] not in seen and not seen.add(p["id"])]
    by_id = [{p["id"]: p for p in r["problems"]} for r in runs]
    subsets = [row["subset"] for row in base["summary"]["table"]]
    for r in runs[1:]:
        subsets += [row["subset"] for row in r["summary"]["table"] if row["subset"] not in subsets]

    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    out = [_page_head(runs, title, stamp), _score_table(runs, subsets, compare), _filters(runs, subsets, compare),
           _problem_rows(runs, ids, by_id, subsets, compare)]
    # toggle, id, subsets, flags; (mean, samples) per run; a delta per later run: the detail row's colspan
    ncols = 4 + 2 * len(runs) + len(runs) - 1
    meta = dict(runs=[dict(name=r["name"], n=r["n"], title=r["title"], grader=r["grader"],
                           scaffold=r["args"].get("scaffold")) for r in runs], ncols=ncols, compare=compare)
    # the script comes before the data blocks: rows are clickable while a large file is still
    # parsing; a block not parsed yet says so
    out.append(f'<script type="application/json" id="qed-meta">{json_for_script(meta)}</script>\n'
               f"<script>{JS}</script>\n")

    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as f:  # a lone surrogate -> \udXXX in JSON
        f.write("".join(out))
        ji = [_JudgeInputs(r) for r in runs]
        try:
            for i, pid in enumerate(ids):  # one block per problem, written as built (memory: one problem)
                prob = next(d[pid] for d in by_id if pid in d)
                data = dict(id=pid, problem={k: prob.get(k) for k in ("problem", "answer", "rubric", "reference")
                                             if prob.get(k)},
                            runs=[[sample_view(r, d[pid], k, j) for k in range(r["n"])] if pid in d else None
                                  for r, d, j in zip(runs, by_id, ji)])
                f.write(f'<script type="application/json" id="d-{i}">{json_for_script(data)}</script>\n')
        finally:
            for j in ji:
                j.close()
        f.write(f"<!-- written {stamp} in {time.time() - t0:.1f}s -->\n</body></html>\n")
    os.replace(tmp, path)
    return path


def _page_head(runs, title, stamp):
    """The document head, the title and the banners of incomplete runs."""
    e = html.escape
    incomplete = [r for r in runs if r["summary"]["counts"]["missing"] or r["summary"]["counts"]["ungraded"]]
    out = [f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
           '<link rel="icon" href="data:,"><meta name="viewport" content="width=device-width, initial-scale=1">'
           f"<style>{CSS}</style></head><body>\n<h1>{e(title)}</h1>\n"]
    for r in incomplete:
        c = r["summary"]["counts"]
        out.append(f'<p class="banner" id="in-progress">{e(r["name"])}: incomplete at {stamp}: {c["missing"]} samples '
                   f'not yet generated or graded, {c["ungraded"]} ungraded after judge errors. Reload to see more '
                   "(eval.py rewrites this page after every generation chunk).</p>\n")
    for r in runs:
        if r["notice"]:
            out.append(f'<p class="banner">{e(r["name"])}: {e(r["notice"])}</p>\n')
    return "".join(out)


def _score_table(runs, subsets, compare):
    """avg@n (std of the run means) per subset and run, then each run's counts."""
    e = html.escape
    out = []
    head = "".join(f"<th>{e(r['name'])}<br>avg@{r['n']} (std)</th>" for r in runs)
    out.append(f'<table id="scores"><thead><tr><th>subset</th><th>problems</th>{head}'
               + ("<th>run means</th>" if not compare else "".join(f"<th>&Delta; {e(r['name'])}</th>"
                                                                   for r in runs[1:]))
               + "</tr></thead><tbody>\n")
    rows_of = [{row["subset"]: row for row in r["summary"]["table"]} for r in runs]
    for s in subsets:
        cells = [rows_of[j].get(s) for j in range(len(runs))]
        nprob = next(c["problems"] for c in cells if c is not None)
        tail = ("<td>" + ", ".join(f"{x:.1f}" for x in cells[0]["runs"]) + "</td>" if not compare else
                "".join(f"<td>{_delta(cells[0], c)}</td>" for c in cells[1:]))
        out.append(f"<tr><td>{e(s)}</td><td>{nprob}</td>" + "".join(f"<td>{_cell_avg(c)}</td>" for c in cells)
                   + tail + "</tr>\n")
    out.append("</tbody></table>\n")
    for r in runs:
        c = r["summary"]["counts"]
        out.append(f'<p class="counts">{e(r["name"])}: graded {c["graded"]}, parse failures {c["parse_failed"]} '
                   f'(counted 0), truncated {c["truncated"]} (counted 0), ungraded {c["ungraded"]}, '
                   f'not yet generated/graded {c["missing"]}. Score = mean over problems of score/7 in percent; '
                   f"std over the {r['n']} run means (run k = sample k of every problem).</p>\n")
    return "".join(out)


def _filters(runs, subsets, compare):
    """The filter bar (subset, score, flag, delta, id) and the legend."""
    e = html.escape
    base = runs[0]
    out = []
    opts = "".join(f'<option value="{e(s)}">{e(s)}</option>' for s in subsets if s != "all")
    flag_opts = "".join(f'<option value="{f}">{FLAGS[f][0]}: {f.replace("_", " ")}</option>' for f in FLAGS)
    out.append('<div id="filters">'
               f'<label>subset <select id="f-subset"><option value="">all</option>{opts}</select></label>'
               f'<label>score{" of " + e(base["name"]) if compare else ""} <select id="f-score">'
               '<option value="">any</option><option value="zero">mean 0</option>'
               '<option value="partial">0 &lt; mean &lt; 7</option><option value="full">mean 7</option>'
               '<option value="lt3.5">mean &lt; 3.5</option><option value="ge3.5">mean &ge; 3.5</option>'
               '<option value="none">no score yet</option></select></label>'
               f'<label>flag <select id="f-flag"><option value="">any</option>{flag_opts}'
               '<option value="clean">no flag</option></select></label>'
               + ('<label>&Delta; vs first <select id="f-delta"><option value="">any</option>'
                  '<option value="up">some run better</option><option value="down">some run worse</option>'
                  '<option value="same">all equal</option></select></label>' if compare else "")
               + '<label>id <input id="f-id" type="search" placeholder="substring"></label>'
               '<span id="shown"></span></div>\n'
               '<p class="legend">Click a row to see its samples. Chips: score 0-7 per sample; letters: '
               + "; ".join(f"<b>{FLAGS[f][0]}</b> {f.replace('_', ' ')}" for f in FLAGS) + ".</p>\n")
    return "".join(out)


def _problem_rows(runs, ids, by_id, subsets, compare):
    """One row per problem: its mean and sample chips per run, the deltas, its flags."""
    e = html.escape
    out = []
    mhead = "".join(f"<th>{e(r['name'])} mean</th><th>samples</th>" if compare else "<th>mean</th><th>samples</th>"
                    for r in runs)
    dhead = "".join(f"<th>&Delta; {e(r['name'])}</th>" for r in runs[1:])
    out.append(f'<table id="problems"><thead><tr><th></th><th>id</th><th>subsets</th>{mhead}{dhead}'
               "<th>flags</th></tr></thead><tbody>\n")
    for i, pid in enumerate(ids):
        p0 = next(d[pid] for d in by_id if pid in d)
        names = _problem_subsets(p0, subsets)
        cells, means, flags = [], [], set()
        for r, d in zip(runs, by_id):
            pp = r["summary"]["per_problem"].get(pid) if pid in d else None
            mean = None if pp is None else _num(pp["mean"])
            means.append(mean)
            chips = []
            for k in range(r["n"]):
                fl = sample_flags(r["gens"].get((pid, k)), r["grades"].get((pid, k)))
                flags.update(fl)
                g = r["grades"].get((pid, k))
                # ungraded (error): no score on the chip; a parse failure (score None, no error) counts 0
                chips.append(_chip(None if g is None or g.get("error") else (g.get("score") or 0), fl))
            cells.append(f'<td class="num">{_fmt(mean, 2)}</td><td>{"".join(chips) if pid in d else "absent"}</td>')
        deltas = [None if m is None or means[0] is None else m - means[0] for m in means[1:]]
        dcells = "".join(f'<td class="num {_dcls(x)}">{"-" if x is None else f"{x:+.2f}"}</td>' for x in deltas)
        flag_txt = " ".join(sorted(flags))
        # the filters read these data-* attributes, so filtering never parses a problem's JSON block
        out.append(f'<tr class="prob" data-i="{i}" data-subsets="{e("|".join(names))}" '
                   f'data-mean="{"" if means[0] is None else means[0]}" data-flags="{flag_txt}" '
                   f'data-deltas="{",".join("" if x is None else f"{x:.4f}" for x in deltas)}">'
                   f'<td class="tog">&#9656;</td><td class="pid">{e(str(pid))}</td><td>{e(", ".join(names))}</td>'
                   f'{"".join(cells)}{dcells}<td class="flags">{e(flag_txt.replace("_", " "))}</td></tr>\n')
    out.append("</tbody></table>\n")
    return "".join(out)


def _delta(a, b):
    if a is None or b is None or _num(a["avg"]) is None or _num(b["avg"]) is None:
        return "-"
    return f"{b['avg'] - a['avg']:+.1f}"


def _dcls(x):
    return "" if x is None or abs(x) < 1e-9 else ("up" if x > 0 else "down")


def render_run(run_dir, problems=None, breakdowns=None, grader=None):
    """Write run_dir/report.html from the folder's files; returns its path."""
    run = load_run(run_dir, problems, breakdowns, grader)
    return write_html(os.path.join(run_dir, "report.html"), [run], run["title"])


def refresh(run_dir, problems=None, breakdowns=None, grader=None, announce=False):
    """render_run for eval.py's loop: a page that fails to render is reported, never stops a run
    (its results are on disk either way; `eval.py --view` renders it later)."""
    try:
        path = render_run(run_dir, problems, breakdowns, grader)
        if announce:
            print(f"wrote {path} (open it in a browser)", flush=True)
        return path
    except Exception as e:
        print(f"viewer: report.html not updated ({type(e).__name__}: {e}); the run goes on, its files are "
              f"intact; `python eval.py --view {run_dir}` renders it", file=sys.stderr, flush=True)
        return None


# ---------------------------------------------------------------------------------------------
# several runs of one benchmark side by side


def _benchmark_key(args):
    b = args.get("benchmark", "")  # a named benchmark by its name, a file by its normalized path
    return (b if b in _benchmarks() else os.path.normpath(b), args.get("split", "train"), args.get("config", ""))


def _benchmarks():
    import eval as ev
    return ev.BENCHMARKS


def compare(dirs, out_dir=""):
    """Compare finished eval folders of one benchmark: out_dir gets compare.md (avg@n (std) per run
    and subset, per-problem deltas against the first folder), compare.json, compare.png and
    report.html (the runs side by side per problem). Returns out_dir."""
    if len(dirs) < 2:
        raise ValueError(f"--compare needs at least two eval folders, got {dirs}")
    for d in dirs:
        if not os.path.isfile(os.path.join(d, "summary.json")):
            raise ValueError(f"--compare: {d} has no summary.json, so it is not a finished eval folder; "
                             "finish it by rerunning its eval.py command, or look at it with --view")
    runs = [load_run(d) for d in dirs]
    keys = [_benchmark_key(r["args"]) for r in runs]
    if len(set(keys)) > 1:
        listing = "; ".join(f"{r['dir']}: {k[0]} (split {k[1]})" for r, k in zip(runs, keys))
        raise ValueError(f"--compare needs folders of one benchmark, these are of {len(set(keys))}: {listing}. "
                         "Compare each benchmark's folders separately")
    names = [r["name"] for r in runs]
    if len(set(names)) < len(names):  # same folder names under different parents: add the parent
        for r in runs:
            r["name"] = os.path.join(os.path.basename(os.path.dirname(os.path.abspath(r["dir"]))), r["name"])
    if not out_dir:
        out_dir = os.path.join("runs", "compare-" + "-".join(re.sub(r"[^\w.]+", "_", r["name"]) for r in runs)[:150])
    os.makedirs(out_dir, exist_ok=True)
    for r in runs:
        c = r["summary"]["counts"]
        if c["missing"] or c["ungraded"]:
            print(f"compare: {r['dir']} is incomplete ({c['missing']} missing, {c['ungraded']} ungraded)",
                  file=sys.stderr, flush=True)
    # a delta means something only on a problem every run has: the other problems stay in each run's table
    common_ids = [p["id"] for p in runs[0]["problems"] if all(p["id"] in r["summary"]["per_problem"] for r in runs)]
    if any(len(r["problems"]) != len(common_ids) for r in runs):
        print(f"compare: the folders hold different problems; per-problem deltas use the {len(common_ids)} "
              "they share, each table column uses its own folder's problems", file=sys.stderr, flush=True)
    subsets = []
    for r in runs:
        subsets += [row["subset"] for row in r["summary"]["table"] if row["subset"] not in subsets]
    table = []
    for s in subsets:
        row = dict(subset=s)
        for r in runs:
            hit = next((x for x in r["summary"]["table"] if x["subset"] == s), None)
            row[r["name"]] = None if hit is None else dict(problems=hit["problems"], n=r["n"], avg=_num(hit["avg"]),
                                                           std=_num(hit["std"]), runs=hit["runs"])
        table.append(row)
    per_problem = []
    for pid in common_ids:
        means = [_num(r["summary"]["per_problem"][pid]["mean"]) for r in runs]
        per_problem.append(dict(id=pid, means=means, deltas=[None if m is None or means[0] is None else m - means[0]
                                                             for m in means[1:]]))
    result = dict(folders=[r["dir"] for r in runs], names=[r["name"] for r in runs],
                  benchmark=runs[0]["args"].get("benchmark"), table=table, per_problem=per_problem)
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump(result, f, indent=2)
    md = format_compare(result)
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(f"# {result['benchmark']}: {' vs '.join(result['names'])}\n\n{md}\n\n![scores](compare.png)\n")
    plot_compare(os.path.join(out_dir, "compare.png"), result)
    title = f"{result['benchmark']}: " + " vs ".join(result["names"])
    write_html(os.path.join(out_dir, "report.html"), runs, title)
    print(md.split("\n\n## ")[0], flush=True)
    print(f"wrote {out_dir}/compare.md, compare.json, compare.png, report.html", flush=True)
    return out_dir


def format_compare(result):
    """Markdown: avg@n (std) per subset and run with deltas vs the first run, then per-problem means."""
    names = result["names"]

    def cell(c):
        return "-" if c is None or c["avg"] is None else f"{c['avg']:.1f} ({c['std']:.1f})"
    head = ["subset", "problems"] + [f"{nm} avg@{next(r[nm]['n'] for r in result['table'] if r[nm])} (std)"
                                     for nm in names] + [f"Δ {nm}" for nm in names[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["table"]:
        cs = [row[nm] for nm in names]
        nprob = next(c["problems"] for c in cs if c)
        ds = ["-" if c is None or cs[0] is None or c["avg"] is None or cs[0]["avg"] is None
              else f"{c['avg'] - cs[0]['avg']:+.1f}" for c in cs[1:]]
        lines.append("| " + " | ".join([row["subset"], str(nprob)] + [cell(c) for c in cs] + ds) + " |")
    lines += ["", "## Per problem (mean score 0-7 over samples; Δ vs the first run)", "",
              "| id | " + " | ".join(names) + " | " + " | ".join(f"Δ {nm}" for nm in names[1:]) + " |",
              "|" + "---|" * (1 + 2 * len(names) - 1)]
    for p in result["per_problem"]:
        lines.append(f"| {p['id']} | " + " | ".join(_fmt(m, 2) for m in p["means"]) + " | "
                     + " | ".join("-" if d is None else f"{d:+.2f}" for d in p["deltas"]) + " |")
    return "\n".join(lines)


def plot_compare(path, result):
    """Grouped bars: avg@n per subset, one bar per run, the std of the run means as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, rows = result["names"], result["table"]
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(rows) * len(names) ** 0.5 + 2), 3.6))
    for j, nm in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(rows))]
        ys = [(r[nm] or {}).get("avg") for r in rows]
        es = [(r[nm] or {}).get("std") for r in rows]
        ax.bar(xs, [y if y is not None else 0 for y in ys], width, yerr=[e if e is not None else 0 for e in es],
               capsize=2, label=nm)
    ax.set_xticks(range(len(rows)), [r["subset"] for r in rows], rotation=30 if len(rows) > 4 else 0,
                  ha="right" if len(rows) > 4 else "center", fontsize=8)
    ax.set_ylabel("score (%), avg@n ± std")
    ax.set_title(str(result["benchmark"]), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cli(args):
    """eval.py --view RUN_DIR / --compare DIR [DIR ...]; returns the exit code."""
    if args.view and args.compare:
        raise ValueError("--view and --compare are separate commands: give one of them")
    if args.view:
        if not os.path.isdir(args.view):
            raise ValueError(f"--view {args.view}: no such folder (pass the --output-dir of an eval.py run)")
        print(f"wrote {render_run(args.view)}", flush=True)
        return 0
    compare(args.compare, args.out_dir)
    return 0


# ---------------------------------------------------------------------------------------------
# the page's CSS and JS (every text from the data goes through textContent, never innerHTML)

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:16px 24px;color:#1b1f24}
h1{font-size:18px;margin:0 0 8px}
table{border-collapse:collapse;margin:6px 0}
th,td{border-bottom:1px solid #d8dee4;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f5f7;font-weight:600}
#scores td:nth-child(n+2){text-align:right}
.num{text-align:right;font-variant-numeric:tabular-nums}
.counts,.legend{color:#57606a;font-size:12px;margin:2px 0}
.banner{background:#fff8c5;border:1px solid #d4a72c;padding:6px 10px;border-radius:4px}
#filters{display:flex;gap:14px;flex-wrap:wrap;align-items:center;margin:10px 0 4px;padding:6px 8px;
 background:#f6f8fa;border-radius:4px}
#shown{color:#57606a}
tr.prob{cursor:pointer}tr.prob:hover{background:#f6f8fa}
tr.prob.open{background:#eef4ff}
.tog{width:12px;color:#57606a}tr.prob.open .tog{transform:rotate(90deg)}
.chip{display:inline-block;min-width:18px;margin:0 2px;padding:0 4px;border-radius:3px;text-align:center;
 font-size:12px;font-variant-numeric:tabular-nums}
.s0{background:#ffd8d3}.s1,.s2{background:#ffe7c2}.s3,.s4{background:#fff3b0}.s5,.s6{background:#d8f1c8}
.s7{background:#a8e2a0}.miss{background:#eee;color:#888}.none{background:#e3d7ff}
.up{color:#1a7f37}.down{color:#cf222e}
td.detail{background:#fbfcfd;padding:8px 12px}
.runs{display:grid;gap:12px}
.run>h3{font-size:14px;margin:4px 0}
.sample{border:1px solid #d0d7de;border-radius:6px;padding:6px 10px;margin:6px 0;background:#fff}
.sample>h4{margin:2px 0 4px;font-size:13px}
.flag{display:inline-block;background:#ffebe9;color:#82071e;border-radius:3px;padding:0 5px;margin-left:6px;
 font-size:11px}
.turn{border-left:3px solid #d0d7de;padding-left:8px;margin:6px 0}
.turn.best{border-left-color:#1a7f37}
.label{font-size:12px;color:#57606a;margin-top:4px}
pre.txt{white-space:pre-wrap;word-break:break-word;font:12px/1.35 ui-monospace,SFMono-Regular,Menlo,monospace;
 background:#f6f8fa;padding:6px 8px;border-radius:4px;margin:2px 0;max-height:480px;overflow:auto}
details>summary{cursor:pointer;font-size:12px;color:#0969da;margin:3px 0}
button.more{font-size:11px;margin:0 0 4px}
.err{color:#cf222e}
"""

JS = r"""
(function(){
"use strict";
const LIMIT = 4000;  // characters of a text shown before its "show all" button
const meta = JSON.parse(document.getElementById('qed-meta').textContent);
const rows = Array.from(document.querySelectorAll('#problems tr.prob'));
const $ = id => document.getElementById(id);

function el(tag, cls, ...kids){
  const n = document.createElement(tag);
  if (cls) n.className = cls;
  for (const k of kids) if (k !== null && k !== undefined) n.append(k instanceof Node ? k : String(k));
  return n;
}
function text(s, label){  // a long text: the first LIMIT characters and a button for the rest
  s = s === null || s === undefined ? '' : String(s);
  const box = el('div', 'textbox');
  if (label) box.append(el('div', 'label', label));
  const pre = el('pre', 'txt');
  pre.textContent = s.length > LIMIT ? s.slice(0, LIMIT) : (s || '(empty)');
  box.append(pre);
  if (s.length > LIMIT){
    const b = el('button', 'more', 'show all (' + s.length.toLocaleString() + ' characters)');
    b.addEventListener('click', ev => { ev.stopPropagation(); pre.textContent = s; b.remove(); });
    box.append(b);
  }
  return box;
}
function lazy(title, build, open){  // <details> whose body is built the first time it opens
  const d = el('details', null, el('summary', null, title));
  let built = false;
  d.addEventListener('toggle', () => { if (d.open && !built){ built = true; d.append(build()); } });
  if (open) d.open = true;
  return d;
}
function tok(n){ return n === undefined || n === null ? '?' : Number(n).toLocaleString(); }

function turnView(t, s, i){
  const vr = s.scaffold === 'verify-refine';
  const box = el('div', 'turn' + (vr && s.best_turn === i ? ' best' : ''));
  const head = vr ? ('candidate ' + (i + 1) + ' (round ' + (t.round || 0) + (t.parent !== undefined ?
      ', refines candidate ' + (t.parent + 1) : '') + '), self-verified score ' + (t.score || 0) +
      (s.best_turn === i ? ' - chosen' : '')) : ('turn ' + (i + 1));
  box.append(el('b', 'turn-title', head));
  if (t.prompt) box.append(lazy('prompt the model saw', () => text(t.prompt)));
  box.append(lazy('reasoning (' + tok(t.tokens) + ' tokens, ' + (t.finish_reason || '?') +
                  (t.truncated ? ', no </think>' : '') + ')', () => text(t.reasoning), false));
  if (t.error) box.append(el('div', 'err', 'error: ' + t.error));
  const last = i === s.turns.length - 1;
  if (vr && t.proof !== undefined && t.proof !== t.answer)
    box.append(lazy('proof (the answer cut before its self-evaluation)', () => text(t.proof)));
  if (t.answer && (!last || vr)) box.append(lazy('answer after </think>', () => text(t.answer)));
  for (const [j, v] of (t.verifications || []).entries())
    box.append(lazy('verification ' + (j + 1) + ': verdict ' + (v.verdict === null ? 'unparsable (0)' : v.verdict) +
                    ' (' + tok(v.tokens) + ' tokens)', () => el('div', null,
                    lazy('reasoning', () => text(v.reasoning)), text(v.analysis, 'analysis'),
                    v.error ? el('div', 'err', 'error: ' + v.error) : null)));
  if (t.summary_out !== undefined)
    box.append(text(t.summary_out, 'summary carried to ' + (last ? 'the end (not used)' : 'turn ' + (i + 2)) +
                    ' (' + tok(t.summary_tokens) + ' tokens, ' + (t.summary_finish_reason || '?') + ')'));
  if (t.summary_error) box.append(el('div', 'err', 'summary: ' + t.summary_error));
  return box;
}
function sampleView(s){
  const card = el('div', 'sample');
  const h = el('h4', null, 'sample ' + s.k + ': ' + (s.score === null || s.score === undefined ? 'no score' :
      'score ' + s.score + '/7') + (s.total_tokens ? ' - ' + tok(s.total_tokens) + ' tokens' : ''));
  for (const f of s.flags) h.append(el('span', 'flag', f.replace('_', ' ')));
  card.append(h);
  if (!s.turns){ card.append(el('div', 'label', 'not generated yet')); return card; }
  if (s.gen_error) card.append(el('div', 'err', 'generation error: ' + s.gen_error));
  s.turns.forEach((t, i) => card.append(turnView(t, s, i)));
  card.append(text(s.final, 'final proof (text after the last </think>)'));
  if (s.judge) card.append(lazy('judge input: ' + s.judge.source, () => text(s.judge.text)));
  const g = s.grade;
  if (!g) card.append(el('div', 'label', 'not graded yet'));
  else {
    card.append(text(g.reply, 'judge reply (' + (g.grader || '') + '): parsed score ' +
        (g.score === null ? 'none' : g.score) + (g.cached ? ', from the cache' : '') +
        (g.latency_s ? ', ' + g.latency_s + ' s' : '')));
    if (g.note) card.append(el('div', 'label', g.note));
    if (g.error) card.append(el('div', 'err', 'judge error: ' + g.error));
  }
  return card;
}
function detail(i){
  const block = $('d-' + i);
  const td = el('td', 'detail');
  td.colSpan = meta.ncols;
  if (!block){ td.append('this problem\'s data is still loading; collapse and expand again'); return td; }
  const d = JSON.parse(block.textContent);
  const p = d.problem || {};
  if (p.problem) td.append(text(p.problem, 'problem'));
  if (p.answer) td.append(text(p.answer, 'reference answer'));
  if (p.rubric) td.append(lazy('grading guidelines', () => text(p.rubric)));
  if (p.reference) td.append(lazy('reference solution', () => text(p.reference)));
  const grid = el('div', 'runs');
  grid.style.gridTemplateColumns = 'repeat(' + d.runs.length + ', minmax(0, 1fr))';
  d.runs.forEach((samples, j) => {
    const col = el('div', 'run');
    if (meta.compare) col.append(el('h3', null, meta.runs[j].name));
    if (!samples) col.append(el('div', 'label', 'not in this run'));
    else for (const s of samples) col.append(sampleView(s));
    grid.append(col);
  });
  td.append(grid);
  return td;
}
function toggle(tr){
  const next = tr.nextElementSibling;
  if (next && next.classList.contains('detail-row')){ next.remove(); tr.classList.remove('open'); return; }
  const row = el('tr', 'detail-row');
  row.append(detail(tr.dataset.i));
  tr.after(row);
  tr.classList.add('open');
}
document.querySelector('#problems tbody').addEventListener('click', ev => {
  const tr = ev.target.closest('tr.prob');
  if (tr) toggle(tr);
});

function scoreOk(v, mean){
  if (!v) return true;
  if (v === 'none') return mean === '';
  if (mean === '') return false;
  const m = Number(mean);
  return v === 'zero' ? m === 0 : v === 'full' ? m === 7 : v === 'partial' ? m > 0 && m < 7 :
         v === 'lt3.5' ? m < 3.5 : m >= 3.5;
}
function deltaOk(v, deltas){
  if (!v) return true;
  const ds = deltas.split(',').filter(x => x !== '').map(Number);
  return v === 'up' ? ds.some(x => x > 1e-9) : v === 'down' ? ds.some(x => x < -1e-9) :
         ds.length > 0 && ds.every(x => Math.abs(x) <= 1e-9);
}
function apply(){
  const sub = $('f-subset').value, sc = $('f-score').value, fl = $('f-flag').value;
  const dl = $('f-delta') ? $('f-delta').value : '', q = $('f-id').value.toLowerCase();
  let shown = 0;
  for (const tr of rows){
    const flags = tr.dataset.flags ? tr.dataset.flags.split(' ') : [];
    const ok = (!sub || tr.dataset.subsets.split('|').includes(sub)) && scoreOk(sc, tr.dataset.mean) &&
      (!fl || (fl === 'clean' ? flags.length === 0 : flags.includes(fl))) && deltaOk(dl, tr.dataset.deltas) &&
      (!q || tr.querySelector('.pid').textContent.toLowerCase().includes(q));
    tr.hidden = !ok;
    const next = tr.nextElementSibling;
    if (next && next.classList.contains('detail-row')) next.hidden = !ok;
    shown += ok;
  }
  $('shown').textContent = shown + ' of ' + rows.length + ' problems shown';
}
for (const id of ['f-subset', 'f-score', 'f-flag', 'f-delta']) if ($(id)) $(id).addEventListener('change', apply);
$('f-id').addEventListener('input', apply);
apply();
})();
"""
