"""Grad-in-forward losses that are sums of per-token functions of logp and entropy.

    loss = sum_t [target_t != ignore_index] * f(logp_t, entropy_t, args_t)

For such a loss the upstream gradient of each token, g_t = df/dlogp_t and k_t = df/dentropy_t, is
known as soon as the token's lse is known, so the forward pass forms the gradients right away:
per chunk of C rows, logits (2 C H V) -> row stats -> g, k by autograd on (C,)-sized tensors ->
dlogits -> grad_h = dlogits W (2 C H V) and grad_W += dlogits^T h (2 C H V): 6 N H V FLOPs in total,
no recompute, nothing of size (N, V). The backward only scales the stored gradients by the scalar
upstream gradient. dlogits and the row kernels are in linear_logprob.py (math there).

`token_loss_fn(logp, entropy, **args) -> (loss (C,), stats dict of (C,) tensors)` is ordinary PyTorch
on the chunk's tokens; `args` are the (N,) tensors of `token_args` sliced to the chunk (0-dim tensors
and None pass through). linear_cross_entropy and linear_policy_loss are two such functions.
"""

import torch

from . import utils
from .linear_logprob import (chunk_apply_grads, chunk_dlogits, chunk_stats,
                                    linear_logprob_reference)


def _slice_args(token_args, c0, c1):
    return {k: (a if a is None or a.dim() == 0 else a[c0:c1]) for k, a in token_args.items()}


def run_fused_linear_loss(hidden, weight, targets, token_loss_fn, token_args, temperature,
                          ignore_index, chunk_size, need_h, need_w, entropy=True, grad_w_dtype=None):
    """The chunk loop (inputs already checked). Returns loss (0-dim), stats, grad_h, grad_w.
    entropy=False: the loss does not use the entropy (the PyTorch path skips it; stats omit it).
    grad_w is the fp32 (V, H) accumulator cast to grad_w_dtype (default weight.dtype); with
    grad_w_dtype=float32 (the gradient of an fp32 master parameter) it is the accumulator itself."""
    n, v = hidden.shape[0], weight.shape[0]
    triton_path = utils.use_triton(hidden)
    scale = 1.0 / temperature
    w_mm = utils.mm_weight(weight)
    rows = utils.chunk_rows(n, v, hidden.device, chunk_size)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, device=weight.device,
                         dtype=utils.compute_dtype(weight)) if need_w else None
    loss = torch.zeros((), device=hidden.device, dtype=utils.compute_dtype(hidden))
    logp_all = torch.empty(n, device=hidden.device, dtype=torch.float32)
    ent_all = torch.empty(n, device=hidden.device, dtype=torch.float32)
    valid = targets != ignore_index
    extra = {}
    for c0 in range(0, n, rows):
        c1 = min(c0 + rows, n)
        h_c, y_c = hidden[c0:c1], targets[c0:c1]
        z, (lse, ez, logp, ent) = chunk_stats(h_c, w_mm, y_c, scale, ignore_index, triton_path,
                                              entropy)
        logp_all[c0:c1] = logp
        ent_all[c0:c1] = ent
        # The per-token loss and its derivatives g = df/dlogp, k = df/dentropy on (C,) tensors.
        with torch.enable_grad():
            lp = logp.detach().requires_grad_(True)
            en = ent.detach().requires_grad_(entropy)
            tok, st = token_loss_fn(lp, en, **_slice_args(token_args, c0, c1))
            tok = torch.where(valid[c0:c1], tok, torch.zeros((), dtype=tok.dtype, device=tok.device))
            total = tok.sum()
        g = k = None
        if (need_h or need_w) and total.requires_grad:
            grads = torch.autograd.grad(total, (lp, en) if entropy else (lp,), allow_unused=True)
            g, k = grads if entropy else (grads[0], None)
        loss += total.detach()
        for name, val in st.items():
            extra.setdefault(name, []).append(val.detach().to(torch.float32))
        if g is None and k is None:  # the loss does not depend on logp or entropy here
            if need_h:
                grad_h[c0:c1].zero_()
            continue
        if g is None:
            g = torch.zeros_like(lp)
        dl = chunk_dlogits(z, y_c, lse, ez, g, k, h_c, scale, ignore_index, triton_path)
        del z  # free the fp32 logits before the two matmuls
        chunk_apply_grads(dl, h_c, w_mm, triton_path, grad_h[c0:c1] if need_h else None, grad_w)
        del dl
    stats = {"logp": logp_all, "entropy": ent_all} if entropy else {"logp": logp_all}
    stats.update({name: torch.cat(vals) for name, vals in extra.items()})
    if grad_w is not None:
        grad_w = grad_w.to(grad_w_dtype or weight.dtype)  # no copy when the dtypes agree
    return loss.to(torch.float32), stats, grad_h, grad_w


class FusedLinearLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_loss_fn, token_args, temperature, ignore_index,
                chunk_size, need_h, need_w, entropy, stats_out, weight_compute):
        # weight_compute: the (detached) half-precision cast the matmuls read when `weight` is the fp32
        # master parameter it was cast from (utils.fp32_master); the gradient is then weight's, fp32.
        loss, stats, grad_h, grad_w = run_fused_linear_loss(
            hidden, weight if weight_compute is None else weight_compute, targets, token_loss_fn,
            token_args, temperature, ignore_index, chunk_size, need_h, need_w, entropy, weight.dtype)
        stats_out.update(stats)
        ctx.grads = (grad_h, grad_w)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("a grad-in-forward loss (kernels.fused_linear_loss) supports one backward "
                               "per forward; call the loss again instead of retain_graph=True")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        # d(c * loss)/dx = c * dloss/dx: scale the stored gradients in place (no sync, no copy).
        if grad_h is not None:
            grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w.mul_(grad_loss.to(grad_w.dtype))
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None, None, None


def check_token_args(token_args, n, device):
    out = {}
    for name, a in (token_args or {}).items():
        if a is None or (isinstance(a, torch.Tensor) and a.dim() == 0):
            out[name] = a
        else:
            out[name] = utils.per_token(name, a, n, device)
    return out


def fused_linear_loss(hidden, weight, targets, token_loss_fn, token_args=None, *, temperature=1.0,
                      ignore_index=-100, chunk_size=None):
    """Loss = sum over non-ignored tokens of token_loss_fn(logp, entropy, **token_args), with the
    gradients w.r.t. hidden and weight formed during the forward pass (6 N H V FLOPs).

    hidden (N, H), weight (V, H), targets (N,) int64; token_args: dict of (N,) float tensors (sliced
    per chunk), 0-dim tensors or None. token_loss_fn(logp (C,), entropy (C,), **args) returns
    (per-token loss (C,), dict of per-token stats (C,)); it must be differentiable PyTorch in logp and
    entropy (it is differentiated with autograd on (C,)-sized tensors). Returns (loss 0-dim float32,
    stats: dict of detached (N,) float32 tensors: logp, entropy and the function's own stats).
    chunk_size: rows per chunk (None = kernels.utils.CHUNK_ELEMENTS logits per chunk).
    Only one backward per forward (the gradients are stored, then scaled by the upstream gradient).
    """
    utils.check_linear_inputs(hidden, weight, targets, ignore_index, temperature)
    args = check_token_args(token_args, hidden.shape[0], hidden.device)
    return apply_fused_linear_loss(hidden, weight, targets.contiguous(), token_loss_fn, args,
                                   float(temperature), ignore_index, chunk_size)


def apply_fused_linear_loss(hidden, weight, targets, token_loss_fn, token_args, temperature,
                            ignore_index, chunk_size=None, entropy=True):
    """fused_linear_loss without the input checks (for callers that already ran them);
    entropy=False when token_loss_fn ignores its entropy argument (cross-entropy)."""
    need_h = torch.is_grad_enabled() and hidden.requires_grad
    need_w = torch.is_grad_enabled() and weight.requires_grad
    if not (need_h or need_w):
        loss, stats, _, _ = run_fused_linear_loss(hidden, weight, targets, token_loss_fn, token_args,
                                                  temperature, ignore_index, chunk_size, False, False,
                                                  entropy)
        return loss, stats
    stats = {}
    # weight = param.to(bf16) of an fp32 parameter: differentiate w.r.t. param itself, so that the fp32
    # accumulator becomes param.grad (no bf16 round trip, no extra (V, H) copies; utils.fp32_master).
    master = utils.fp32_master(weight) if need_w else None
    loss = FusedLinearLossFunction.apply(hidden, weight if master is None else master, targets,
                                         token_loss_fn, token_args, temperature, ignore_index,
                                         chunk_size, need_h, need_w, entropy, stats,
                                         None if master is None else weight.detach())
    return loss, stats


def fused_linear_loss_reference(hidden, weight, targets, token_loss_fn, token_args=None, *,
                                temperature=1.0, ignore_index=-100):
    """Unchunked reference in the inputs' dtype with ordinary autograd (materializes (N, V))."""
    logp, ent = linear_logprob_reference(hidden, weight, targets, temperature=temperature,
                                         ignore_index=ignore_index, return_entropy=True)
    tok, st = token_loss_fn(logp, ent, **(token_args or {}))
    valid = targets != ignore_index
    loss = torch.where(valid, tok, torch.zeros((), dtype=tok.dtype, device=tok.device)).sum()
    return loss, {"logp": logp.detach(), "entropy": ent.detach(),
                  **{k: v.detach() for k, v in st.items()}}
