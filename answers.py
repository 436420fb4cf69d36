"""Final answers: the \\boxed{} a response ends with, compared with a gold answer by math-verify, shown
to an LLM answer judge, or read back from that judge's \\boxed{Correct} verdict.

IMO-AnswerBench and rl.py tasks with an `answer` column are graded on the final answer, not the proof.
judge.py builds its two answer graders on these functions (AnswerGrader: math-verify, no LLM; a Judge
whose prompt uses {answer}: the LLM compares), and re-exports them, so `judge.grade_answer` still works.
Nothing here imports a grader or a stage: `import answers` needs only common and, when an answer is
compared, math-verify.
"""
import re
import threading

import common


# ---------------------------------------------------------------------------------------------
# final answers compared by math-verify (IMO-AnswerBench, and rl.py tasks with an `answer` column): no LLM


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
