"""Per-token log-probs (and entropies) of the targets through the lm head, without the (N, V) logits.

Math (z = logits of one row after the temperature, y = its target):
    z_v      = (h . W_v) / T                        h (H,), W (V, H), T = temperature
    lse      = log sum_v exp(z_v)
    logp     = z_y - lse
    p_v      = exp(z_v - lse)
    E[z]     = sum_v p_v z_v
    entropy  = lse - E[z] = -sum_v p_v log p_v
Derivatives, for a loss L with g = dL/dlogp and k = dL/dentropy of that row:
    dlogp/dz_v     = onehot(y)_v - p_v
    dentropy/dz_v  = -p_v (z_v - E[z])
    dL/dz_v        = g (onehot(y)_v - p_v) - k p_v (z_v - E[z])           ("dlogits")
    dL/dh = (dL/dz) W / T,   dL/dW = (dL/dz)^T h / T                     (the 1/T goes into dlogits)

Layout: the rows are processed in chunks of C rows. Per chunk cuBLAS writes the raw logits h_c W^T
in fp32 (C, V); a Triton row kernel sweeps the vocabulary in tiles with an online max / sum-exp /
sum p*z (lse, logp, entropy, E[z]); a second Triton pass writes dlogits in the matmul dtype; cuBLAS
forms grad_h_c = dlogits W, and grad_W += dlogits^T h_c is accumulated in fp32 (cuBLAS addmm with an
fp32 output where this torch allows an fp32 accumulator with bf16 operands, else our Triton GEMM).
Memory: O(N H + C V) plus the fp32 weight-gradient accumulator (V H), which is the weight's gradient
itself when the weight is a bf16 cast of an fp32 master parameter (utils.fp32_master: it becomes
param.grad, no further copy).

This file: the row kernels and the accumulating GEMM, their launchers and pure-PyTorch twins, the
chunk helpers that fused_linear_loss.py shares, and `linear_logprob` (autograd for any upstream
gradient: the forward saves lse and E[z] per token and the backward recomputes each chunk's logits,
8 N H V FLOPs).
"""

import torch
import triton
import triton.language as tl

from . import utils

@triton.jit
def _row_stats_kernel(z_ptr, z_stride, y_ptr, lse_ptr, ez_ptr, logp_ptr, ent_ptr,
                      V, scale, ignore_index, BLOCK_V: tl.constexpr):
    # One program per row: an online pass over the vocabulary in tiles of BLOCK_V.
    # m: running max; s = sum exp(z - m); u = sum exp(z - m) (z - m). With a new max m':
    #   s' = s e^(m-m') + sum_tile e^(z-m'),  u' = e^(m-m') (u + (m - m') s) + sum_tile e^(z-m') (z-m')
    # so that lse = m + log s, E[z] = m + u/s and entropy = log s - u/s (no cancellation of large z).
    # m starts finite (-1e30), so a lane masked in every tile never computes -inf - (-inf) = NaN.
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    m = tl.full([], -1.0e30, tl.float32)
    s = tl.zeros([], tl.float32)
    u = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        inb = offs < V
        z = tl.load(z_row + offs, mask=inb, other=0.0).to(tl.float32) * scale
        z = tl.where(inb, z, -1.0e30)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        f = tl.exp(m - m_new)
        e = tl.where(inb, tl.exp(z - m_new), 0.0)
        u = f * (u + (m - m_new) * s) + tl.sum(e * (z - m_new), axis=0)
        s = s * f + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    ez = m + u / s
    ent = log_s - u / s
    y = tl.load(y_ptr + row)
    valid = y != ignore_index
    in_range = (y >= 0) & (y < V)
    # The target logit: a guarded scalar load (an out-of-range target never reads memory; it gets NaN).
    z_y = tl.load(z_row + y, mask=valid & in_range, other=0.0).to(tl.float32) * scale
    logp = tl.where(valid, tl.where(in_range, z_y - lse, float("nan")), 0.0)
    tl.store(lse_ptr + row, lse)
    tl.store(ez_ptr + row, ez)
    tl.store(logp_ptr + row, logp)
    tl.store(ent_ptr + row, tl.where(valid, ent, 0.0))


@triton.jit
def _dlogits_kernel(z_ptr, z_stride, dl_ptr, dl_stride, y_ptr, lse_ptr, ez_ptr, g_ptr, k_ptr,
                    V, scale, ignore_index, HAS_ENT: tl.constexpr, BLOCK_V: tl.constexpr):
    # dl_v = scale * [ g (onehot(y)_v - p_v) - k p_v (z_v - E[z]) ],  p_v = exp(z_v - lse); 0 if ignored.
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    dl_row = dl_ptr + row * dl_stride
    y = tl.load(y_ptr + row)
    valid = y != ignore_index
    lse = tl.load(lse_ptr + row)
    g = tl.where(valid, tl.load(g_ptr + row), 0.0)
    k = tl.where(valid, tl.load(k_ptr + row), 0.0)   # k_ptr = g_ptr when there is no entropy term
    ez = tl.load(ez_ptr + row)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        inb = offs < V
        z = tl.load(z_row + offs, mask=inb, other=0.0).to(tl.float32) * scale
        p = tl.exp(z - lse)
        d = g * (tl.where(offs == y, 1.0, 0.0) - p)
        if HAS_ENT:
            d -= k * p * (z - ez)
        d = tl.where(valid, d * scale, 0.0)
        tl.store(dl_row + offs, d.to(dl_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _grad_weight_kernel(dl_ptr, h_ptr, gw_ptr, C, V, H, stride_dl, stride_h, stride_gw,
                        BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
                        UPCAST: tl.constexpr):
    # gw[v, j] += sum_c dl[c, v] h[c, j]   (grad_W += dlogits^T h_c), one (BLOCK_V, BLOCK_H) tile of
    # the fp32 accumulator per program: read once, K = C rows accumulated in fp32, written once.
    pid = tl.program_id(0)
    n_h = tl.cdiv(H, BLOCK_H)
    offs_v = ((pid // n_h) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    offs_h = ((pid % n_h) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    mask_vh = (offs_v[:, None] < V) & (offs_h[None, :] < H)
    gw_tile = gw_ptr + offs_v[:, None] * stride_gw + offs_h[None, :]
    acc = tl.load(gw_tile, mask=mask_vh, other=0.0)
    for c0 in range(0, C, BLOCK_C):
        offs_c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        a = tl.load(dl_ptr + offs_c[None, :] * stride_dl + offs_v[:, None],           # (BV, BC) = dl^T
                    mask=(offs_v[:, None] < V) & (offs_c[None, :] < C), other=0.0)
        b = tl.load(h_ptr + offs_c[:, None] * stride_h + offs_h[None, :],             # (BC, BH)
                    mask=(offs_c[:, None] < C) & (offs_h[None, :] < H), other=0.0)
        if UPCAST:  # the interpreter's tl.dot is wrong on bf16 operands
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
    tl.store(gw_tile, acc, mask=mask_vh)


# ---- host launchers and their pure-PyTorch twins (same inputs, same outputs)

# Vocabulary tile of the row kernels; MAX_BLOCK_V (if set) caps it (the tests use it to force many tiles).
MAX_BLOCK_V = None


def _block_v(v):
    cap = MAX_BLOCK_V or (8192 if utils.interpreting() else 4096)
    return min(triton.next_power_of_2(v), cap)


def row_stats_triton(z, y, scale, ignore_index):
    """z (C, V) fp32 raw logits, y (C,) -> lse, E[z], logp, entropy, each (C,) fp32 (logits scaled)."""
    c, v = z.shape
    lse, ez, logp, ent = (torch.empty(c, device=z.device, dtype=torch.float32) for _ in range(4))
    if c:
        _row_stats_kernel[(c,)](z, z.stride(0), y, lse, ez, logp, ent, v, scale, ignore_index,
                                BLOCK_V=_block_v(v), num_warps=8)
    return lse, ez, logp, ent


def row_stats_torch(z, y, scale, ignore_index, need_entropy=True):
    # z is left as it is (chunk_dlogits reuses it); at most two (C, V) temporaries.
    zs = z * scale if scale != 1.0 else z               # (C, V) scaled logits
    lse = torch.logsumexp(zs, dim=1)                    # (C,)
    valid = y != ignore_index
    logp = zs.gather(1, torch.where(valid, y, 0).long()[:, None]).squeeze(1) - lse
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    if need_entropy:
        logq = zs - lse[:, None]                        # log p
        ent = -(logq.exp().mul_(logq)).sum(dim=1)       # -sum p log p
    else:
        ent = torch.zeros_like(lse)
    ez = lse - ent                                      # E_p[z] (only used with entropy gradients)
    return lse, ez, torch.where(valid, logp, zero), torch.where(valid, ent, zero)


def dlogits_triton(z, y, lse, ez, g, k, scale, ignore_index, out_dtype):
    """dL/d(raw logits) (C, V) in out_dtype for per-row g = dL/dlogp and k = dL/dentropy (or None)."""
    c, v = z.shape
    dl = torch.empty(c, v, device=z.device, dtype=out_dtype)
    if c:
        _dlogits_kernel[(c,)](z, z.stride(0), dl, dl.stride(0), y, lse, ez, g,
                              k if k is not None else g, v, scale, ignore_index,
                              HAS_ENT=k is not None, BLOCK_V=_block_v(v), num_warps=8)
    return dl


def dlogits_torch(z, y, lse, ez, g, k, scale, ignore_index, out_dtype):
    # Overwrites z (the chunk's scratch logits) in place:
    #   d = -p (g + k (z - E[z])) + g onehot(y),  with z - E[z] = log p + entropy = log p + lse - E[z]
    valid = y != ignore_index
    g = torch.where(valid, g.to(z.dtype), 0.0)
    logq = z.mul_(scale) if scale != 1.0 else z
    logq.sub_(lse[:, None].to(z.dtype))                                 # log p, (C, V)
    if k is None:
        d = logq.exp_().mul_(-g[:, None])                                # -g p
    else:
        p = logq.exp()
        k = torch.where(valid, k.to(z.dtype), 0.0)
        d = logq.add_((lse - ez).to(z.dtype)[:, None]).mul_(k[:, None]).add_(g[:, None])
        d.mul_(p).neg_()
        del p
    d.scatter_add_(1, torch.where(valid, y, 0).long()[:, None], g[:, None])   # + g onehot(y)
    if scale != 1.0:
        d.mul_(scale)
    return d.to(out_dtype)


def grad_weight_triton(dl, h_c, gw):
    """gw (V, H) fp32 += dl^T (V, C) @ h_c (C, H) with our Triton GEMM (fp32 accumulator in place)."""
    c, v = dl.shape
    hdim = h_c.shape[1]
    if c == 0:
        return
    bv, bh, bc = 128, 128, 32
    if utils.interpreting():  # few, large programs run fastest in the interpreter
        bv, bh, bc = 256, max(16, min(128, triton.next_power_of_2(hdim))), 64
    grid = (triton.cdiv(v, bv) * triton.cdiv(hdim, bh),)
    _grad_weight_kernel[grid](dl, h_c, gw, c, v, hdim, dl.stride(0), h_c.stride(0), gw.stride(0),
                              BLOCK_V=bv, BLOCK_H=bh, BLOCK_C=bc, UPCAST=utils.interpreting(),
                              num_warps=8, num_stages=3)


_CUBLAS_FP32_ACC = {}  # device type -> whether torch.addmm(fp32 acc, bf16, bf16, out_dtype=fp32) works


def accumulate_grad_weight(dl, h_c, gw, triton_path):
    """gw (V, H) (fp32, or fp64 for fp64 inputs) += dl^T @ h_c, accumulated in gw's precision."""
    if utils.native_mm(h_c):
        mode = utils.GRAD_W_GEMM
        if mode in ("auto", "cublas") and _CUBLAS_FP32_ACC.get("cuda", True):
            try:  # cuBLAS: C (fp32) = C + A B with bf16 A, B (torch >= 2.8 builds that allow it)
                torch.addmm(gw, dl.t(), h_c, out_dtype=torch.float32, out=gw)
                _CUBLAS_FP32_ACC["cuda"] = True
                return
            except RuntimeError:
                if mode == "cublas":
                    raise
                _CUBLAS_FP32_ACC["cuda"] = False
        grad_weight_triton(dl, h_c, gw)
    elif triton_path and dl.dtype in (torch.float16, torch.bfloat16):
        grad_weight_triton(dl.contiguous(), h_c.contiguous(), gw)  # the interpreter runs the GEMM too
    else:
        gw.addmm_(dl.t().to(gw.dtype), h_c.to(gw.dtype))


# ---- chunk helpers shared with fused_linear_loss.py

def chunk_stats(h_c, w_mm, y_c, scale, ignore_index, triton_path, need_entropy=True):
    """Raw logits (C, V) of one chunk and its (lse, E[z], logp, entropy). need_entropy=False lets
    the PyTorch path skip the entropy (then 0); the Triton kernel always computes it (nearly free)."""
    z = utils.logits_mm(h_c, w_mm)
    if triton_path:
        return z, row_stats_triton(z, y_c, scale, ignore_index)
    return z, row_stats_torch(z, y_c, scale, ignore_index, need_entropy)


def chunk_dlogits(z, y_c, lse, ez, g, k, h_c, scale, ignore_index, triton_path):
    """dL/d(raw logits) (C, V) of one chunk. The PyTorch path overwrites z; the caller drops z after."""
    # dlogits in the matmul dtype: the input dtype for CUDA half types (cuBLAS reads bf16 at full speed),
    # the input dtype on the Triton path elsewhere too (so the interpreter exercises the same stores),
    # and the compute dtype (fp32/fp64) on the pure-PyTorch path.
    out_dtype = h_c.dtype if (triton_path or utils.native_mm(h_c)) else z.dtype
    if triton_path:  # the kernel reads g[row], k[row]: dense fp32 (autograd may hand over expanded views)
        g = g.to(torch.float32).contiguous()
        k = None if k is None else k.to(torch.float32).contiguous()
        return dlogits_triton(z, y_c, lse, ez, g, k, scale, ignore_index, out_dtype)
    return dlogits_torch(z, y_c, lse, ez, g, k, scale, ignore_index, out_dtype)


def chunk_apply_grads(dl, h_c, w_mm, triton_path, grad_h_c, grad_w):
    """grad_h_c (C, H) = dl W (if not None); grad_w (V, H) fp32 += dl^T h_c (if not None)."""
    if grad_h_c is not None:
        utils.grad_hidden_mm(dl, w_mm, grad_h_c)
    if grad_w is not None:
        accumulate_grad_weight(dl, h_c, grad_w, triton_path)


# ---- autograd: forward saves lse and E[z]; backward recomputes each chunk's logits

class LinearLogprobFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, return_entropy, chunk_size,
                weight_compute=None):
        # weight_compute: the detached half-precision cast the matmuls use when `weight` is the fp32
        # master parameter it was cast from (utils.fp32_master): the backward's fp32 accumulator is
        # then returned as weight's gradient as it is.
        ctx.grad_w_dtype = weight.dtype
        if weight_compute is not None:
            weight = weight_compute
        n, v = hidden.shape[0], weight.shape[0]
        triton_path = utils.use_triton(hidden)
        scale = 1.0 / temperature
        w_mm = utils.mm_weight(weight)
        rows = utils.chunk_rows(n, v, hidden.device, chunk_size)
        # lse and E[z] are kept in fp64 for fp64 inputs on the PyTorch path (an exact oracle there)
        sdt = torch.float64 if (hidden.dtype == torch.float64 and not triton_path) else torch.float32
        lse, ez = (torch.empty(n, device=hidden.device, dtype=sdt) for _ in range(2))
        logp, ent = (torch.empty(n, device=hidden.device, dtype=torch.float32) for _ in range(2))
        for c0 in range(0, n, rows):
            c1 = min(c0 + rows, n)
            _, st = chunk_stats(hidden[c0:c1], w_mm, targets[c0:c1], scale, ignore_index, triton_path,
                                return_entropy)
            for buf, val in zip((lse, ez, logp, ent), st):
                buf[c0:c1] = val
        ctx.save_for_backward(hidden, weight, targets, lse, ez)
        ctx.cfg = (scale, ignore_index, return_entropy, rows, triton_path)
        if return_entropy:
            return logp, ent
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, ez = ctx.saved_tensors
        scale, ignore_index, return_entropy, rows, triton_path = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hidden.shape[0]
        w_mm = utils.mm_weight(weight)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, device=weight.device,
                             dtype=utils.compute_dtype(weight)) if need_w else None
        g_logp = g_logp.to(torch.float32).contiguous()
        k = g_ent.to(torch.float32).contiguous() if (return_entropy and g_ent is not None) else None
        for c0 in range(0, n, rows):
            c1 = min(c0 + rows, n)
            h_c = hidden[c0:c1]
            z = utils.logits_mm(h_c, w_mm)
            dl = chunk_dlogits(z, targets[c0:c1], lse[c0:c1], ez[c0:c1], g_logp[c0:c1],
                               None if k is None else k[c0:c1], h_c, scale, ignore_index, triton_path)
            del z  # free the fp32 logits before the two matmuls
            chunk_apply_grads(dl, h_c, w_mm, triton_path, None if grad_h is None else grad_h[c0:c1],
                              grad_w)
            del dl
        if grad_w is not None:
            grad_w = grad_w.to(ctx.grad_w_dtype)  # no copy for an fp32 master parameter
        return grad_h, grad_w, None, None, None, None, None, None


def linear_logprob(hidden, weight, targets, *, temperature=1.0, ignore_index=-100,
                   return_entropy=False):
    """Log-probability of each target under softmax(hidden @ weight.T / temperature).

    hidden (N, H) and weight (V, H) of one float dtype, targets (N,) int64. Returns logp (N,) float32
    (and entropy (N,) float32 if return_entropy); tokens whose target is ignore_index give 0 and get
    no gradient. Differentiable w.r.t. hidden and weight for any upstream gradient; never holds an
    (N, V) tensor. CUDA tensors run the Triton kernels, CPU tensors the pure-PyTorch path.
    """
    utils.check_linear_inputs(hidden, weight, targets, ignore_index, temperature)
    master = utils.fp32_master(weight) if torch.is_grad_enabled() else None
    logp, ent = LinearLogprobFunction.apply(hidden, weight if master is None else master,
                                            targets.contiguous(), float(temperature), ignore_index,
                                            bool(return_entropy), None,
                                            None if master is None else weight.detach())
    return (logp, ent) if return_entropy else logp


def linear_logprob_reference(hidden, weight, targets, *, temperature=1.0, ignore_index=-100,
                             return_entropy=False):
    """Unchunked reference in the inputs' dtype (materializes (N, V)); the tests' float64 oracle."""
    z = (hidden @ weight.t()) / temperature
    logq = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    logp = logq.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1) * valid
    if not return_entropy:
        return logp
    return logp, -(logq.exp() * logq).sum(-1) * valid
