"""Policy-gradient losses through the lm head with the gradients formed in the forward pass (rl.py).

Per token t (w = token_weights, A = advantages, r = exp(logp - old_logp), all (N,)):
  pg_t = the rule `ratio_mode` of policy_rules.POLICY_RULES, e.g.
  "truncate" (truncated importance sampling):
      pg_t = -min(r_t, cap).detach() * A_t * logp_t         d pg/d logp = -min(r, cap) A
  "ppo" (two-sided clipping with separate epsilons; the released recipe's rule):
      pg_t = -min(r_t A_t, clamp(r_t, 1 - clip_low, 1 + clip_high) A_t)
      d pg/d logp = -r A where the unclipped term is the min, else 0
  k3 KL to a reference policy (only if ref_logp is given and kl_beta > 0), d = ref_logp - logp:
      kl_t = exp(d) - d - 1                                  d kl/d logp = 1 - exp(d)
  loss = sum_t w_t (pg_t + kl_beta kl_t - entropy_coef entropy_t)
token_weights carry the aggregation (1/num_sequences for the recipe's constant normalizer,
1/num_tokens for token-mean, 1/(len_i num_seqs) for sequence-mean) and are 0 on prompt/padding.
The chunked Triton / PyTorch machinery is fused_linear_loss.py (6 N H V FLOPs, no (N, V) tensor).
"""

import torch

from . import utils
from .fused_linear_loss import apply_fused_linear_loss, fused_linear_loss_reference
from .policy_rules import POLICY_RULES


def policy_token_loss(logp, entropy, *, advantages, old_logp, token_weights, ref_logp=None,
                      ratio_mode="truncate", ratio_cap=2.0, clip_low=0.2, clip_high=0.2,
                      kl_beta=0.0, entropy_coef=0.0):
    """Per-token policy loss (see the module docstring) and its stats, on (C,) tensors."""
    live = token_weights != 0
    # Tokens with weight 0 (prompt, padding) get log-ratio 0, so that a meaningless old_logp there can
    # not overflow exp() and turn a zero gradient into 0 * inf = NaN.
    log_ratio = torch.where(live, logp - old_logp, torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    rule = POLICY_RULES[ratio_mode]
    pg, clipped = rule(logp, ratio, advantages, {"ratio_cap": ratio_cap, "clip_low": clip_low, "clip_high": clip_high})
    loss = pg
    stats = {"ratio": ratio, "clipped": (clipped & live).to(torch.float32)}
    if ref_logp is not None and kl_beta > 0:
        d = torch.where(live, ref_logp - logp, torch.zeros_like(logp))
        kl = torch.exp(d) - d - 1.0
        loss = loss + kl_beta * kl
        stats["kl"] = kl
    if entropy_coef != 0:
        loss = loss - entropy_coef * entropy
    return token_weights * loss, stats


def _check_policy_args(ratio_mode, ratio_cap, clip_low, clip_high, kl_beta, entropy_coef):
    if ratio_mode not in POLICY_RULES:
        raise ValueError(f"ratio_mode={ratio_mode!r}: expected one of {sorted(POLICY_RULES)} (kernels/policy_rules.py)")
    for name, val in (("ratio_cap", ratio_cap), ("clip_low", clip_low), ("clip_high", clip_high),
                      ("kl_beta", kl_beta), ("entropy_coef", entropy_coef)):
        if not isinstance(val, (int, float)):
            raise ValueError(f"{name} must be a Python number, got {type(val).__name__}")
    if ratio_cap <= 0:
        raise ValueError(f"ratio_cap={ratio_cap}: expected > 0")
    # clip_low >= 1 is allowed: the lower bound 1 - clip_low <= 0 then never binds (ratios are positive),
    # which is the recipe's eps = 4 on both sides (only A > 0 tokens with r > 1 + clip_high lose their gradient)
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low={clip_low}, clip_high={clip_high}: expected both >= 0")
    if kl_beta < 0:
        raise ValueError(f"kl_beta={kl_beta}: expected >= 0")


def linear_policy_loss(hidden, weight, targets, *, advantages, old_logp, token_weights,
                       ref_logp=None, temperature=1.0, ignore_index=-100, ratio_mode="truncate",
                       ratio_cap=2.0, clip_low=0.2, clip_high=0.2, kl_beta=0.0, entropy_coef=0.0):
    """The RL policy loss (module docstring) of targets under softmax(hidden @ weight.T / temperature).

    hidden (N, H), weight (V, H), targets (N,) int64; advantages, old_logp, token_weights (and
    ref_logp) (N,) float32. Returns (loss 0-dim float32, stats) with stats a dict of detached (N,)
    float32 tensors: logp, entropy, ratio, clipped (1.0 where the cap/clip was active), and kl when
    it is computed; tokens with target == ignore_index or weight 0 show logp/entropy 0 (ignored
    targets), ratio 1, clipped 0, kl 0. Gradients for hidden and weight are formed in the forward pass
    (one backward per call).
    """
    _check_policy_args(ratio_mode, ratio_cap, clip_low, clip_high, kl_beta, entropy_coef)
    utils.check_linear_inputs(hidden, weight, targets, ignore_index, temperature)
    n, dev = hidden.shape[0], hidden.device
    args = {
        "advantages": utils.per_token("advantages", advantages, n, dev),
        "old_logp": utils.per_token("old_logp", old_logp, n, dev),
        "token_weights": utils.per_token("token_weights", token_weights, n, dev),
        "ref_logp": utils.per_token("ref_logp", ref_logp, n, dev, optional=True),
    }
    # An ignored target carries no loss: give it weight 0 too, so its stats read ratio 1, clipped 0.
    args["token_weights"] = torch.where(targets != ignore_index, args["token_weights"], 0.0)
    cfg = dict(ratio_mode=ratio_mode, ratio_cap=float(ratio_cap), clip_low=float(clip_low),
               clip_high=float(clip_high), kl_beta=float(kl_beta), entropy_coef=float(entropy_coef))

    def token_loss(logp, entropy, **a):
        return policy_token_loss(logp, entropy, **a, **cfg)

    return apply_fused_linear_loss(hidden, weight, targets.contiguous(), token_loss, args,
                                   float(temperature), ignore_index)


def linear_policy_loss_reference(hidden, weight, targets, *, advantages, old_logp, token_weights,
                                 ref_logp=None, temperature=1.0, ignore_index=-100, **cfg):
    """Unchunked reference with plain autograd (materializes (N, V)) in the inputs' dtype."""
    args = dict(advantages=advantages, old_logp=old_logp, token_weights=token_weights,
                ref_logp=ref_logp)
    return fused_linear_loss_reference(
        hidden, weight, targets, lambda lp, en, **a: policy_token_loss(lp, en, **a, **cfg), args,
        temperature=temperature, ignore_index=ignore_index)
