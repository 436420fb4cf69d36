"""Plumbing shared by the ops in kernels/: which backend runs, input checks, chunk sizes, matmuls.

Backend (env KERNELS_BACKEND, or set `kernels.utils.BACKEND` at run time):
  "auto"   (default) CUDA tensors -> Triton kernels, CPU tensors -> the pure-PyTorch path.
  "triton" Triton kernels everywhere; CPU tensors need TRITON_INTERPRET=1 set before triton is imported.
  "torch"  the pure-PyTorch path everywhere (also on CUDA; a debugging aid).

Target range check (env KERNELS_CHECK_TARGETS, or `kernels.utils.CHECK_TARGETS`):
  "auto"   (default) check on the pure-PyTorch path (CPU). On the Triton/CUDA path a check would
           need a host-device sync, so there the kernels guard every load instead: a target outside
           [0, V) that is not ignore_index never reads out of bounds and yields NaN log-probs, loss
           and gradients for that token (loud, never silently wrong).
  "always" also check CUDA tensors (one host-device sync per call; use it while debugging data).
  "never"  skip the check (the NaN guard above still applies on the Triton path).
"""

import os

import torch

BACKEND = os.environ.get("KERNELS_BACKEND", "auto")
CHECK_TARGETS = os.environ.get("KERNELS_CHECK_TARGETS", "auto")
# Rows per chunk are chosen so that one chunk's fp32 logits (rows x V) hold about this many elements:
# 2**27 floats = 512 MiB of fp32 logits + 256 MiB of bf16 dlogits on a GPU (832 rows at V = 151,936);
# larger chunks amortize the fp32 weight-gradient accumulator's read+write per chunk, smaller ones
# save memory. 2**22 (16 MiB) on a CPU.
CHUNK_ELEMENTS = {"cuda": 1 << 27, "cpu": 1 << 22}
# How grad_W (fp32) += dlogits^T h_c runs for bf16/fp16 on CUDA (env KERNELS_GRAD_W_GEMM):
# "auto" cuBLAS addmm with an fp32 output if this torch build accepts an fp32 accumulator with
# bf16 operands, else our Triton GEMM; "cublas" / "triton" force one of them.
GRAD_W_GEMM = os.environ.get("KERNELS_GRAD_W_GEMM", "auto")
# Where the lm-head weight gradient goes when the weight passed in is a half-precision cast of an fp32
# leaf parameter (weight = param.to(bf16): fp32 master weights, bf16 compute; env KERNELS_MASTER_GRAD):
# "auto" the op takes the fp32 parameter as its autograd input and hands it the fp32 accumulator, which
#        autograd installs as param.grad without a copy (or adds into an existing .grad);
# "off"  the gradient flows back through the cast: fp32 accumulator -> bf16 copy -> fp32 copy.
MASTER_GRAD = os.environ.get("KERNELS_MASTER_GRAD", "auto")

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.int32, torch.int64)


def interpreting():
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(t):
    """Whether the Triton kernels should run on tensors living where `t` lives."""
    if BACKEND not in ("auto", "triton", "torch"):
        raise ValueError(f"KERNELS_BACKEND={BACKEND!r}: expected 'auto', 'triton' or 'torch'")
    if BACKEND == "torch":
        return False
    if BACKEND == "triton":
        if not t.is_cuda and not interpreting():
            raise ValueError("KERNELS_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 in the "
                             "environment before triton is imported")
        return True
    return t.is_cuda


def should_check_targets(t):
    if CHECK_TARGETS not in ("auto", "always", "never"):
        raise ValueError(f"KERNELS_CHECK_TARGETS={CHECK_TARGETS!r}: expected 'auto', 'always' or 'never'")
    if CHECK_TARGETS == "never":
        return False
    return CHECK_TARGETS == "always" or not (t.is_cuda and use_triton(t))


def chunk_rows(n, v, device, chunk_size=None):
    """Rows per chunk: `chunk_size` if given, else what keeps a chunk's fp32 logits near CHUNK_ELEMENTS."""
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size={chunk_size}: expected a positive number of rows")
        return int(chunk_size)
    budget = CHUNK_ELEMENTS["cuda" if device.type == "cuda" else "cpu"]
    rows = max(16, budget // max(v, 1))
    if rows >= 128:
        rows = rows // 64 * 64  # whole tiles for the matmuls
    return max(1, min(rows, max(n, 1)))


def fp32_master(weight):
    """The fp32 leaf parameter that `weight` is a plain cast of (weight = param.to(bf16 or fp16), same
    shape and device, e.g. under autocast or sft.py's `.to(compute_dtype)`), else None.

    Then the ops differentiate w.r.t. that parameter directly: their fp32 weight-gradient accumulator
    (V, H) is the parameter's gradient as it is, so it becomes param.grad (autograd's AccumulateGrad
    takes it without a copy when .grad is None, adds it in place otherwise), instead of being rounded to
    bf16 for the cast's backward, which makes a third (V, H) fp32 copy. Everything else stays ordinary
    autograd (hooks on the parameter, DDP, torch.autograd.grad). Not taken (None, today's path) when
    the weight is itself the leaf (fp32 on CPU; FSDP2's bf16 unsharded parameter under a
    MixedPrecisionPolicy, whose gradient FSDP2 reduces in its own dtype), is a cast of a tensor
    subclass (DTensor), has hooks of its own, or KERNELS_MASTER_GRAD=off."""
    if MASTER_GRAD not in ("auto", "off"):
        raise ValueError(f"KERNELS_MASTER_GRAD={MASTER_GRAD!r}: expected 'auto' or 'off'")
    if MASTER_GRAD == "off" or not weight.requires_grad or weight.dtype not in (torch.float16, torch.bfloat16):
        return None
    node = weight.grad_fn
    if node is None or type(node).__name__ != "ToCopyBackward0" or getattr(weight, "_backward_hooks", None):
        return None
    nxt = node.next_functions
    if len(nxt) != 1 or nxt[0][0] is None or type(nxt[0][0]).__name__ != "AccumulateGrad":
        return None
    leaf = nxt[0][0].variable
    if (type(leaf) not in (torch.Tensor, torch.nn.Parameter) or leaf.dtype != torch.float32
            or leaf.shape != weight.shape or leaf.device != weight.device):
        return None
    return leaf


# ---- input checks (metadata only, no host-device sync, except the opt-in target range check)

def check_linear_inputs(hidden, weight, targets, ignore_index, temperature):
    """hidden (N, H), weight (V, H) same float dtype and device, targets (N,) int; raise ValueError."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (N, H), got shape {tuple(hidden.shape)}; flatten batch and "
                         "time first: hidden.reshape(-1, H)")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, H), got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be (V, H={hidden.shape[1]}) to match hidden (N, H), "
                         f"got shape {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one row (V >= 1)")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must be (N={hidden.shape[0]},) to match hidden, got shape "
                         f"{tuple(targets.shape)}")
    if hidden.dtype not in _FLOATS:
        raise ValueError(f"hidden must be float16/bfloat16/float32/float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if targets.dtype not in _INTS:
        raise ValueError(f"targets must be int64 (or int32), got {targets.dtype}")
    if weight.device != hidden.device or targets.device != hidden.device:
        raise ValueError(f"hidden, weight and targets must be on one device, got {hidden.device}, "
                         f"{weight.device}, {targets.device}")
    if not hidden.is_contiguous():
        raise ValueError("hidden must be contiguous: pass hidden.contiguous() (kernels/ never copies "
                         "the (N, H) activations silently)")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous: pass weight.contiguous()")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if hidden.is_cuda and use_triton(hidden) and hidden.dtype == torch.float64:
        raise ValueError("hidden float64 is only supported on the pure-PyTorch path (CPU tensors or "
                         "KERNELS_BACKEND=torch); use float32/bfloat16 on CUDA")
    if should_check_targets(targets):
        v = weight.shape[0]
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= v))
        if bool(bad.any()):  # a host-device sync on CUDA: only with KERNELS_CHECK_TARGETS=always
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"targets[{i}] = {int(targets[i])} is outside [0, V={v}) and is not "
                             f"ignore_index={ignore_index}")


def per_token(name, x, n, device, optional=False):
    """A per-token (N,) float tensor as a detached contiguous float32 tensor; ValueError otherwise."""
    if x is None:
        if optional:
            return None
        raise ValueError(f"{name} is required: a (N={n},) float32 tensor")
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a (N={n},) float32 tensor, got {type(x).__name__}")
    if x.shape != (n,):
        raise ValueError(f"{name} must have shape (N={n},) like targets, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor (float32), got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device} like hidden")
    return x.detach().to(torch.float32).contiguous()


# ---- matmuls: logits in fp32 (or fp64), gradients accumulated in fp32

def native_mm(t):
    """True where the matmuls run in the input dtype with fp32 output (CUDA half types)."""
    return t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)


def compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def mm_weight(weight):
    """The weight as the matmuls use it: as is for CUDA half types (cuBLAS accumulates in fp32), else
    upcast once per call to the compute dtype (CPU matmuls in bf16 are slow and round the output)."""
    return weight if native_mm(weight) else weight.to(compute_dtype(weight))


def logits_mm(h_c, w_mm):
    """(C, H) @ (V, H)^T -> (C, V) raw logits, fp32 (fp64 for fp64 inputs)."""
    if native_mm(h_c):
        return torch.mm(h_c, w_mm.t(), out_dtype=torch.float32)
    return torch.mm(h_c.to(w_mm.dtype), w_mm.t())


def grad_hidden_mm(dl, w_mm, out):
    """out (C, H) = dl (C, V) @ W (V, H), written in out's dtype."""
    if native_mm(out):
        torch.mm(dl, w_mm, out=out)
    else:
        out.copy_(torch.mm(dl.to(w_mm.dtype), w_mm))
