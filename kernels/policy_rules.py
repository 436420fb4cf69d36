"""Policy-gradient rules: how a token's importance ratio and advantage become its loss.

A rule is one function on the (C,) tensors of a chunk of completion tokens:

    rule(logp, ratio, advantages, cfg) -> (pg (C,), clipped (C,) bool)

logp carries the gradient (the fused loss differentiates the rule with respect to it, per token);
ratio = exp(logp - old_logp) is computed from it, so a rule that wants the ratio's gradient uses it
as is and one that wants a fixed weight detaches it. `cfg` holds the knobs (ratio_cap, clip_low,
clip_high), `clipped` marks the tokens whose gradient the rule changed (logged as clip_frac).

`POLICY_RULES` is what `rl.py --loss` offers: a new rule is a function here and a line in the dict.
The KL and entropy terms and the token weights (the aggregation) are added around the rule by
linear_policy_loss.policy_token_loss, the same for every rule.
"""

import torch


def truncate(logp, ratio, advantages, cfg):
    """Truncated importance sampling: pg = -min(r, cap).detach() * A * logp.
    d pg / d logp = -min(r, cap) A: the ratio is a fixed weight, capped above."""
    pg = -torch.clamp(ratio, max=cfg["ratio_cap"]).detach() * advantages * logp
    return pg, ratio > cfg["ratio_cap"]


def ppo(logp, ratio, advantages, cfg):
    """PPO's two-sided clipping with separate epsilons:
    pg = -min(r A, clamp(r, 1 - clip_low, 1 + clip_high) A).
    d pg / d logp = -r A where the unclipped term is the min, else 0 (the clipped side is constant)."""
    lo = 1.0 - cfg["clip_low"]
    hi = 1.0 + cfg["clip_high"]
    pg = -torch.minimum(ratio * advantages, torch.clamp(ratio, lo, hi) * advantages)
    clipped = ((advantages > 0) & (ratio > hi)) | ((advantages < 0) & (ratio < lo))
    return pg, clipped


def cispo(logp, ratio, advantages, cfg):
    """CISPO (MiniMax-M1): the importance weight is clipped and detached, the gradient never dropped:
    pg = -clamp(r, 1 - clip_low, 1 + clip_high).detach() * A * logp.
    d pg / d logp = -clamp(r, lo, hi) A: unlike ppo, a clipped token still moves (with a bounded
    weight), which is what keeps rare high-ratio "fork" tokens learning."""
    lo = 1.0 - cfg["clip_low"]
    hi = 1.0 + cfg["clip_high"]
    pg = -torch.clamp(ratio, lo, hi).detach() * advantages * logp
    return pg, (ratio > hi) | (ratio < lo)


POLICY_RULES = {"truncate": truncate, "ppo": ppo, "cispo": cispo}
