"""Writes the small bundled data files the `--preset tiny` runs and the tests use, in the real
datasets' column layouts, from a fixed seed (rerun it to regenerate; the output is deterministic).

The task is a lookup a 2-layer model can learn to generalize in minutes: a problem lists four to
seven letters with one digit among them ("Which digit is in k h t p x 4 f?") and the answer is that
digit, in \\boxed{}. Every letter and digit is one token of the Qwen3 tokenizer, so the answer is a
token of the problem found by what it is (attention to the one digit, then a copy), not a fact to
memorize: a model that learned the rule solves problems it never saw. The three files hold disjoint
problems (no problem text in two of them).

The SFT traces are a flawed teacher's, like real distilled traces: in 70% of them (SFT_CORRECT) it
finds the digit; in the others it answers with the list's first letter ("The first letter is k.",
\\boxed{k}; graded 0 in the grade columns). SFT imitates both habits, so the warm-up answers a quarter
to four fifths of the held-out problems (README: by seed); RL with the final-answer reward can then do what imitation
cannot: keep the habit that is rewarded (the quick start's RL-over-SFT margin comes from there).
- tiny_sft.jsonl   FineProofs-SFT layout (problem, reasoning_content, proof, messages, category,
                   competition, source, gemini-3-pro-grade, qwen3-4b-thinking-reward@128); `problem`
                   and the user turn are the problem in prompts/answerbench.txt, the task prompt rl.py's
                   and eval.py's tiny presets wrap the RL and eval problems in
- tiny_rl.jsonl    FineProofs-RL layout (problem, source, rubrics, scores, rewards, reward_mean,
                   reward_std) plus an `answer` column, so rewards come from the final-answer grader
- tiny_eval.jsonl  IMO-AnswerBench layout (Problem ID, Problem, Short Answer, Category, Subcategory,
                   Source): the held-out problems the quick start evaluates

    python data/make_tiny_data.py
"""

import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import rc_decode  # noqa: E402 (the repo root's module)

LETTERS = "bcdfghjkmnpqrstvwxyz"  # each " x" is one Qwen3 token (no vowels: no accidental words)
DIGITS = "0123456789"
MIN_LETTERS, MAX_LETTERS = 4, 7
SIZES = {"sft": 512, "rl": 256, "eval": 64}
SFT_CORRECT = 0.7  # the share of SFT traces in which the teacher finds the digit
RUBRIC = ("7 points: the final answer in \\boxed{} is the digit of the list. "
          "0 points: any other answer or no boxed answer.")


def make_problem(rng):
    """(problem text, thinking, answer digit, the list's first letter) of one random problem."""
    symbols = rng.sample(LETTERS, rng.randint(MIN_LETTERS, MAX_LETTERS))
    digit = rng.choice(DIGITS)
    symbols.insert(rng.randint(0, len(symbols)), digit)
    first_letter = next(s for s in symbols if s != digit)
    return f"Which digit is in {' '.join(symbols)}?", f"The digit is {digit}.", digit, first_letter


def distinct_problems(rng, n, seen):
    out = []
    while len(out) < n:
        p = make_problem(rng)
        if p[0] not in seen:
            seen.add(p[0])
            out.append(p)
    return out


def write(name, rows):
    with open(os.path.join(HERE, name), "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def sft_row(problem, thinking, answer, first, correct):
    """A FineProofs-SFT row; correct=False: the teacher's first-letter habit, graded 0."""
    if not correct:
        thinking, answer = f"The first letter is {first}.", first
    proof, problem = f"\\boxed{{{answer}}}", rc_decode.task_text(problem, "answerbench")  # as eval/rl send it
    return {"problem": problem, "reasoning_content": thinking, "proof": proof,
            "messages": [{"role": "user", "content": problem},
                         {"role": "assistant", "content": f"<think>\n{thinking}\n</think>\n\n{proof}"}],
            "category": "lookup", "competition": "tiny", "source": "synthetic",
            "gemini-3-pro-grade": 7 if correct else 0, "qwen3-4b-thinking-reward@128": float(correct)}


def main():
    rng, seen = random.Random(0), set()
    ev = distinct_problems(rng, SIZES["eval"], seen)  # drawn first: the held-out set
    rl = distinct_problems(rng, SIZES["rl"], seen)
    sft = distinct_problems(rng, SIZES["sft"], seen)
    # the teacher is right on a fixed share of the rows, in a random order (an own rng: the problems stay)
    correct = [i < SFT_CORRECT * len(sft) for i in range(len(sft))]
    random.Random(1).shuffle(correct)
    write("tiny_sft.jsonl", [sft_row(*p, ok) for p, ok in zip(sft, correct)])
    write("tiny_rl.jsonl", [{"problem": problem, "answer": answer, "source": "synthetic", "rubrics": RUBRIC,
                             "scores": [], "rewards": [], "reward_mean": 0.0, "reward_std": 0.0}
                            for problem, _, answer, _ in rl])
    write("tiny_eval.jsonl", [{"Problem ID": f"tiny-{i:03d}", "Problem": problem, "Short Answer": answer,
                               "Category": "Lookup", "Subcategory": "pairs", "Source": "synthetic"}
                              for i, (problem, _, answer, _) in enumerate(ev)])
    print(f"wrote {len(sft)} SFT rows, {len(rl)} RL rows, {len(ev)} eval rows to {HERE}")


if __name__ == "__main__":
    main()
