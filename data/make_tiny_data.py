"""Writes the small bundled data files the `--preset tiny` runs and the tests use, in the real
datasets' column layouts, from a fixed seed (rerun it to regenerate; the output is deterministic).

The task is verifiable and tiny-model sized: add two small integers and put the result in \\boxed{}.
- tiny_sft.jsonl   FineProofs-SFT layout (problem, reasoning_content, proof, messages, category,
                   competition, source, gemini-3-pro-grade, qwen3-4b-thinking-reward@128)
- tiny_rl.jsonl    FineProofs-RL layout (problem, source, rubrics, scores, rewards, reward_mean,
                   reward_std) plus an `answer` column, so rewards come from the final-answer grader
- tiny_eval.jsonl  IMO-AnswerBench layout (Problem ID, Problem, Short Answer, Category, Subcategory,
                   Source), held-out pairs

    python data/make_tiny_data.py
"""

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
RUBRIC = ("7 points: the final answer in \\boxed{} equals the correct sum. "
          "0 points: any other answer or no boxed answer.")


def problem_text(a, b):
    return f"Compute {a} + {b}. Put the final answer in \\boxed{{}}."


def write(name, rows):
    with open(os.path.join(HERE, name), "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main():
    rng = random.Random(0)
    pairs = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(pairs)
    eval_pairs, train_pairs = pairs[:20], pairs[20:]
    sft = []
    for a, b in train_pairs[:48]:
        problem, thinking, proof = problem_text(a, b), f"{a} plus {b} is {a + b}.", f"\\boxed{{{a + b}}}"
        sft.append({"problem": problem, "reasoning_content": thinking, "proof": proof,
                    "messages": [{"role": "user", "content": problem},
                                 {"role": "assistant", "content": f"<think>\n{thinking}\n</think>\n\n{proof}"}],
                    "category": "arithmetic", "competition": "tiny", "source": "synthetic",
                    "gemini-3-pro-grade": 7, "qwen3-4b-thinking-reward@128": 1.0})
    rl = [{"problem": problem_text(a, b), "answer": str(a + b), "source": "synthetic", "rubrics": RUBRIC,
           "scores": [], "rewards": [], "reward_mean": 0.0, "reward_std": 0.0} for a, b in train_pairs]
    ev = [{"Problem ID": f"tiny-{i:03d}", "Problem": problem_text(a, b), "Short Answer": str(a + b),
           "Category": "Algebra", "Subcategory": "arithmetic", "Source": "synthetic"}
          for i, (a, b) in enumerate(eval_pairs)]
    write("tiny_sft.jsonl", sft)
    write("tiny_rl.jsonl", rl)
    write("tiny_eval.jsonl", ev)
    print(f"wrote {len(sft)} SFT rows, {len(rl)} RL rows, {len(ev)} eval rows to {HERE}")


if __name__ == "__main__":
    main()
