"""Benchmark: forward + backward of per-token log-probs through the lm head (shared/KERNELS.md's table).

Every method computes logp_t = log softmax(h W^T)[y_t] for T tokens and back-propagates a per-token
weight (loss = sum_t w_t logp_t; the cross-entropy baselines use w = 1 via reduction="sum"), with
H = 2560, V = 151936 (Qwen3-4B's lm head) in bf16 by default. One run measures every method side by
side and prints one table: ms (median of --iters after --warmup, CUDA events), TFLOP/s counting
6 T H V, extra GiB and the relative error of the method's logp against an fp32 reference
(|logp - ref| / |ref| over all tokens).

Weights as training holds them (--weights master, the default): an fp32 master parameter W32, and each
call casts it (W = W32.to(bf16), as sft.py and autocast do) and hands W to the method, whose weight
gradient ends in W32.grad (fp32). --weights plain: a bf16 leaf weight, gradient bf16.
extra GiB = peak memory during one forward + backward minus what any training step holds regardless:
the inputs (hidden, targets, per-token weights), the weights (W32, and W, its bf16 copy, in master mode)
and the gradients the step must produce (hidden's, in its dtype; the weight parameter's, in its dtype:
fp32 for W32). What is left is the method's own working memory: logits chunks, accumulators, copies.

  # on a GPU (the table in bench/README.md):
  python bench/bench_kernels.py --out bench/kernels_table.md
  python bench/bench_kernels.py --T 32768 --methods ours-gif,ours-autograd,liger
  # the CPU demo (pure-PyTorch path vs eager; runs in seconds):
  python bench/bench_kernels.py --device cpu --T 256 --V 32000 --H 256

Methods: ours-gif (kernels.linear_cross_entropy with token_weights = w, the grad-in-forward path
of kernels.fused_linear_loss: gradients formed in the forward, 6THV), ours-autograd
(kernels.linear_logprob + autograd, logits recomputed in backward, 8THV), eager (PyTorch matmul +
fp32 log_softmax + gather), torch-chunked (torch.nn.functional.linear_cross_entropy with
LinearCrossEntropyOptions, where this torch has it), liger (Liger-Kernel's
LigerFusedLinearCrossEntropyLoss) and cce (Apple's cut-cross-entropy); uninstalled ones print a
"not installed" row. On CPU tensors kernels/ runs its pure-PyTorch path, and "extra GiB" is the
growth of the process's peak resident memory (Linux /proc/self/clear_refs).
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import kernels  # noqa: E402
from kernels import utils  # noqa: E402

ALL_METHODS = ["ours-gif", "ours-autograd", "eager", "torch-chunked", "liger", "cce"]
LABELS = {
    "ours-gif": "ours: grad-in-forward (linear_cross_entropy)",
    "ours-autograd": "ours: linear_logprob + autograd",
    "eager": "eager PyTorch",
    "torch-chunked": "torch F.linear_cross_entropy (chunked)",
    "liger": "Liger fused linear CE",
    "cce": "Apple Cut Cross-Entropy",
}


# ---- methods: step() runs forward + backward; logp() returns per-token log-probs (no grad)

def _weighted_logp(lp, ent, w):
    return w * lp, {}


def build_method(name, h, wf, y, w):
    """(step, logp) closures for one method, or a string saying why it cannot run here.
    wf() returns the weight the method is given: W32.to(bf16) (master mode) or the leaf itself."""
    if name == "ours-gif":
        def step():  # loss = sum_t w_t CE_t = -sum_t w_t logp_t, the SFT path (no entropy needed)
            kernels.linear_cross_entropy(h, wf(), y, reduction="sum", token_weights=w).backward()

        def logp():
            with torch.no_grad():
                return kernels.fused_linear_loss(h, wf(), y, _weighted_logp, {"w": w})[1]["logp"]
        return step, logp
    if name == "ours-autograd":
        def step():
            (kernels.linear_logprob(h, wf(), y) * w).sum().backward()

        def logp():
            with torch.no_grad():
                return kernels.linear_logprob(h, wf(), y)
        return step, logp
    if name == "eager":
        def eager_logp():
            logits = (h @ wf().t()).float()                                 # (T, V) fp32
            return torch.log_softmax(logits, dim=-1).gather(1, y[:, None]).squeeze(1)

        def step():
            (eager_logp() * w).sum().backward()

        def logp():
            with torch.no_grad():
                return eager_logp()
        return step, logp
    if name == "torch-chunked":
        if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            return f"not in torch {torch.__version__}"
        opts = torch.nn.LinearCrossEntropyOptions()

        def step():
            F.linear_cross_entropy(h, wf(), y, reduction="sum", options=opts).backward()

        def logp():
            with torch.no_grad():
                return -_rows(lambda s: F.linear_cross_entropy(h[s], wf(), y[s], reduction="none"), h)
        return step, logp
    if name == "liger":
        try:
            import liger_kernel
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            return "not installed (pip install liger-kernel)"
        if not h.is_cuda:
            return "needs CUDA"
        loss_sum = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        loss_none = LigerFusedLinearCrossEntropyLoss(reduction="none")
        LABELS["liger"] = f"Liger fused linear CE {getattr(liger_kernel, '__version__', '')}".strip()

        def step():
            loss_sum(wf(), h, y).backward()

        def logp():
            with torch.no_grad():
                return -_rows(lambda s: loss_none(wf(), h[s], y[s]), h)
        return step, logp
    if name == "cce":
        try:
            import cut_cross_entropy
            from cut_cross_entropy import linear_cross_entropy as cce_lce
        except ImportError:
            return "not installed (pip install cut-cross-entropy)"
        if not h.is_cuda:
            return "needs CUDA"
        LABELS["cce"] = f"Apple Cut Cross-Entropy {getattr(cut_cross_entropy, '__version__', '')}".strip()

        def step():
            cce_lce(h, wf(), y, reduction="sum").backward()

        def logp():
            with torch.no_grad():
                return -_rows(lambda s: cce_lce(h[s], wf(), y[s], reduction="none"), h)
        return step, logp
    raise ValueError(f"--methods: unknown method {name!r}; choose from {', '.join(ALL_METHODS)}")


def _rows(fn, h, rows=4096):
    """fn over row slices of at most `rows` tokens, concatenated (keeps accuracy checks small)."""
    return torch.cat([fn(slice(i, i + rows)).float() for i in range(0, h.shape[0], rows)])


def reference_logp(h, W, y, rows=1024):
    """fp32 reference: logits from fp32 copies of the inputs, log_softmax, gather; row chunks."""
    w32 = W.detach().float()
    out = []
    for i in range(0, h.shape[0], rows):
        z = h[i:i + rows].detach().float() @ w32.t()
        out.append(torch.log_softmax(z, -1).gather(1, y[i:i + rows, None]).squeeze(1))
    return torch.cat(out)


# ---- measurement

def _rss_reset():
    """Reset the kernel's peak-RSS mark; returns the current RSS in bytes (None if unsupported)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return None


def _status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def measure(step, h, W, device, warmup, iters, required_bytes=0):
    """(median ms, extra GiB) of step(); gradients are cleared before every call. extra = peak memory
    of one step beyond what was allocated before it and `required_bytes` (what the step must create
    regardless: the gradients of h and W, the bf16 copy of an fp32 master W)."""
    def run():
        h.grad = None
        W.grad = None
        step()

    for _ in range(warmup):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            h.grad = None
            W.grad = None
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        h.grad = None
        W.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base - required_bytes) / 2**30
    else:
        times = []
        for _ in range(iters):
            h.grad = None
            W.grad = None
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        h.grad = None
        W.grad = None
        base = _rss_reset()
        step()
        peak = _status_bytes("VmHWM") if base is not None else None
        extra = (peak - base - required_bytes) / 2**30 if peak is not None else float("nan")
    h.grad = None
    W.grad = None
    return statistics.median(times), extra


def bench_one(t, args, device, dtype):
    g = torch.Generator().manual_seed(args.seed)
    h = torch.randn(t, args.H, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    W = (torch.randn(args.V, args.H, generator=g) * (3.0 / args.H ** 0.5)).to(device=device, dtype=dtype)
    # logits ~ N(0, 9), like a trained lm head
    master = args.weights == "master" and dtype != torch.float32
    if master:  # the fp32 master parameter (of bf16 values: both modes see one weight) and its cast
        W = torch.nn.Parameter(W.float())
        wf = lambda: W.to(dtype)  # noqa: E731
    else:
        W.requires_grad_(True)
        wf = lambda: W  # noqa: E731
    # what a training step holds regardless, beyond what exists before it: h.grad, W.grad (fp32 for
    # a master parameter) and, in master mode, the bf16 copy of the weight
    required = h.numel() * h.element_size() + W.numel() * W.element_size()
    required += W.numel() * torch.finfo(dtype).bits // 8 if master else 0
    y = torch.randint(0, args.V, (t,), generator=g).to(device)
    w = torch.rand(t, generator=g).to(device)
    ref = reference_logp(h, wf(), y)
    rows = []
    for name in args.methods:
        built = build_method(name, h, wf, y, w)
        if isinstance(built, str):
            rows.append((LABELS[name], t, built, "", "", ""))
            continue
        step, logp = built
        try:
            err = float((logp().float() - ref).norm() / ref.norm())
            ms, extra = measure(step, h, W, device, args.warmup, args.iters, required)
        except torch.cuda.OutOfMemoryError:
            h.grad = None
            W.grad = None
            torch.cuda.empty_cache()
            rows.append((LABELS[name], t, "out of memory", "", "", ""))
            continue
        tflops = 6 * t * args.H * args.V / (ms * 1e-3) / 1e12
        rows.append((LABELS[name], t, f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}", f"{tflops:.3g}",
                     f"{extra:.2f}", f"{err:.1e}"))
        print(f"  {LABELS[name]:<44} T={t:<7} {rows[-1][2]:>8} ms", file=sys.stderr, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main():
    if "--device" in sys.argv and "cpu" in sys.argv and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # CPU peak memory is read from the kernel's peak-RSS mark; a fixed mmap threshold makes glibc
        # hand every large tensor back to the OS when it is freed, so the mark tracks live tensors.
        os.execve(sys.executable, [sys.executable] + sys.argv,
                  dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- shapes
    p.add_argument("--T", type=int, nargs="+", default=[4096, 16384, 32768, 65536],
                   help="tokens per call (one row of the table per value)")
    p.add_argument("--H", type=int, default=2560, help="hidden size (Qwen3-4B: 2560)")
    p.add_argument("--V", type=int, default=151936, help="vocabulary size (Qwen3: 151936)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="input dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--weights", default="master", choices=["master", "plain"],
                   help="master: an fp32 parameter cast to --dtype in every call, its gradient fp32 (how "
                        "sft.py and rl.py train); plain: a --dtype leaf weight, its gradient in --dtype")
    # ---- run
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (cpu runs kernels/'s pure-PyTorch path)")
    p.add_argument("--methods", default="",
                   help=f"comma-separated subset of {','.join(ALL_METHODS)} ('' = all on cuda; "
                        "ours-gif,ours-autograd,eager on cpu)")
    p.add_argument("--warmup", type=int, default=-1, help="untimed calls before timing (-1 = 2 on cuda, 1 on cpu)")
    p.add_argument("--iters", type=int, default=-1, help="timed calls; the median is reported (-1 = 5 on cuda, 3 on cpu)")
    p.add_argument("--chunk-elements", type=int, default=0,
                   help="kernels/ rows per chunk * V (0 = kernels.utils.CHUNK_ELEMENTS default)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random inputs")
    p.add_argument("--out", default="", help="also write the table (markdown) to this file ('' = don't)")
    args = p.parse_args()
    cpu = not args.device.startswith("cuda")
    args.methods = ([m.strip() for m in args.methods.split(",") if m.strip()] or
                    (["ours-gif", "ours-autograd", "eager"] if cpu else ALL_METHODS))
    args.warmup = args.warmup if args.warmup >= 0 else (1 if cpu else 2)
    args.iters = args.iters if args.iters > 0 else (3 if cpu else 5)
    for m in args.methods:
        if m not in ALL_METHODS:
            p.error(f"--methods: unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here; use --device cpu (with small --T/--V/--H)")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.chunk_elements:
        utils.CHUNK_ELEMENTS[device.type] = args.chunk_elements
    torch.backends.cuda.matmul.allow_tf32 = False            # fp32 means fp32 (reference, fp32 runs)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    header = (f"{where}, {datetime.date.today().isoformat()}, torch {torch.__version__}, "
              f"H={args.H}, V={args.V}, {str(dtype).replace('torch.', '')}, "
              f"median of {args.iters} after {args.warmup} warmup")
    weights = ("an fp32 master parameter cast to the input dtype in each call (its gradient fp32)"
               if args.weights == "master" and dtype != torch.float32 else "a leaf weight of the input dtype")
    caption = (f"Weights: {weights}. extra GiB = peak memory of one forward + backward beyond what any "
               "training step holds regardless: the inputs, the weights (and the weight's compute-dtype "
               "copy) and their gradients (hidden's; the weight parameter's, fp32 for a master weight)"
               + ("; on CPU: growth of the peak RSS" if device.type != "cuda" else "") + ".")
    print(header, file=sys.stderr)
    rows = []
    for t in args.T:
        rows += bench_one(t, args, device, dtype)
    lines = [f"{header}", "", caption, "",
             "| method | T | ms | TFLOP/s (6THV) | extra GiB | rel. err. logp vs fp32 |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {m} | {t:,} | {ms} | {tf} | {gib} | {err} |" for m, t, ms, tf, gib, err in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n\n<!-- args: " + json.dumps(vars(args)) + " -->\n")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
