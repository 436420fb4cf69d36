"""Fused lm-head kernels: per-token log-probs, cross-entropy and policy losses without (N, V) logits,
plus group advantages. CUDA tensors run Triton kernels; CPU tensors run the pure-PyTorch path.
Each op's file holds its Triton kernels, launchers, autograd.Function, public function and reference.
"""

from .advantages import broadcast_advantages, group_advantages
from .fused_linear_loss import fused_linear_loss
from .linear_cross_entropy import linear_cross_entropy
from .linear_logprob import linear_logprob
from .linear_policy_loss import linear_policy_loss
from .policy_rules import POLICY_RULES

__all__ = ["linear_logprob", "linear_cross_entropy", "linear_policy_loss", "fused_linear_loss",
           "group_advantages", "broadcast_advantages", "POLICY_RULES"]
