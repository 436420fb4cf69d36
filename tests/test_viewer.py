"""viewer.py: report.html from eval folders (a real tiny eval run, a run graded by the fake judge,
synthetic folders for hostile text, side-by-side comparison and a 1,200-sample x 50k-token scale),
and what a person sees in headless Chromium (rows, a row expanding to its turns, filters, no
console errors, a screenshot).

    python -m pytest -q tests/test_viewer.py
    python tests/test_viewer.py --screenshot docs/viewer.png     # the README's screenshot

The browser tests need Debian's chromium + chromium-driver and selenium (.ci/run installs them);
without them they skip, except under CI=true or QED_REQUIRE_BROWSER=1 (.ci/run sets it): then they fail.
"""

import json
import os
import re
import shutil
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import eval as ev  # noqa: E402
import viewer  # noqa: E402

HOSTILE = "</script><script>window.__pwned = 1</script><!-- <b>bold?</b> <img src=x onerror=\"window.__pwned=2\">"


# ---------------------------------------------------------------------------------------------
# synthetic eval folders in eval.py's layout


def make_run(out, bench, scores, *, turns=3, reasoning_chars=600, model="synthetic", benchmark=None,
             hostile=False, flags=None, finished=True):
    """An eval folder as eval.py writes it: args.json, generations.jsonl, grades.jsonl and (when
    finished) summary.json. scores: {problem id: [score per sample]}; None = not graded yet.
    flags: {(id, sample): "truncated" | "parse_failed" | "ungraded" | "gen_error"}."""
    os.makedirs(out, exist_ok=True)
    flags = flags or {}
    filler = ("Let x be even, so x = 2m. " * (reasoning_chars // 26 + 1))[:reasoning_chars]
    n = max(len(s) for s in scores.values())
    args = dict(model=model, benchmark=benchmark or bench, columns="", split="train", config="", grader="",
                limit=-1, n=n, scaffold="rc", judge_model="fake", judge_reasoning_effort="", allow_no_think=False,
                turns=turns)
    json.dump(args, open(os.path.join(out, "args.json"), "w"))
    gens, grades = [], []
    for pid, ss in scores.items():
        for k, s in enumerate(ss):
            flag = flags.get((pid, k))
            extra = HOSTILE if hostile else ""
            tl = []
            for t in range(turns):
                # distinct per turn so a test can look for it; repeated words stand in for 50k tokens
                reasoning = f"[reasoning {pid}/{k}/{t}] {extra}" + filler
                answer = f"Turn {t + 1} proof of {pid}: since x = 2m, x^2 = 4m^2 is even. {extra}"
                tl.append(dict(prompt=[dict(role="user", content=f"Prove {pid}.")], reasoning=reasoning,
                               answer=answer, completion=f"{reasoning}</think>{answer}", tokens=reasoning_chars // 4,
                               finish_reason="stop", truncated=False, turn=t,
                               summary_in=None if t == 0 else f"[summary {pid}/{k}/{t - 1}]",
                               summary_out=f"[summary {pid}/{k}/{t}] x even, x^2 even. {extra}",
                               summary_tokens=12, summary_finish_reason="stop"))
            if flag == "truncated":
                tl[-1].update(answer="", truncated=True, finish_reason="length")
            final = tl[-1]["answer"]
            gens.append(dict(id=pid, sample=k, scaffold="rc", final_completion=tl[-1]["completion"] if final else
                             tl[-1]["reasoning"], final_answer=final, truncated=flag == "truncated",
                             total_tokens=sum(t["tokens"] + 12 for t in tl),
                             error="HTTP 500 from the engine" if flag == "gen_error" else None, turns=tl))
            if s is None or flag == "gen_error":
                continue
            g = dict(id=pid, sample=k, grader="marking_scheme", score=s, reward=s / 7,
                     reply=f"The proof is fine. {extra}<score>{s}</score>", error=None, parse_failed=False,
                     truncated=False, cached=False, latency_s=1.5, note="")
            if flag == "parse_failed":
                g.update(score=None, parse_failed=True, reply="I cannot decide. " + extra)
            elif flag == "truncated":
                g.update(score=0, truncated=True, reply="", note="no </think> (truncated): scored 0")
            elif flag == "ungraded":
                g.update(score=None, error="gave up after 7 attempts; last error: HTTP 503")
            grades.append(g)
    with open(os.path.join(out, "generations.jsonl"), "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in gens)
    with open(os.path.join(out, "grades.jsonl"), "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in grades)
    if finished:
        problems, grader, breakdowns, _, _ = ev.load_benchmark(bench)
        summary = ev.summarize(problems, grades, n, breakdowns)
        summary.update(title=f"{model} on {os.path.basename(bench)}", grader=grader)
        json.dump(summary, open(os.path.join(out, "summary.json"), "w"))
    return out


def make_bench(path, ids, hostile=False):
    cats = ["algebra", "geometry"]
    with open(path, "w") as f:
        for j, pid in enumerate(ids):
            f.write(json.dumps({"id": pid, "problem": f"Prove that the square of an even number is even ({pid})."
                                + (HOSTILE if hostile else ""), "rubric": "7 for a complete proof.",
                                "category": cats[j % 2]}) + "\n")
    return str(path)


def data_blocks(page):
    """{block id: parsed JSON} of the page's <script type="application/json"> blocks."""
    return {m.group(1): json.loads(m.group(2)) for m in
            re.finditer(r'<script type="application/json" id="([\w-]+)">(.*?)</script>', page, re.S)}


def visible_part(page):
    """The page without its data blocks: what the browser lays out before anything is expanded."""
    return re.sub(r'<script type="application/json" id="d-\d+">.*?</script>', "", page, flags=re.S)


# ---------------------------------------------------------------------------------------------
# the generator


def test_hostile_text_cannot_break_out(tmp_path):
    ids = ["p0", "p<1>"]
    bench = make_bench(tmp_path / "b.jsonl", ids, hostile=True)
    out = make_run(str(tmp_path / "run"), bench, {"p0": [7, 3], "p<1>": [0, 5]}, hostile=True,
                   flags={("p<1>", 1): "parse_failed"})
    page = open(viewer.render_run(out), encoding="utf-8").read()
    # only our own script elements close: the index, the JS and one block per problem
    assert page.count("</script") == 2 + len(ids)
    assert "<script>window.__pwned" not in page and "<img src=x" not in page and "<!-- <b>" not in page
    blocks = data_blocks(page)
    assert set(blocks) == {"qed-meta", "d-0", "d-1"}
    turn = blocks["d-0"]["runs"][0][0]["turns"][1]
    assert turn["reasoning"].startswith("[reasoning p0/0/1] " + HOSTILE)  # the text survives exactly
    assert HOSTILE in blocks["d-1"]["problem"]["problem"] and blocks["d-1"]["id"] == "p<1>"
    assert "p&lt;1&gt;" in visible_part(page)  # a row's id is escaped text
    # a lone surrogate (a JSONL "\udc80" escape: half a character) is written as that escape, not a crash
    path = os.path.join(out, "generations.jsonl")
    raw = open(path, encoding="utf-8").read()
    open(path, "w", encoding="utf-8").write(raw.replace("[reasoning p0/0/0]", "[reasoning p0/0/0] \\udc80", 1))
    blocks = data_blocks(open(viewer.render_run(out), encoding="utf-8").read())
    assert blocks["d-0"]["runs"][0][0]["turns"][0]["reasoning"].startswith("[reasoning p0/0/0] \udc80 ")


def test_tiny_run_writes_the_page_as_it_goes_and_view_rerenders(tiny_model_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "tiny")
    pages = []
    real = viewer.refresh

    def spy(run_dir, *a, **kw):
        path = real(run_dir, *a, **kw)
        pages.append(open(path, encoding="utf-8").read())
        return path
    monkeypatch.setattr(viewer, "refresh", spy)
    argv = ["--preset", "tiny", "--model", tiny_model_dir, "--out-dir", out, "--limit", "2", "--n", "2",
            "--scaffold", "rc", "--turns", "2", "--max-tokens", "8", "--summary-tokens", "8", "--chunk-size", "2"]
    assert ev.main(ev.parse_args(argv)) == 0
    assert len(pages) == 3  # after each of the 2 generation chunks, and at the end
    first = data_blocks(pages[0])
    assert 'id="in-progress"' in pages[0] and 'id="in-progress"' not in pages[-1]
    # chunk 1 = sample 0 of both problems: those are in the page, sample 1 is still missing
    assert first["d-0"]["runs"][0][1]["flags"] == ["missing"]
    assert "turns" in first["d-0"]["runs"][0][0] and "turns" not in first["d-0"]["runs"][0][1]
    last = data_blocks(pages[-1])
    gens = common.read_jsonl(f"{out}/generations.jsonl")
    g0 = next(r for r in gens if r["id"] == "tiny-000" and r["sample"] == 1)
    shown = last["d-0"]["runs"][0][1]
    assert [t["reasoning"] for t in shown["turns"]] == [t["reasoning"] for t in g0["turns"]]
    assert [t["tokens"] for t in shown["turns"]] == [t["tokens"] for t in g0["turns"]]
    assert shown["judge"]["source"].startswith(("math-verify", "nothing graded"))
    # --view rebuilds the same page from the folder alone
    os.remove(f"{out}/report.html")
    assert ev.main(ev.parse_args(["--view", out])) == 0
    again = open(f"{out}/report.html", encoding="utf-8").read()
    assert data_blocks(again) == last
    strip = lambda p: re.sub(r"<!-- written .*? -->", "", p)  # noqa: E731
    assert strip(again) == strip(pages[-1])


def test_judged_run_shows_what_the_judge_was_sent(tiny_model_dir, tmp_path):
    from test_judge import FakeJudge

    data = tmp_path / "proofs.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "problem": f"[[p{i}]] Prove that {i} + 0 = {i}.",
                                        "rubric": "7 points for a complete proof."}) + "\n" for i in range(2)))
    srv = FakeJudge({"p0": ["ok:5"], "p1": ["text:no score here"]})
    try:
        out = str(tmp_path / "run")
        assert ev.main(ev.parse_args(["--model", tiny_model_dir, "--engine", "hf", "--device", "cpu",
                                      "--dtype", "float32", "--benchmark", str(data), "--scaffold", "direct",
                                      "--n", "1", "--max-tokens", "8", "--allow-no-think", "--out-dir", out,
                                      "--judge-base-url", srv.url, "--judge-model", "fake",
                                      "--judge-max-retries", "0"])) == 0
        sent = {e["pid"]: e["body"]["messages"][0]["content"] for e in srv.log}
    finally:
        srv.close()
    blocks = data_blocks(open(f"{out}/report.html", encoding="utf-8").read())
    s0, s1 = blocks["d-0"]["runs"][0][0], blocks["d-1"]["runs"][0][0]
    assert s0["judge"]["text"] == sent["p0"] and s0["judge"]["source"].startswith("rebuilt; verified")
    assert s0["grade"]["score"] == 5 and s0["grade"]["reply"].endswith("<score>5</score>") and s0["flags"] == []
    assert s1["judge"]["text"] == sent["p1"] and s1["flags"] == ["parse_failed"]
    assert s1["grade"]["reply"] == "no score here"
    page = open(f"{out}/report.html", encoding="utf-8").read()
    assert 'data-flags="parse_failed"' in page


def _compare_fixture(tmp_path):
    ids = ["p0", "p1", "p2"]
    bench = make_bench(tmp_path / "b.jsonl", ids)
    a = make_run(str(tmp_path / "base"), bench, {"p0": [7, 0], "p1": [0, 0], "p2": [7, 7]}, model="base")
    b = make_run(str(tmp_path / "rl"), bench, {"p0": [7, 7], "p1": [7, 0], "p2": [7, 7]}, model="rl",
                 flags={("p1", 1): "truncated"})
    return bench, a, b


def test_compare_table_deltas_plot_and_page(tmp_path, capsys, monkeypatch):
    bench, a, b = _compare_fixture(tmp_path)
    out = str(tmp_path / "cmp")
    assert ev.main(ev.parse_args(["--compare", a, b, "--out-dir", out])) == 0
    res = json.load(open(f"{out}/compare.json"))
    assert res["names"] == ["base", "rl"]
    rows = {r["subset"]: r for r in res["table"]}
    # base: run 0 = (7+0+7)/21, run 1 = (0+0+7)/21; rl: run 0 = 100 %, run 1 = (7+0+7)/21
    assert rows["all"]["base"]["avg"] == pytest.approx((200 / 3 + 100 / 3) / 2)
    assert rows["all"]["rl"]["avg"] == pytest.approx((100 + 200 / 3) / 2)
    _, std, _ = ev.avg_at_n({"p0": {0: 7, 1: 7}, "p1": {0: 7, 1: 0}, "p2": {0: 7, 1: 7}}, 2)
    assert rows["all"]["rl"]["std"] == pytest.approx(std)  # whatever ddof eval.py uses
    assert rows["category=algebra"]["base"]["problems"] == 2  # p0, p2
    assert [(p["id"], p["deltas"]) for p in res["per_problem"]] == [("p0", [3.5]), ("p1", [3.5]), ("p2", [0.0])]
    md = open(f"{out}/compare.md").read()
    assert "| p1 | 0.00 | 3.50 | +3.50 |" in md and "| all | 3 | 50.0" in md
    assert "| all |" in capsys.readouterr().out
    assert open(f"{out}/compare.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    page = open(f"{out}/report.html", encoding="utf-8").read()
    blocks = data_blocks(page)
    assert [r["name"] for r in blocks["qed-meta"]["runs"]] == ["base", "rl"]
    assert len(blocks["d-1"]["runs"]) == 2 and blocks["d-1"]["runs"][1][1]["flags"] == ["truncated"]
    assert 'data-deltas="3.5000"' in page
    # the default folder name comes from the runs' names
    monkeypatch.chdir(tmp_path)
    assert ev.main(ev.parse_args(["--compare", a, b])) == 0 and os.path.isfile("runs/compare-base-rl/report.html")


def test_compare_refuses_mixed_benchmarks_and_unfinished_folders(tmp_path):
    bench, a, _ = _compare_fixture(tmp_path)
    other = make_bench(tmp_path / "other.jsonl", ["q0"])
    c = make_run(str(tmp_path / "other-run"), other, {"q0": [7]})
    with pytest.raises(ValueError, match=r"one benchmark.*base: .*b\.jsonl.*other-run: .*other\.jsonl"):
        viewer.compare([a, c], str(tmp_path / "x"))
    d = make_run(str(tmp_path / "running"), bench, {"p0": [7, None]}, finished=False)
    with pytest.raises(ValueError, match="running has no summary.json"):
        viewer.compare([a, d], str(tmp_path / "x"))
    with pytest.raises(ValueError, match="no args.json"):
        viewer.render_run(str(tmp_path))


def test_scale_1200_samples_of_50k_tokens(tmp_path):
    """400 problems x 3 samples, 3 RC turns of ~16.7k tokens each (4 characters a token): the page
    is written in reasonable time and its laid-out part holds the table, not the traces."""
    ids = [f"p{i:03d}" for i in range(400)]
    bench = make_bench(tmp_path / "b.jsonl", ids)
    t0 = time.time()
    out = make_run(str(tmp_path / "big"), bench, {p: [j % 8, (j * 3) % 8, None] for j, p in enumerate(ids)},
                   reasoning_chars=66_667, finished=False)
    t_make = time.time() - t0
    t0 = time.time()
    path = viewer.render_run(out)
    t_render = time.time() - t0
    size = os.path.getsize(path)
    print(f"scale: folder {os.path.getsize(out + '/generations.jsonl') / 1e6:.0f} MB in {t_make:.1f}s, "
          f"report.html {size / 1e6:.0f} MB in {t_render:.1f}s")
    assert size > 1200 * 3 * 66_667  # every trace is in it
    assert t_render < 120  # ~20 s on 2 busy CPU cores
    page = open(path, encoding="utf-8").read()
    visible = visible_part(page)
    assert len(visible) < 2_000_000 and visible.count('<tr class="prob"') == 400
    assert "[reasoning p" not in visible and "Let x be even" not in visible
    assert "[reasoning p399/1/2]" in page
    os.remove(os.path.join(out, "generations.jsonl"))  # 560 MB: pytest keeps its last temp folders
    TestBrowser.big_page = path  # the browser test opens it if it runs after this one


# ---------------------------------------------------------------------------------------------
# in a real browser


def _browser():
    """A headless Chromium driven by selenium, or the reason there is none."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None, "selenium is not installed (pip install -r requirements.txt)"
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    drv = shutil.which("chromedriver")
    if not exe or not drv:
        return None, "chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = exe
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(drv), options=opts), ""


@pytest.fixture(scope="module")
def browser():
    drv, why = _browser()
    if drv is None:
        if os.environ.get("CI") == "true" or os.environ.get("QED_REQUIRE_BROWSER") == "1":
            pytest.fail(f"CI=true or QED_REQUIRE_BROWSER=1 (.ci/run) but the browser tests cannot run: {why}")
        pytest.skip(why)
    yield drv
    drv.quit()


def _errors(drv):
    return [e for e in drv.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def _wait_text(drv, elem, text):
    """<details> bodies are built on the (asynchronous) toggle event: wait for the text to appear."""
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(drv, 10).until(lambda _: text in elem.text)
    return True


def _shown(drv):
    return [r for r in drv.find_elements("css selector", "#problems tr.prob") if r.is_displayed()]


class TestBrowser:
    big_page = None

    def test_rows_expand_filters_and_no_console_errors(self, browser, tmp_path):
        from selenium.webdriver.support.ui import Select

        ids = [f"p{i}" for i in range(6)]
        bench = make_bench(tmp_path / "b.jsonl", ids)
        out = make_run(str(tmp_path / "run"), bench,
                       {"p0": [7, 5], "p1": [0, 0], "p2": [3, 7], "p3": [7, 7], "p4": [0, 2], "p5": [6, None]},
                       reasoning_chars=9000, flags={("p1", 0): "truncated", ("p4", 1): "parse_failed",
                                                    ("p2", 0): "ungraded"})
        path = viewer.render_run(out)
        browser.get("file://" + os.path.abspath(path))
        assert len(_shown(browser)) == 6
        score_rows = browser.find_elements("css selector", "#scores tbody tr")
        assert [r.find_elements("tag name", "td")[0].text for r in score_rows] == [
            "all", "category=algebra", "category=geometry"]
        assert browser.find_element("id", "shown").text == "6 of 6 problems shown"
        # the traces are not in the DOM until a row is expanded
        assert "[reasoning p0/" not in browser.find_element("tag name", "body").text
        assert browser.execute_script("return document.querySelectorAll('.sample').length") == 0
        row = _shown(browser)[0]
        row.click()
        cards = browser.find_elements("css selector", "tr.detail-row .sample")
        assert len(cards) == 2 and cards[0].text.startswith("sample 0: score 7/7")
        titles = [t.text for t in cards[0].find_elements("css selector", ".turn-title")]
        assert titles == ["turn 1", "turn 2", "turn 3"]
        summaries = [s.text for s in cards[0].find_elements("css selector", ".turn details > summary")]
        assert "reasoning (2,250 tokens, stop)" in summaries
        assert "[reasoning p0/0/1]" not in cards[0].text  # collapsed: built only when opened
        assert "[summary p0/0/1]" in cards[0].text  # the summary that crossed to turn 3
        reasoning = [s for s in cards[0].find_elements("css selector", ".turn details > summary")
                     if s.text.startswith("reasoning")][1]
        reasoning.click()
        assert _wait_text(browser, cards[0], "[reasoning p0/0/1]")
        more = cards[0].find_element("css selector", "button.more")  # 9,000 characters: cut at 4,000
        assert "show all (9,0" in more.text
        more.click()
        assert "judge reply (marking_scheme): parsed score 7" in cards[0].text
        browser.save_screenshot(str(tmp_path / "expanded.png"))
        assert os.path.getsize(tmp_path / "expanded.png") > 10_000
        # filters hide rows
        Select(browser.find_element("id", "f-flag")).select_by_value("truncated")
        assert [r.find_element("css selector", ".pid").text for r in _shown(browser)] == ["p1"]
        Select(browser.find_element("id", "f-flag")).select_by_value("")
        Select(browser.find_element("id", "f-score")).select_by_value("full")  # p2's ungraded sample is left out
        assert [r.find_element("css selector", ".pid").text for r in _shown(browser)] == ["p2", "p3"]
        Select(browser.find_element("id", "f-score")).select_by_value("")
        Select(browser.find_element("id", "f-subset")).select_by_value("category=geometry")
        assert [r.find_element("css selector", ".pid").text for r in _shown(browser)] == ["p1", "p3", "p5"]
        assert browser.find_element("id", "shown").text == "3 of 6 problems shown"
        browser.save_screenshot(str(tmp_path / "filtered.png"))
        assert _errors(browser) == []

    def test_hostile_text_stays_text_and_compare_page(self, browser, tmp_path):
        bench = make_bench(tmp_path / "b.jsonl", ["p0"], hostile=True)
        out = make_run(str(tmp_path / "run"), bench, {"p0": [7]}, hostile=True)
        browser.get("file://" + os.path.abspath(viewer.render_run(out)))
        _shown(browser)[0].click()
        for s in browser.find_elements("css selector", "tr.detail-row details > summary"):
            s.click()
        _wait_text(browser, browser.find_element("css selector", "tr.detail-row"), "[reasoning p0/0/2] " + HOSTILE)
        assert browser.execute_script("return window.__pwned === undefined")
        assert browser.execute_script("return document.querySelectorAll('tr.detail-row b:not(.turn-title), "
                                      "tr.detail-row img').length") == 0
        assert HOSTILE in browser.find_element("css selector", "tr.detail-row").text
        assert _errors(browser) == []

        _, a, b = _compare_fixture(tmp_path)
        cmp = viewer.compare([a, b], str(tmp_path / "cmp"))
        browser.get("file://" + os.path.abspath(os.path.join(cmp, "report.html")))
        heads = [h.text for h in browser.find_elements("css selector", "#scores thead th")]
        assert heads[2:] == ["base\navg@2 (std)", "rl\navg@2 (std)", "Δ rl"]
        from selenium.webdriver.support.ui import Select
        Select(browser.find_element("id", "f-delta")).select_by_value("up")
        assert [r.find_element("css selector", ".pid").text for r in _shown(browser)] == ["p0", "p1"]
        _shown(browser)[1].click()
        assert [h.text for h in browser.find_elements("css selector", ".run > h3")] == ["base", "rl"]
        browser.save_screenshot(str(tmp_path / "compare.png"))
        assert _errors(browser) == []

    def test_verify_refine_candidates(self, browser, tmp_path):
        bench = make_bench(tmp_path / "b.jsonl", ["p0"])
        out = make_run(str(tmp_path / "run"), bench, {"p0": [7]})
        gen = common.read_jsonl(f"{out}/generations.jsonl")[0]
        cands = []
        for j in range(2):  # candidate 2 refines candidate 1 and is the one eval.py kept
            c = dict(gen["turns"][j], round=j, parent=None if j == 0 else 0, score=0.5 * (j + 1),
                     proof=f"proof {j + 1}", completion=f"thinking {j + 1}</think>proof {j + 1}\n## Self Evaluation",
                     verifications=[dict(verdict=0.5 * (j + 1), analysis=f"analysis of candidate {j + 1}",
                                         completion=f"checking</think>analysis of candidate {j + 1}", tokens=9,
                                         finish_reason="stop", error=None)])
            for k in ("summary_in", "summary_out", "summary_tokens", "summary_finish_reason"):
                c.pop(k)
            cands.append(c)
        gen.update(scaffold="verify-refine", turns=cands, final_completion=cands[1]["completion"])
        with open(f"{out}/generations.jsonl", "w") as f:
            f.write(json.dumps(gen) + "\n")
        browser.get("file://" + os.path.abspath(viewer.render_run(out)))
        _shown(browser)[0].click()
        titles = [t.text for t in browser.find_elements("css selector", ".turn-title")]
        assert titles == ["candidate 1 (round 0), self-verified score 0.5",
                          "candidate 2 (round 1, refines candidate 1), self-verified score 1 - chosen"]
        best = browser.find_element("css selector", ".turn.best")
        opener = [s for s in best.find_elements("css selector", "details > summary") if s.text.startswith("verif")]
        assert [s.text for s in opener] == ["verification 1: verdict 1 (9 tokens)"]
        opener[0].click()
        assert _wait_text(browser, best, "analysis of candidate 2")
        assert _errors(browser) == []

    def test_big_page_opens_with_only_the_table_in_the_dom(self, browser):
        if TestBrowser.big_page is None:
            pytest.skip("run with test_scale_1200_samples_of_50k_tokens (it writes the page)")
        t0 = time.time()
        browser.get("file://" + os.path.abspath(TestBrowser.big_page))
        t_load = time.time() - t0
        n_el = browser.execute_script("return document.body.getElementsByTagName('*').length")
        print(f"big page: loaded in {t_load:.1f}s, {n_el} elements")
        assert len(_shown(browser)) == 400 and n_el < 20_000
        _shown(browser)[399].click()
        assert len(browser.find_elements("css selector", "tr.detail-row .sample")) == 3
        assert _errors(browser) == []
        os.remove(TestBrowser.big_page)


def screenshot(path):
    """docs/viewer.png: a synthetic folder (not a model's output) with one row expanded."""
    import tempfile

    drv, why = _browser()
    if drv is None:
        raise SystemExit(why)
    tmp = tempfile.mkdtemp()
    ids = ["PB-Basic-001", "PB-Basic-002", "PB-Basic-003", "PB-Advanced-001", "PB-Advanced-002"]
    bench = make_bench(os.path.join(tmp, "demo.jsonl"), ids)
    out = make_run(os.path.join(tmp, "qed-nano-rc"), bench, {"PB-Basic-001": [7, 6, 7], "PB-Basic-002": [0, 1, 0],
                   "PB-Basic-003": [5, 7, 4], "PB-Advanced-001": [0, 0, 0], "PB-Advanced-002": [2, 0, 3]},
                   reasoning_chars=300, model="synthetic example (not a model's output)",
                   flags={("PB-Advanced-001", 1): "truncated", ("PB-Basic-002", 2): "parse_failed"})
    drv.set_window_size(1000, 1150)
    drv.get("file://" + viewer.render_run(out))
    drv.find_elements("css selector", "#problems tr.prob")[0].click()
    drv.save_screenshot(path)
    drv.quit()
    shutil.rmtree(tmp)
    print(f"wrote {path} ({os.path.getsize(path) // 1024} KB)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--screenshot"] and len(sys.argv) == 3:
        screenshot(sys.argv[2])
    else:
        raise SystemExit("usage: python tests/test_viewer.py --screenshot docs/viewer.png")
