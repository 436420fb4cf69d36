"""Cross-entropy through the lm head with the gradients formed in the forward pass (SFT's loss).

    CE_t  = -logp_t = lse_t - z_t[y_t]                         (z = h W^T / temperature)
    loss  = sum_t w_t CE_t / D,   D = #non-ignored tokens ("mean") or 1 ("sum")
    dloss/dlogp_t = -w_t / D      -> dlogits_t = -(w_t / D) (onehot(y_t) - p_t) / temperature
The chunked Triton / PyTorch machinery is fused_linear_loss.py (6 N H V FLOPs, no (N, V) tensor).
"""

import torch

from . import utils
from .fused_linear_loss import apply_fused_linear_loss
from .linear_logprob import linear_logprob_reference


def linear_cross_entropy(hidden, weight, targets, *, temperature=1.0, ignore_index=-100,
                         reduction="mean", token_weights=None):
    """Cross-entropy of targets under softmax(hidden @ weight.T / temperature), 0-dim float32.

    hidden (N, H), weight (V, H), targets (N,) int64 (ignore_index = no loss, no gradient).
    reduction "mean" divides by the number of non-ignored tokens (0 if there are none), "sum" does
    not; token_weights (N,) multiplies each token's CE. The gradients for hidden and weight are formed
    in the forward pass and handed to autograd (one backward per call).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: expected 'mean' or 'sum'")
    utils.check_linear_inputs(hidden, weight, targets, ignore_index, temperature)
    w = utils.per_token("token_weights", token_weights, hidden.shape[0], hidden.device, optional=True)
    targets = targets.contiguous()
    # 1/D as a device tensor (no host sync); clamp so an all-ignored batch gives 0, not NaN.
    inv_d = (1.0 / (targets != ignore_index).sum().clamp(min=1).to(torch.float32)
             if reduction == "mean" else None)

    def token_loss(logp, entropy, w=None):
        ce = -logp
        if w is not None:
            ce = ce * w
        if inv_d is not None:
            ce = ce * inv_d
        return ce, {}

    loss, _ = apply_fused_linear_loss(hidden, weight, targets, token_loss, {"w": w},
                                      float(temperature), ignore_index, entropy=False)
    return loss


def linear_cross_entropy_reference(hidden, weight, targets, *, temperature=1.0, ignore_index=-100,
                                   reduction="mean", token_weights=None):
    """Unchunked reference (materializes (N, V)) in the inputs' dtype."""
    logp = linear_logprob_reference(hidden, weight, targets, temperature=temperature,
                                    ignore_index=ignore_index)
    ce = -logp if token_weights is None else -logp * token_weights.to(logp.dtype)
    loss = ce.sum()
    if reduction == "mean":
        loss = loss / (targets != ignore_index).sum().clamp(min=1)
    return loss
