"""Group-relative advantages and their broadcast to the tokens of a packed batch.

group_advantages: rewards (B,) in contiguous groups of G completions of one prompt.
    mean baseline:           A_i = r_i - mean_j r_j
    leave-one-out baseline:  A_i = r_i - (sum_j r_j - r_i) / (G - 1)
    scale_by_std:            A_i <- A_i / (std_j r_j + eps), std with Bessel's correction (G - 1)
broadcast_advantages: out[t] = A[seq(t)] if completion_mask[t] else 0, where seq(t) is the packed
sequence whose [cu_seqlens[s], cu_seqlens[s+1]) holds t; tokens outside every sequence get 0.
No gradients flow through either (advantages are constants of the policy loss).
Each is one Triton launch on CUDA; CPU tensors use the PyTorch reference below it.
"""

import torch
import triton
import triton.language as tl

from . import utils


@triton.jit
def _group_advantages_kernel(r_ptr, out_ptr, G, eps, SCALE_BY_STD: tl.constexpr,
                             LEAVE_ONE_OUT: tl.constexpr, BLOCK_G: tl.constexpr):
    # One program per group of G rewards.
    grp = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_G)
    inb = offs < G
    # (BLOCK_G,) with BLOCK_G = next_pow2(G): lanes past G load 0, so they add nothing to the sum
    r = tl.load(r_ptr + grp * G + offs, mask=inb, other=0.0).to(tl.float32)
    total = tl.sum(r, axis=0)
    mean = total / G
    if LEAVE_ONE_OUT:
        adv = r - (total - r) / (G - 1)
    else:
        adv = r - mean
    if SCALE_BY_STD:
        # a padded lane holds r = 0, i.e. a deviation of -mean: masked, or it would inflate the std
        dev = tl.where(inb, r - mean, 0.0)
        std = tl.sqrt(tl.sum(dev * dev, axis=0) / (G - 1))
        adv = adv / (std + eps)
    tl.store(out_ptr + grp * G + offs, adv, mask=inb)


@triton.jit
def _broadcast_advantages_kernel(adv_ptr, cu_ptr, mask_ptr, out_ptr, T, S, n_steps,
                                 BLOCK: tl.constexpr):
    # One program per BLOCK tokens; each lane binary-searches cu_seqlens for its sequence:
    # the largest s in [0, S) with cu[s] <= t, kept in [lo, hi) while hi - lo > 1.
    pid = tl.program_id(0).to(tl.int64)
    t = pid * BLOCK + tl.arange(0, BLOCK)
    inb = t < T
    lo = tl.zeros([BLOCK], dtype=tl.int64)
    hi = tl.zeros([BLOCK], dtype=tl.int64) + S
    for _ in range(n_steps):  # n_steps = bit_length(S) >= ceil(log2 S) halvings
        active = (hi - lo) > 1
        mid = (lo + hi) // 2
        c = tl.load(cu_ptr + mid, mask=inb & active, other=0).to(tl.int64)
        lo = tl.where(active & (c <= t), mid, lo)
        hi = tl.where(active & (c > t), mid, hi)
    start = tl.load(cu_ptr + lo, mask=inb, other=0).to(tl.int64)
    end = tl.load(cu_ptr + lo + 1, mask=inb, other=0).to(tl.int64)
    # the search clamps to a real sequence; a token before cu[0] or after cu[S] (padding) is in none
    keep = inb & (t >= start) & (t < end) & (tl.load(mask_ptr + t, mask=inb, other=0) != 0)
    a = tl.load(adv_ptr + lo, mask=keep, other=0.0).to(tl.float32)
    tl.store(out_ptr + t, tl.where(keep, a, 0.0), mask=inb)


def group_advantages(rewards, group_size, *, scale_by_std=False, leave_one_out=False, eps=1e-6):
    """Group-relative advantages (B,) float32 for rewards (B,) in contiguous groups of group_size.

    Baseline: the group mean, or with leave_one_out the mean of the other G - 1 rewards. With
    scale_by_std the advantage is divided by (the group's sample std + eps).
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError("rewards must be a 1-D tensor (B,) of floats, got "
                         f"{getattr(rewards, 'shape', type(rewards).__name__)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a float tensor, got {rewards.dtype}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    b = rewards.shape[0]
    if b % group_size:
        raise ValueError(f"rewards has {b} entries, not a multiple of group_size={group_size}")
    if (leave_one_out or scale_by_std) and group_size < 2:
        raise ValueError("leave_one_out and scale_by_std need group_size >= 2, got group_size=1")
    rewards = rewards.detach().contiguous()
    if not utils.use_triton(rewards):
        return group_advantages_reference(rewards, group_size, scale_by_std=scale_by_std,
                                          leave_one_out=leave_one_out, eps=eps)
    out = torch.empty(b, device=rewards.device, dtype=torch.float32)
    if b:
        _group_advantages_kernel[(b // group_size,)](
            rewards, out, group_size, float(eps), SCALE_BY_STD=bool(scale_by_std),
            LEAVE_ONE_OUT=bool(leave_one_out), BLOCK_G=triton.next_power_of_2(group_size))
    return out


def group_advantages_reference(rewards, group_size, *, scale_by_std=False, leave_one_out=False,
                               eps=1e-6):
    # float64 stays float64 (the tests' reference); bf16/fp16 rewards are averaged in float32, as the kernel does
    r = rewards.to(torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    r = r.view(-1, group_size)                                    # (B/G, G)
    if leave_one_out:
        adv = r - (r.sum(1, keepdim=True) - r) / (group_size - 1)
    else:
        adv = r - r.mean(1, keepdim=True)
    if scale_by_std:
        adv = adv / (r.std(1, keepdim=True) + eps)
    return adv.reshape(-1).to(torch.float32)


def broadcast_advantages(advantages, cu_seqlens, completion_mask):
    """Per-token advantages (T,) float32 of a packed batch: advantages (S,) one per sequence,
    cu_seqlens (S+1,) int offsets of the sequences in the T tokens, completion_mask (T,) bool.
    out[t] = advantages[s] for t in [cu_seqlens[s], cu_seqlens[s+1]) where completion_mask[t], else 0.
    """
    for name, x in (("advantages", advantages), ("cu_seqlens", cu_seqlens),
                    ("completion_mask", completion_mask)):
        if not isinstance(x, torch.Tensor) or x.dim() != 1:
            raise ValueError(f"{name} must be a 1-D tensor, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
    s = advantages.shape[0]
    if not advantages.is_floating_point():
        raise ValueError(f"advantages must be a float tensor (S,), got {advantages.dtype}")
    if cu_seqlens.shape != (s + 1,):
        raise ValueError(f"cu_seqlens must have shape (S+1={s + 1},) for S={s} advantages, got "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if completion_mask.dtype != torch.bool:
        raise ValueError(f"completion_mask must be a bool tensor (T,), got {completion_mask.dtype}")
    if not (advantages.device == cu_seqlens.device == completion_mask.device):
        raise ValueError(f"advantages, cu_seqlens and completion_mask must be on one device, got "
                         f"{advantages.device}, {cu_seqlens.device}, {completion_mask.device}")
    t_len = completion_mask.shape[0]
    if utils.should_check_targets(cu_seqlens):  # value checks: on CPU (a host sync on CUDA)
        if s and bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError("cu_seqlens must be non-decreasing (offsets of consecutive sequences)")
        if bool(cu_seqlens[0] < 0) or bool(cu_seqlens[-1] > t_len):
            raise ValueError(f"cu_seqlens must lie in [0, T={t_len}], got [{int(cu_seqlens[0])}, "
                             f"{int(cu_seqlens[-1])}]")
    advantages = advantages.detach().contiguous()
    cu_seqlens = cu_seqlens.contiguous()
    completion_mask = completion_mask.contiguous()
    if not utils.use_triton(advantages):
        return broadcast_advantages_reference(advantages, cu_seqlens, completion_mask)
    out = torch.empty(t_len, device=advantages.device, dtype=torch.float32)
    if t_len == 0:
        return out
    if s == 0:
        return out.zero_()
    block = 1024  # tokens per program: each lane's search is log2(S) loads, so a block is cheap at any S
    # the bool mask goes in as its uint8 view: the same bytes, no conversion copy (the kernel tests != 0)
    _broadcast_advantages_kernel[(triton.cdiv(t_len, block),)](
        advantages, cu_seqlens, completion_mask.view(torch.uint8), out, t_len, s,
        max(1, s.bit_length()), BLOCK=block)
    return out


def broadcast_advantages_reference(advantages, cu_seqlens, completion_mask):
    t_len, s = completion_mask.shape[0], advantages.shape[0]
    if s == 0:
        return torch.zeros(t_len, device=advantages.device, dtype=torch.float32)
    t = torch.arange(t_len, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    seq = torch.searchsorted(cu_seqlens[1:].contiguous(), t, right=True)    # (T,) first end > t
    inside = (t >= cu_seqlens[0]) & (seq < s)
    # (T,) gathered per token; seq == S (past the last sequence) is clamped only to index safely: masked below
    a = advantages.to(torch.float32)[seq.clamp(max=s - 1)]
    return torch.where(inside & completion_mask, a, torch.zeros((), device=a.device))
