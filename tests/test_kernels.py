"""kernels/ against float64 oracles written here from the math (not from kernels/ code).

- CPU tensors: the pure-PyTorch path (chunked), forward and both gradients, odd shapes, ignored
  targets, temperature != 1, large logits, every policy-loss variant, advantages, bad input.
- test_interp_*: the Triton kernels on the CPU under TRITON_INTERPRET=1. The variable must be set
  before triton decorates the kernels, so test_triton_path_in_subprocess re-runs this file in a child
  process with TRITON_INTERPRET=1 KERNELS_BACKEND=triton and `-k interp`; in this process they skip.
- @pytest.mark.cuda: the Triton path on a GPU at real shapes (H=2560, V=151936, bf16); skipped here.
Tolerances (shared/KERNELS.md): logp relative error <= 2e-4 with bf16 inputs; gradients <= 1e-2
relative (bf16) and <= 1e-5 (fp32 inputs). Errors are norm-wise: |a - b| / |b|.
"""

import importlib
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import kernels
from kernels import utils

ll_mod = importlib.import_module("kernels.linear_logprob")  # the module (the package exports the function)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERP = utils.interpreting() and utils.BACKEND == "triton"
interp_only = pytest.mark.skipif(not INTERP, reason="runs in the TRITON_INTERPRET=1 subprocess")
TOL_GRAD = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


# ---- float64 oracles, straight from the math

def oracle(hidden, weight, targets, token_fn, *, temperature=1.0, ignore_index=-100, chunk=None):
    """loss = sum over non-ignored t of token_fn(logp, entropy)[t], in float64 with autograd.

    Returns (loss, logp, entropy, grad_hidden, grad_weight), all float64 and detached. Row chunks
    (chunk=None: all rows at once) keep GPU memory bounded at real shapes; each chunk's loss is an
    independent sum, so chunked autograd gives the exact gradients.
    """
    n = hidden.shape[0]
    w = weight.detach().double().requires_grad_(True)
    chunk = chunk or max(n, 1)
    loss = torch.zeros((), dtype=torch.float64, device=hidden.device)
    logps, ents, grads_h = [], [], []
    for c0 in range(0, n, chunk):
        h = hidden[c0:c0 + chunk].detach().double().requires_grad_(True)
        y = targets[c0:c0 + chunk]
        logq = torch.log_softmax(h @ w.t() / temperature, dim=-1)       # (C, V)
        valid = y != ignore_index
        logp = torch.where(valid, logq.gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1), 0.0)
        ent = torch.where(valid, -(logq.exp() * logq).sum(-1), 0.0)
        tok = token_fn(logp, ent, slice(c0, c0 + chunk))
        part = torch.where(valid, tok, 0.0).sum()
        part.backward()
        loss += part.detach()
        logps.append(logp.detach())
        ents.append(ent.detach())
        grads_h.append(h.grad)
    cat = (lambda xs: torch.cat(xs)) if n else (lambda xs: torch.zeros(0, dtype=torch.float64))
    gw = w.grad if w.grad is not None else torch.zeros_like(w)
    return loss, cat(logps), cat(ents), cat(grads_h), gw


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def make_inputs(n, h, v, dtype=torch.float32, device="cpu", logit_scale=4.0, ignore_frac=0.2, seed=0):
    """hidden, weight with logits of std about logit_scale; ~ignore_frac of the targets ignored."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g) * (logit_scale / h ** 0.5)
    weight = torch.randn(v, h, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore_frac] = -100
    hidden = hidden.to(dtype=dtype, device=device).requires_grad_(True)
    weight = weight.to(dtype=dtype, device=device).requires_grad_(True)
    return hidden, weight, targets.to(device)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16-100 rows, so every multi-row test crosses chunk boundaries with a ragged tail."""
    monkeypatch.setitem(utils.CHUNK_ELEMENTS, "cpu", 1)        # -> the 16-row floor
    monkeypatch.setitem(utils.CHUNK_ELEMENTS, "cuda", 1 << 26)


def check_logprob(n, h, v, dtype, temperature, logit_scale=4.0, device="cpu", tol_logp=None,
                  ent_atol=1e-5, grad_tol=None):
    hidden, weight, targets = make_inputs(n, h, v, dtype, device, logit_scale=logit_scale)
    g = torch.Generator().manual_seed(1)
    up_logp = torch.randn(n, generator=g).to(device)
    up_ent = torch.randn(n, generator=g).to(device)
    logp, ent = kernels.linear_logprob(hidden, weight, targets, temperature=temperature,
                                       return_entropy=True)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == (n,)
    (logp * up_logp + ent * up_ent).sum().backward()
    _, o_logp, o_ent, o_gh, o_gw = oracle(
        hidden, weight, targets, lambda lp, en, s: lp * up_logp[s].double() + en * up_ent[s].double(),
        temperature=temperature)
    ignored = targets == -100
    assert torch.all(logp[ignored] == 0) and torch.all(ent[ignored] == 0)
    if n:
        tol = tol_logp or (2e-4 if dtype != torch.float32 else 1e-5)
        assert rel(logp, o_logp) < tol
        # entropy: absolute plus relative. With logits ~1e3 the fp32 logits themselves (any fp32
        # matmul) are off by ~1e-4 absolute, which moves near-tied rows' entropy and p by as much:
        # those tests pass ent_atol=1e-3 and grad_tol=1e-4.
        e_tol = 1e-2 if dtype != torch.float32 else 1e-5
        assert ((ent.double() - o_ent).abs() <= ent_atol + e_tol * o_ent.abs()).all()
        assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
        grad_tol = grad_tol or TOL_GRAD[dtype]
        assert rel(hidden.grad, o_gh) < grad_tol
        assert rel(weight.grad, o_gw) < grad_tol
        assert torch.all(hidden.grad[ignored] == 0)


# ---- linear_logprob (pure-PyTorch path on CPU)

@pytest.mark.parametrize("n,h,v", [(1, 16, 97), (7, 24, 1000), (1023, 16, 257)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_logprob_matches_oracle(small_chunks, n, h, v, temperature):
    check_logprob(n, h, v, torch.float32, temperature)


def test_linear_logprob_bf16(small_chunks):
    check_logprob(300, 64, 1000, torch.bfloat16, 1.3)


def test_linear_logprob_large_logits(small_chunks):
    # logits of magnitude ~1e3: the softmax is nearly one-hot; lse and entropy must not overflow.
    check_logprob(64, 32, 500, torch.float32, 1.0, logit_scale=1e3, ent_atol=1e-3,
                  grad_tol=1e-4)


def test_linear_logprob_only_logp_and_partial_grads():
    hidden, weight, targets = make_inputs(40, 16, 300)
    weight.requires_grad_(False)                               # e.g. a frozen (tied) lm head
    logp = kernels.linear_logprob(hidden, weight, targets)
    assert isinstance(logp, torch.Tensor) and logp.shape == (40,)
    logp.sum().backward()
    _, o_logp, _, o_gh, _ = oracle(hidden, weight, targets, lambda lp, en, s: lp)
    assert weight.grad is None and rel(hidden.grad, o_gh) < 1e-5 and rel(logp, o_logp) < 1e-5
    with torch.no_grad():                                      # eval: no graph, same numbers
        assert torch.equal(kernels.linear_logprob(hidden, weight, targets), logp.detach())


def test_never_materializes_n_by_v(monkeypatch):
    # Every logits matmul covers at most one chunk of rows, never all N rows at once.
    monkeypatch.setitem(utils.CHUNK_ELEMENTS, "cpu", 64 * 500)
    shapes = []
    real = utils.logits_mm
    monkeypatch.setattr(utils, "logits_mm", lambda h, w: shapes.append(tuple(h.shape)) or real(h, w))
    hidden, weight, targets = make_inputs(1000, 16, 500)
    kernels.linear_cross_entropy(hidden, weight, targets).backward()
    kernels.linear_logprob(hidden, weight, targets).sum().backward()
    assert shapes and max(s[0] for s in shapes) == 64
    assert sum(s[0] for s in shapes) == 3 * 1000              # CE once (6NHV), logprob fwd + recompute


# ---- grad-in-forward losses

@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_linear_cross_entropy(small_chunks, reduction, weighted):
    n = 333
    hidden, weight, targets = make_inputs(n, 32, 1001, seed=2)
    w = torch.rand(n) if weighted else None
    loss = kernels.linear_cross_entropy(hidden, weight, targets, temperature=0.8,
                                        reduction=reduction, token_weights=w)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    loss.backward()
    d = (targets != -100).sum().double() if reduction == "mean" else 1.0
    ww = w.double() if weighted else torch.ones(n, dtype=torch.float64)
    o_loss, _, _, o_gh, o_gw = oracle(hidden, weight, targets, lambda lp, en, s: -lp * ww[s] / d,
                                      temperature=0.8)
    assert rel(loss, o_loss) < 1e-6
    assert rel(hidden.grad, o_gh) < 1e-5 and rel(weight.grad, o_gw) < 1e-5


def test_cross_entropy_matches_torch_and_edge_cases():
    hidden, weight, targets = make_inputs(50, 16, 200)
    ref = torch.nn.functional.cross_entropy((hidden @ weight.t()).double(), targets)
    assert abs(kernels.linear_cross_entropy(hidden, weight, targets).item() - ref.item()) < 1e-5
    # all targets ignored: loss 0 (not NaN) and zero gradients
    h2, w2, _ = make_inputs(5, 16, 200)
    loss = kernels.linear_cross_entropy(h2, w2, torch.full((5,), -100))
    loss.backward()
    assert loss.item() == 0 and h2.grad.abs().sum() == 0 and w2.grad.abs().sum() == 0
    # N = 0
    h3, w3, _ = make_inputs(0, 16, 200)
    assert kernels.linear_cross_entropy(h3, w3, torch.zeros(0, dtype=torch.long)).item() == 0
    # the upstream gradient scales the stored gradients
    h4, w4, t4 = make_inputs(20, 16, 200)
    (3.0 * kernels.linear_cross_entropy(h4, w4, t4, reduction="sum")).backward()
    _, _, _, o_gh, o_gw = oracle(h4, w4, t4, lambda lp, en, s: -3.0 * lp)
    assert rel(h4.grad, o_gh) < 1e-5 and rel(w4.grad, o_gw) < 1e-5


def policy_oracle_fn(adv, old, w, ref, cfg):
    """The contract's per-token policy loss in float64, written independently of kernels/."""
    mode, cap, lo, hi = cfg["ratio_mode"], cfg["ratio_cap"], cfg["clip_low"], cfg["clip_high"]
    beta, ec = cfg["kl_beta"], cfg["entropy_coef"]

    def fn(lp, en, s):
        a, o, ww = adv[s].double(), old[s].double(), w[s].double()
        r = torch.exp(lp - o)
        if mode == "truncate":
            pg = -torch.clamp(r, max=cap).detach() * a * lp
        elif mode == "cispo":
            pg = -torch.clamp(r, 1 - lo, 1 + hi).detach() * a * lp
        else:
            pg = -torch.minimum(r * a, torch.clamp(r, 1 - lo, 1 + hi) * a)
        out = pg - ec * en
        if ref is not None and beta > 0:
            d = ref[s].double() - lp
            out = out + beta * (torch.exp(d) - d - 1)
        return ww * out
    return fn


POLICY_CASES = [
    dict(ratio_mode="truncate", ratio_cap=2.0, clip_low=0.2, clip_high=0.2, kl_beta=0.0, entropy_coef=0.0),
    dict(ratio_mode="truncate", ratio_cap=1.1, clip_low=0.2, clip_high=0.2, kl_beta=0.05, entropy_coef=1e-2),
    dict(ratio_mode="ppo", ratio_cap=2.0, clip_low=0.1, clip_high=0.28, kl_beta=0.0, entropy_coef=0.0),
    dict(ratio_mode="ppo", ratio_cap=2.0, clip_low=0.2, clip_high=0.3, kl_beta=0.1, entropy_coef=0.05),
    dict(ratio_mode="cispo", ratio_cap=2.0, clip_low=0.2, clip_high=0.28, kl_beta=0.0, entropy_coef=0.0),
]


def policy_inputs(n, hidden, weight, targets, temperature, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        true_logp = kernels.linear_logprob(hidden.detach(), weight.detach(), targets,
                                           temperature=temperature).cpu()
    old = (true_logp + 0.4 * torch.randn(n, generator=g)).to(hidden.device)   # ratios ~ exp(N(0, .4))
    ref = (true_logp + 0.3 * torch.randn(n, generator=g)).to(hidden.device)
    adv = torch.randn(n, generator=g).to(hidden.device)
    w = (torch.rand(n, generator=g) * (torch.rand(n, generator=g) > 0.1)).to(hidden.device)
    return adv, old, w, ref


def check_policy(cfg, n=257, h=32, v=777, dtype=torch.float32, device="cpu"):
    hidden, weight, targets = make_inputs(n, h, v, dtype, device, seed=4)
    adv, old, w, ref = policy_inputs(n, hidden, weight, targets, 0.9)
    loss, stats = kernels.linear_policy_loss(hidden, weight, targets, advantages=adv, old_logp=old,
                                             token_weights=w, ref_logp=ref, temperature=0.9, **cfg)
    loss.backward()
    o_loss, o_logp, o_ent, o_gh, o_gw = oracle(hidden, weight, targets,
                                               policy_oracle_fn(adv, old, w, ref, cfg), temperature=0.9)
    tol = TOL_GRAD[dtype]
    assert loss.dtype == torch.float32 and rel(loss, o_loss) < max(tol, 1e-6)
    assert rel(hidden.grad, o_gh) < tol and rel(weight.grad, o_gw) < tol
    # stats: detached float32 (N,) tensors that agree with the oracle's quantities
    assert set(stats) >= {"logp", "entropy", "ratio", "clipped"}
    assert all(t.shape == (n,) and t.dtype == torch.float32 and not t.requires_grad
               for t in stats.values())
    assert ("kl" in stats) == (cfg["kl_beta"] > 0)
    live = (targets != -100) & (w != 0)
    assert rel(stats["logp"], o_logp) < (1e-5 if dtype == torch.float32 else 2e-4)
    r = torch.exp(o_logp - old.double())
    assert rel(stats["ratio"][live], r[live]) < (1e-5 if dtype == torch.float32 else 1e-3)
    if cfg["ratio_mode"] == "truncate":
        clip = r > cfg["ratio_cap"]
    elif cfg["ratio_mode"] == "cispo":
        clip = (r > 1 + cfg["clip_high"]) | (r < 1 - cfg["clip_low"])
    else:
        clip = ((adv > 0) & (r > 1 + cfg["clip_high"])) | ((adv < 0) & (r < 1 - cfg["clip_low"]))
    agree = (stats["clipped"][live] == clip[live].float()).float().mean()
    assert agree > 0.99 and 0 < stats["clipped"].sum() < live.sum()     # the clip was exercised
    assert torch.all(stats["clipped"][~live] == 0) and torch.all(stats["ratio"][~live] == 1)
    if "kl" in stats:
        d = ref.double() - o_logp
        assert rel(stats["kl"][live], (torch.exp(d) - d - 1)[live]) < 1e-3


@pytest.mark.parametrize("case", range(len(POLICY_CASES)))
def test_linear_policy_loss(small_chunks, case):
    check_policy(POLICY_CASES[case])


def test_fused_linear_loss_custom_function():
    # The generic mechanism: any differentiable per-token f(logp, entropy), explicit chunk_size.
    hidden, weight, targets = make_inputs(41, 16, 301, seed=5)
    a = torch.randn(41)

    def f(lp, en, a):
        return a * lp ** 2 + torch.sin(en), {"double": 2 * lp}

    loss, stats = kernels.fused_linear_loss(hidden, weight, targets, f, {"a": a}, temperature=1.7,
                                            chunk_size=5)
    loss.backward()
    o_loss, o_logp, _, o_gh, o_gw = oracle(hidden, weight, targets,
                                           lambda lp, en, s: a[s].double() * lp ** 2 + torch.sin(en),
                                           temperature=1.7)
    assert rel(loss, o_loss) < 1e-6 and rel(hidden.grad, o_gh) < 1e-5 and rel(weight.grad, o_gw) < 1e-5
    assert rel(stats["double"], 2 * o_logp) < 1e-6
    with pytest.raises(RuntimeError, match="one backward"):
        loss2, _ = kernels.fused_linear_loss(hidden, weight, targets, f, {"a": a})
        loss2.backward(retain_graph=True)
        loss2.backward()



# ---- the weight gradient of an fp32 master parameter (weight = param.to(bf16), as sft.py and rl.py do)

class WeightSizedAllocations(TorchDispatchMode):
    """Records every aten op that allocates a new fp32 tensor of shape `shape` (not an in-place op, not
    a view of one of its inputs), as (op name, storage pointer)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.allocs = tuple(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and tuple(t.shape) == self.shape
                    and not func._schema.is_mutable and t.untyped_storage().data_ptr() not in inputs):
                self.allocs.append((str(func), t.untyped_storage().data_ptr()))
        return out


def master_inputs(n=90, h=32, v=700, seed=11):
    hidden, weight, targets = make_inputs(n, h, v, torch.float32, seed=seed)
    master = torch.nn.Parameter(weight.detach().clone())          # fp32 master weights
    return hidden.detach().to(torch.bfloat16).requires_grad_(True), master, targets


MASTER_OPS = {
    "cross_entropy": lambda h, w, y: kernels.linear_cross_entropy(h, w, y, temperature=0.9),
    "policy": lambda h, w, y: kernels.linear_policy_loss(
        h, w, y, advantages=torch.linspace(-1, 1, len(y)), old_logp=torch.full((len(y),), -6.0),
        token_weights=torch.full((len(y),), 0.01), **POLICY_CASES[3])[0],
    "logprob": lambda h, w, y: sum(c * t for c, t in zip(
        (torch.linspace(-1, 1, len(y)), 0.3), kernels.linear_logprob(h, w, y, return_entropy=True))).sum(),
}


def run_master(op, hidden, master, targets, mode, monkeypatch, scale=None):
    monkeypatch.setattr(utils, "MASTER_GRAD", mode)
    hidden.grad = master.grad = None
    loss = MASTER_OPS[op](hidden, master.to(torch.bfloat16), targets)
    (loss if scale is None else loss * scale).backward()
    return master.grad, hidden.grad


def check_master_grad(op, monkeypatch):
    hidden, master, targets = master_inputs()
    old_gw, old_gh = (t.clone() for t in run_master(op, hidden, master, targets, "off", monkeypatch))
    gw, gh = (t.clone() for t in run_master(op, hidden, master, targets, "auto", monkeypatch))
    # The old path rounded the same fp32 accumulator to bf16 once (upstream gradient 1): identical
    # after that rounding; the new gradient is fp32 and the hidden gradient is unchanged bit for bit.
    assert old_gw.dtype == gw.dtype == torch.float32
    assert torch.equal(gw.to(torch.bfloat16).float(), old_gw) and not torch.equal(gw, old_gw)
    assert torch.equal(gh, old_gh)
    # A scaled upstream gradient: the grad-in-forward ops scale the same accumulator (one fp32
    # multiply); linear_logprob's backward takes it into its per-token gradient before the GEMM.
    gw3, _ = run_master(op, hidden, master, targets, "auto", monkeypatch, scale=torch.tensor(0.37))
    if op == "logprob":  # (the Triton path writes dlogits in bf16: the scale moves its rounding)
        assert rel(gw3, gw * 0.37) < (TOL_GRAD[torch.bfloat16] if INTERP else 1e-6)
    else:
        assert torch.equal(gw3, gw * torch.tensor(0.37))
    # Gradient accumulation: a second micro-batch adds into the existing fp32 .grad.
    monkeypatch.setattr(utils, "MASTER_GRAD", "auto")
    master.grad = gw.clone()
    MASTER_OPS[op](hidden, master.to(torch.bfloat16), targets).backward()
    assert torch.equal(master.grad, gw + gw)
    # torch.autograd.grad w.r.t. the master parameter sees the same gradient (ordinary autograd).
    master.grad = None
    (g_ag,) = torch.autograd.grad(MASTER_OPS[op](hidden.detach(), master.to(torch.bfloat16), targets),
                                  [master])
    assert master.grad is None and torch.allclose(g_ag, gw, rtol=1e-6, atol=1e-9)


def check_master_no_extra_buffer(op, monkeypatch):
    hidden, master, targets = master_inputs(n=40, v=701)
    allocs = {}
    for mode in ("off", "auto"):
        monkeypatch.setattr(utils, "MASTER_GRAD", mode)
        master.grad = None
        with WeightSizedAllocations(master.shape) as rec:
            MASTER_OPS[op](hidden, master.to(torch.bfloat16), targets).backward()
        allocs[mode] = rec.allocs
    grad_ptr = master.grad.untyped_storage().data_ptr()
    # On CPU the matmuls read an fp32 upcast of the bf16 weight (utils.mm_weight; CUDA reads the bf16
    # weight as it is): a `_to_copy` per pass over the vocabulary, the same in both modes.
    copies = {m: sum(name == "aten._to_copy.default" for name, _ in a) for m, a in allocs.items()}
    accumulators = [ptr for name, ptr in allocs["auto"] if name != "aten._to_copy.default"]
    # The one fp32 (V, H) buffer the op allocates is the accumulator, and it is master.grad itself;
    # the old path also made an fp32 copy of the gradient in the cast's backward.
    assert accumulators == [grad_ptr]
    assert copies["off"] == copies["auto"] + 1


@pytest.mark.parametrize("op", sorted(MASTER_OPS))
def test_master_grad_into_fp32_param(op, small_chunks, monkeypatch):
    check_master_grad(op, monkeypatch)


@pytest.mark.parametrize("op", sorted(MASTER_OPS))
def test_master_grad_allocates_no_extra_weight_buffer(op, small_chunks, monkeypatch):
    check_master_no_extra_buffer(op, monkeypatch)


def test_master_grad_falls_back(monkeypatch):
    hidden, master, targets = master_inputs(n=20, v=300)
    # the weight is the leaf itself (fp32 on CPU; FSDP2's bf16 unsharded parameter): today's path
    assert utils.fp32_master(master) is None
    bf16_leaf = master.detach().to(torch.bfloat16).requires_grad_(True)
    assert utils.fp32_master(bf16_leaf) is None
    kernels.linear_cross_entropy(hidden, bf16_leaf, targets).backward()
    assert bf16_leaf.grad.dtype == torch.bfloat16
    # a cast with a hook of its own must see its gradient: the gradient flows through the cast
    w = master.to(torch.bfloat16)
    seen = []
    w.register_hook(lambda g: seen.append(g.dtype))
    assert utils.fp32_master(w) is None
    kernels.linear_cross_entropy(hidden, w, targets).backward()
    assert seen == [torch.bfloat16] and master.grad.dtype == torch.float32
    # not a plain cast (a cast of a computed tensor, a reshape), or switched off: no master parameter
    assert utils.fp32_master((master * 2).to(torch.bfloat16)) is None
    assert utils.fp32_master(master.t().to(torch.bfloat16)) is None
    monkeypatch.setattr(utils, "MASTER_GRAD", "off")
    assert utils.fp32_master(master.to(torch.bfloat16)) is None
    monkeypatch.setattr(utils, "MASTER_GRAD", "sometimes")
    with pytest.raises(ValueError, match="KERNELS_MASTER_GRAD"):
        utils.fp32_master(master.to(torch.bfloat16))

# ---- advantages

def group_oracle(r, g, std, loo, eps):
    out = []
    for grp in r.double().view(-1, g).tolist():
        m = sum(grp) / g
        for i, x in enumerate(grp):
            a = x - ((sum(grp) - x) / (g - 1) if loo else m)
            if std:
                a /= (sum((y - m) ** 2 for y in grp) / (g - 1)) ** 0.5 + eps
            out.append(a)
    return torch.tensor(out, dtype=torch.float64)


def check_group_advantages(device="cpu"):
    g = torch.Generator().manual_seed(6)
    for b, gs in [(48, 16), (35, 5), (4, 4), (3, 1), (0, 4)]:
        r = (torch.rand(b, generator=g) > 0.5).float() * torch.rand(b, generator=g)
        for std in (False, True):
            for loo in (False, True):
                if gs == 1 and (std or loo):
                    continue
                out = kernels.group_advantages(r.to(device), gs, scale_by_std=std, leave_one_out=loo)
                assert out.dtype == torch.float32 and out.shape == (b,)
                assert torch.allclose(out.cpu().double(), group_oracle(r, gs, std, loo, 1e-6),
                                      atol=1e-5, rtol=1e-5)


def broadcast_oracle(adv, cu, mask):
    out = torch.zeros(mask.shape[0], dtype=torch.float64)
    for s in range(adv.shape[0]):
        for t in range(int(cu[s]), int(cu[s + 1])):
            if mask[t]:
                out[t] = float(adv[s])
    return out


def packed_batch(s, seed=7):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, 40, (s,), generator=g)
    lens[::7] = 0                                               # empty sequences
    cu = torch.cat([torch.tensor([3]), 3 + lens.cumsum(0)])    # 3 leading pad tokens
    t_len = int(cu[-1]) + 11                                    # and 11 trailing ones
    mask = torch.rand(t_len, generator=g) > 0.3
    return torch.randn(s, generator=g), cu, mask


def check_broadcast(device="cpu"):
    for s in (1, 2, 9, 300):
        adv, cu, mask = packed_batch(s)
        for cu_t in (cu, cu.to(torch.int32)):
            out = kernels.broadcast_advantages(adv.to(device), cu_t.to(device), mask.to(device))
            assert out.dtype == torch.float32
            assert torch.allclose(out.cpu().double(), broadcast_oracle(adv, cu, mask), atol=1e-7)
    empty = kernels.broadcast_advantages(torch.zeros(0, device=device),
                                         torch.zeros(1, dtype=torch.long, device=device),
                                         torch.ones(5, dtype=torch.bool, device=device))
    assert empty.shape == (5,) and torch.all(empty == 0)


def test_group_advantages():
    check_group_advantages()


def test_broadcast_advantages():
    check_broadcast()


# ---- bad input: a ValueError that names the argument

def test_bad_input_errors():
    h, w, y = make_inputs(6, 8, 50)
    h, w = h.detach(), w.detach()
    cases = [
        (lambda: kernels.linear_logprob(h[None], w, y), "hidden must be"),
        (lambda: kernels.linear_logprob(h, w[:, :4].contiguous(), y), "weight must be"),
        (lambda: kernels.linear_logprob(h, w, y[:5]), "targets must be"),
        (lambda: kernels.linear_logprob(h, w.half(), y), "weight must have hidden's dtype"),
        (lambda: kernels.linear_logprob(h.int(), w.int(), y), "hidden must be float"),
        (lambda: kernels.linear_logprob(h, w, y.float()), "targets must be int64"),
        (lambda: kernels.linear_logprob(h, w, torch.tensor([1, 2, 50, 0, -100, 3])),
         r"targets\[2\] = 50 is outside \[0, V=50\)"),
        (lambda: kernels.linear_logprob(h, w, torch.tensor([1, 2, -1, 0, 0, 3])), r"targets\[2\] = -1"),
        (lambda: kernels.linear_logprob(torch.randn(8, 6).t(), w, y), "hidden must be contiguous"),
        (lambda: kernels.linear_logprob(h, torch.randn(8, 50).t(), y), "weight must be contiguous"),
        (lambda: kernels.linear_logprob(h, w.to("meta"), y), "one device"),
        (lambda: kernels.linear_logprob(h, w, y, temperature=0.0), "temperature"),
        (lambda: kernels.linear_cross_entropy(h, w, y, reduction="none"), "reduction"),
        (lambda: kernels.linear_cross_entropy(h, w, y, token_weights=torch.ones(7)), "token_weights"),
        (lambda: kernels.linear_policy_loss(h, w, y, advantages=torch.ones(7), old_logp=torch.zeros(6),
                                            token_weights=torch.ones(6)), "advantages must have shape"),
        (lambda: kernels.linear_policy_loss(h, w, y, advantages=torch.ones(6), old_logp=torch.zeros(6),
                                            token_weights=torch.ones(6, dtype=torch.long)),
         "token_weights must be a float"),
        (lambda: kernels.linear_policy_loss(h, w, y, advantages=torch.ones(6), old_logp=torch.zeros(6),
                                            token_weights=torch.ones(6), ratio_mode="clip"), "ratio_mode"),
        (lambda: kernels.linear_policy_loss(h, w, y, advantages=torch.ones(6), old_logp=None,
                                            token_weights=torch.ones(6)), "old_logp is required"),
        (lambda: kernels.group_advantages(torch.ones(10), 4), "not a multiple of group_size=4"),
        (lambda: kernels.group_advantages(torch.ones(4), 1, leave_one_out=True), "group_size >= 2"),
        (lambda: kernels.group_advantages(torch.ones(4, dtype=torch.long), 2), "rewards must be a float"),
        (lambda: kernels.broadcast_advantages(torch.ones(2), torch.tensor([0, 3]),
                                              torch.ones(5, dtype=torch.bool)), r"cu_seqlens must have shape"),
        (lambda: kernels.broadcast_advantages(torch.ones(2), torch.tensor([0, 3, 2]),
                                              torch.ones(5, dtype=torch.bool)), "non-decreasing"),
        (lambda: kernels.broadcast_advantages(torch.ones(2), torch.tensor([0, 3, 9]),
                                              torch.ones(5, dtype=torch.bool)), r"\[0, T=5\]"),
        (lambda: kernels.broadcast_advantages(torch.ones(2), torch.tensor([0, 3, 5]),
                                              torch.ones(5)), "completion_mask must be a bool"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()


# ---- the Triton kernels under the interpreter (run by test_triton_path_in_subprocess)

@pytest.fixture
def many_tiles(monkeypatch, small_chunks):
    """Vocabulary tiles of 128 (several per row, ragged last tile) and 16-row chunks."""
    monkeypatch.setattr(ll_mod, "MAX_BLOCK_V", 128)


@interp_only
@pytest.mark.parametrize("n,dtype", [(1, torch.float32), (7, torch.float32), (64, torch.bfloat16)])
def test_interp_linear_logprob(many_tiles, n, dtype):
    assert type(ll_mod._row_stats_kernel).__name__ == "InterpretedFunction"
    check_logprob(n, 32, 1000, dtype, 0.7)


@interp_only
def test_interp_linear_logprob_1023_rows_large_logits(small_chunks):
    check_logprob(1023, 16, 300, torch.float32, 1.0, logit_scale=1e3, ent_atol=1e-3,
                  grad_tol=1e-4)


@interp_only
def test_interp_cross_entropy_and_policy(small_chunks):
    hidden, weight, targets = make_inputs(70, 32, 700, seed=8)
    w = torch.rand(70)
    kernels.linear_cross_entropy(hidden, weight, targets, temperature=1.2, token_weights=w).backward()
    d = (targets != -100).sum().double()
    _, _, _, o_gh, o_gw = oracle(hidden, weight, targets, lambda lp, en, s: -w[s].double() * lp / d,
                                 temperature=1.2)
    assert rel(hidden.grad, o_gh) < 1e-5 and rel(weight.grad, o_gw) < 1e-5
    check_policy(POLICY_CASES[1], n=90, h=32, v=700)
    check_policy(POLICY_CASES[3], n=90, h=32, v=700, dtype=torch.bfloat16)


@interp_only
def test_interp_out_of_range_target_is_nan_not_a_bad_read(monkeypatch):
    # The Triton path's guard when the (syncing) range check is off: NaN, never an out-of-bounds load.
    monkeypatch.setattr(utils, "CHECK_TARGETS", "never")
    hidden, weight, _ = make_inputs(4, 16, 100)
    logp = kernels.linear_logprob(hidden, weight, torch.tensor([5, 100, -100, 7]))
    assert torch.isnan(logp[1]) and torch.isfinite(logp[[0, 3]]).all() and logp[2] == 0


@interp_only
def test_interp_expanded_upstream_gradient(small_chunks):
    # logp.sum().backward() hands the backward a stride-0 (expanded) gradient; the kernels read it
    # row by row, so it must be made dense first.
    hidden, weight, targets = make_inputs(40, 16, 200, seed=9)
    kernels.linear_logprob(hidden, weight, targets).sum().backward()
    _, _, _, o_gh, o_gw = oracle(hidden, weight, targets, lambda lp, en, s: lp)
    assert rel(hidden.grad, o_gh) < 1e-5 and rel(weight.grad, o_gw) < 1e-5
    h2, w2, _ = make_inputs(40, 16, 200, seed=9)
    loss, stats = kernels.fused_linear_loss(h2, w2, targets, lambda lp, en: (lp, {}))
    loss.backward()
    assert rel(h2.grad, o_gh) < 1e-5 and rel(w2.grad, o_gw) < 1e-5


@interp_only
@pytest.mark.parametrize("op", sorted(MASTER_OPS))
def test_interp_master_grad(op, small_chunks, monkeypatch):
    # the Triton kernels (the weight-gradient GEMM too) with an fp32 master parameter's bf16 cast
    check_master_grad(op, monkeypatch)
    check_master_no_extra_buffer(op, monkeypatch)


@interp_only
def test_interp_advantages():
    check_group_advantages()
    check_broadcast()


def test_triton_path_in_subprocess():
    """Run the test_interp_* tests above in a child with TRITON_INTERPRET=1 KERNELS_BACKEND=triton."""
    if INTERP:
        pytest.skip("already running under the interpreter")
    env = dict(os.environ, TRITON_INTERPRET="1", KERNELS_BACKEND="triton", KERNELS_CHECK_TARGETS="auto")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           os.path.abspath(__file__), "-k", "interp"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 11 and "skipped" not in out, out[-3000:]


# ---- CUDA at real shapes (skipped without a GPU)

H_REAL, V_REAL = 2560, 151936


def real_inputs(n, seed=0):
    return make_inputs(n, H_REAL, V_REAL, torch.bfloat16, "cuda", logit_scale=6.0, ignore_frac=0.1,
                       seed=seed)


@pytest.mark.cuda
@pytest.mark.parametrize("n", [1, 4099])
def test_cuda_linear_logprob_real_shapes(n):
    hidden, weight, targets = real_inputs(n)
    up = torch.randn(n, device="cuda")
    up_e = torch.randn(n, device="cuda")
    logp, ent = kernels.linear_logprob(hidden, weight, targets, temperature=0.8, return_entropy=True)
    (logp * up + ent * up_e).sum().backward()
    _, o_logp, o_ent, o_gh, o_gw = oracle(
        hidden, weight, targets, lambda lp, en, s: lp * up[s].double() + en * up_e[s].double(),
        temperature=0.8, chunk=1024)
    assert rel(logp, o_logp) < 2e-4 and rel(ent, o_ent) < 1e-3
    assert rel(hidden.grad, o_gh) < 1e-2 and rel(weight.grad, o_gw) < 1e-2


@pytest.mark.cuda
def test_cuda_grad_in_forward_real_shapes():
    n = 8191
    hidden, weight, targets = real_inputs(n, seed=1)
    kernels.linear_cross_entropy(hidden, weight, targets).backward()
    d = (targets != -100).sum().double()
    _, _, _, o_gh, o_gw = oracle(hidden, weight, targets, lambda lp, en, s: -lp / d, chunk=1024)
    assert rel(hidden.grad, o_gh) < 1e-2 and rel(weight.grad, o_gw) < 1e-2
    check_policy(POLICY_CASES[3], n=2048, h=H_REAL, v=V_REAL, dtype=torch.bfloat16, device="cuda")


@pytest.mark.cuda
def test_cuda_long_inputs_and_no_sync():
    # 131,072 rows in one forward call and 65,536 in one grad-in-forward call; no host-device sync.
    n = 131072
    hidden, weight, targets = real_inputs(n, seed=2)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            logp = kernels.linear_logprob(hidden, weight, targets)
        h2 = hidden[: n // 2].detach().requires_grad_(True)
        loss = kernels.linear_cross_entropy(h2, weight, targets[: n // 2], reduction="sum")
        loss.backward()
        adv = kernels.group_advantages(torch.rand(1024, device="cuda"), 16)
        cu = torch.arange(0, 1025, device="cuda") * 100
        kernels.broadcast_advantages(adv, cu, torch.ones(102400, dtype=torch.bool, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rows = torch.randperm(n, device="cuda")[:2048]
    _, o_logp, _, _, _ = oracle(hidden[rows], weight, targets[rows], lambda lp, en, s: lp, chunk=1024)
    assert rel(logp[rows], o_logp) < 2e-4
    assert torch.isfinite(h2.grad).all() and torch.isfinite(weight.grad.float()).all()
    rows2 = rows[rows < n // 2][:512]
    _, _, _, o_gh, _ = oracle(hidden[rows2], weight, targets[rows2], lambda lp, en, s: -lp, chunk=512)
    assert rel(h2.grad[rows2], o_gh) < 1e-2


@pytest.mark.cuda
def test_cuda_master_grad_real_shapes(monkeypatch):
    # sft.py's setup: an fp32 master lm head cast to bf16 in each call. Its gradient lands in
    # master.grad (fp32), and the call holds no (V, H) buffer beyond it: at 32k tokens the memory beyond
    # the inputs, the weights (fp32 master, bf16 copy) and their gradients is <= 1.0 GiB (KERNELS.md).
    n = 32768
    hidden, weight, targets = real_inputs(n, seed=3)
    master = torch.nn.Parameter(weight.detach().float())
    del weight
    kernels.linear_cross_entropy(hidden, master.to(torch.bfloat16), targets, reduction="sum").backward()
    hidden.grad = master.grad = None                           # warm-up (Triton compiles), then measure
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    kernels.linear_cross_entropy(hidden, master.to(torch.bfloat16), targets, reduction="sum").backward()
    torch.cuda.synchronize()
    required = hidden.numel() * 2 + master.numel() * (4 + 2)  # hidden.grad; master.grad; the bf16 cast
    extra = (torch.cuda.max_memory_allocated() - base - required) / 2**30
    assert master.grad.dtype == torch.float32 and extra <= 1.0, f"extra {extra:.2f} GiB"
    new = master.grad
    hidden.grad = master.grad = None
    monkeypatch.setattr(utils, "MASTER_GRAD", "off")           # the old path, through the cast
    kernels.linear_cross_entropy(hidden, master.to(torch.bfloat16), targets, reduction="sum").backward()
    assert rel(new, master.grad) < 4e-3                        # the old path's bf16 rounding only


@pytest.mark.cuda
def test_cuda_advantages():
    check_group_advantages("cuda")
    check_broadcast("cuda")
    # a packed batch of 1,024 sequences x ~50k tokens in one launch
    lens = torch.randint(1, 100_000, (1024,))
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    adv = torch.randn(1024)
    mask = torch.rand(int(cu[-1])) > 0.5
    out = kernels.broadcast_advantages(adv.cuda(), cu.cuda(), mask.cuda())
    ref = torch.where(mask, adv.repeat_interleave(lens), 0.0)
    assert torch.equal(out.cpu(), ref)
