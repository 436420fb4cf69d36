"""Benchmark: one SFT optimizer step (forward, backward, AdamW) of a Qwen3-4B-shaped model, sft.py's
own step against Hugging Face transformers + Liger's fused linear cross-entropy, same run.

"ours" is sft.py itself: sft.build_model (CausalLMLoss over kernels.linear_cross_entropy, gradient
checkpointing, fp32 master weights with bf16 autocast on CUDA), sft.build_optimizer (AdamW),
sft.pack (conversations packed into one row, position ids restarting per conversation) and
sft.train_step (forward, backward, clipping, AdamW, zero_grad). The baseline is what TRL's
`use_liger_kernel=True` runs: the same transformers model patched by
`liger_kernel.transformers.apply_liger_kernel_to_qwen3` (fused linear cross-entropy, RMSNorm, RoPE,
SwiGLU), `model(input_ids, position_ids, labels).loss.backward()`, the same checkpointing,
precision (--hf-dtype), clipping and AdamW. "hf" (optional) is transformers without Liger (it
materializes the [T, V] logits). Both models start from the same random weights (one seed,
rounded to bf16 values), so their first-step losses agree: the table shows them.

  python bench/bench_sft.py --out bench/sft_table.md                       # one H100/H200
  python bench/bench_sft.py --sizes 45056 65536 --mem-cap-gib 79           # does it fit an H100?
  python bench/bench_sft.py --preset tiny                                  # CPU, toy sizes, seconds

Per method and size: step time (median of --iters after --warmup steps on the same packed row),
tok/s, MFU (sft.train_flops over the step time and sft.PEAK_BF16_FLOPS of the card) and peak GiB
(torch.cuda.max_memory_allocated over the timed steps: weights, gradients, AdamW state and
activations; on CPU the process's peak RSS growth, meaningless as a GPU figure). A size that runs
out of memory is a row saying OOM; larger sizes of that method are then skipped. A missing Liger is
a row saying "not installed".
"""

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import common  # noqa: E402
import sft  # noqa: E402
from bench_kernels import _rss_reset, _status_bytes  # noqa: E402

SIZES = [8192, 16384, 32768, 45056, 65536]
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                rope_theta=1_000_000, rms_norm_eps=1e-6, max_position_embeddings=131072)
ALL_METHODS = ["ours", "hf-liger", "hf"]
LABELS = {"ours": "ours: sft.py step (kernels/ CE)", "hf-liger": "HF + Liger fused linear CE",
          "hf": "HF transformers (no Liger)"}
BASELINE = "hf-liger"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["none", "tiny"], default="none",
                   help="tiny: the tiny 2-layer Qwen3 config (vocabulary 4,096) on CPU at 64 and 128 tokens (explicit flags win)")
    p.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="tokens per GPU (one packed row each)")
    p.add_argument("--conv-len", type=int, default=0,
                   help="tokens per conversation packed into a row (0 = the whole row is one conversation)")
    p.add_argument("--methods", default="ours,hf-liger",
                   help=f"comma-separated subset of {','.join(ALL_METHODS)} (hf materializes the logits)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--hf-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="baseline weights: fp32 master + bf16 autocast like ours (fp32), or pure bf16 weights "
                        "and AdamW state (bf16, what TRL does with torch_dtype=bfloat16)")
    p.add_argument("--attn-implementation", default="sdpa", help="sdpa | flash_attention_2 | eager, both methods")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first allocates AdamW state)")
    p.add_argument("--iters", type=int, default=2, help="timed steps; the median is reported")
    p.add_argument("--mem-cap-gib", type=float, default=0,
                   help="cap this process's CUDA memory at this many GiB (torch.cuda.set_per_process_memory_"
                        "fraction; 79 = an H100 80GB's usable memory; 0 = no cap)")
    p.add_argument("--prompt-frac", type=float, default=0.1,
                   help="leading share of each conversation that is prompt (no loss)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the token ids")
    p.add_argument("--out", default="", help="also write the table (markdown) to this file")
    args = p.parse_args(argv)
    if args.preset == "tiny":
        p.set_defaults(sizes=[64, 128], methods="ours,hf-liger,hf", device="cpu", warmup=1, iters=1)
        args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in args.methods:
        if m not in ALL_METHODS:
            p.error(f"--methods: unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
    if any(t < 2 for t in args.sizes) or args.conv_len < 0 or not 0 <= args.prompt_frac < 1:
        p.error("--sizes must be >= 2 tokens, --conv-len >= 0, --prompt-frac in [0, 1)")
    return args


def model_config(args):
    from transformers import Qwen3Config

    if args.preset == "tiny":
        cfg = common.tiny_qwen3_config(vocab_size=4096)   # a small vocabulary: seconds on a CPU
        cfg.pad_token_id = cfg.bos_token_id = cfg.eos_token_id = None   # the real tokenizer's ids are > 4096
        return cfg
    return Qwen3Config(**QWEN3_4B)


def make_lm(cfg, device, args, dtype=torch.float32):
    """The causal LM with random weights of bf16 values (the same for every method: one seed)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32,
                                              attn_implementation=args.attn_implementation)
    with torch.no_grad():
        for p in lm.parameters():
            p.copy_(p.to(torch.bfloat16))   # bf16 values, fp32 storage: both precisions see one model
    return lm.to(dtype)


def make_row(t, vocab, args):
    """One packed row of t tokens: conversations of --conv-len tokens (the last one shorter), random
    token ids, the first --prompt-frac of each conversation prompt (mask 0), the rest the answer."""
    g = torch.Generator().manual_seed(args.seed + t)
    lens = [t] if not args.conv_len else [args.conv_len] * (t // args.conv_len) + ([t % args.conv_len] if t % args.conv_len else [])
    examples = []
    for n in lens:
        ids = torch.randint(0, vocab - 300, (n,), generator=g).tolist()
        p = max(1, int(n * args.prompt_frac))
        examples.append((ids, [0] * p + [1] * (n - p)))
    return examples


def peak_bytes_reset(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return _rss_reset()


def peak_gib(device, base):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = _status_bytes("VmHWM") if base is not None else None
    return (peak - base) / 2**30 if peak is not None else float("nan")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- methods: setup(cfg) -> step(examples) -> loss of the step (mean CE over the loss tokens)

def setup_ours(cfg, device, args):
    sargs = sft.parse_args(["--device", device.type, "--attn-implementation", args.attn_implementation])
    model, trainable, compute_dtype = sft.build_model(sargs, device, 1, lm=make_lm(cfg, device, args))
    opt = sft.build_optimizer(sargs, trainable)
    autocast = sft.make_autocast(device, 1, compute_dtype)
    model.train()

    def step(examples):
        total = sum(sft.n_loss_tokens(e) for e in examples)
        loss_sum, _ = sft.train_step(model, opt, trainable, [examples], total, device, 1, autocast,
                                     sargs.grad_clip)
        return float(loss_sum) / total

    return step, model, opt


def setup_hf(cfg, device, args, liger):
    if liger:
        try:
            import liger_kernel  # noqa: F401
            from liger_kernel.transformers import apply_liger_kernel_to_qwen3
        except ImportError:
            return "not installed (pip install liger-kernel)"
        if device.type != "cuda":
            return "needs CUDA"
        LABELS["hf-liger"] = f"HF + Liger {_version('liger-kernel')} fused linear CE"
    bf16_weights = args.hf_dtype == "bf16"
    lm = make_lm(cfg, device, args, torch.bfloat16 if bf16_weights else torch.float32)
    if liger:  # what TRL's use_liger_kernel applies to a Qwen3 instance (all of Liger's defaults)
        apply_liger_kernel_to_qwen3(model=lm)
    lm.config.use_cache = False
    enable = getattr(lm, "activation_checkpointing_enable", None)   # as sft.build_model does
    enable() if enable else lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.train()
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-5, weight_decay=0.0)   # sft.py's defaults
    bf16_compute = device.type == "cuda"
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16_compute and not bf16_weights
                else torch.autocast(device.type, enabled=False))

    def step(examples):
        ids, pos, targets = sft.pack(examples, device)
        # transformers shifts labels by one inside the loss: labels[t + 1] = our targets[t]
        labels = torch.full_like(ids, -100)
        labels[0, 1:] = targets[:-1]
        with autocast:
            loss = lm(input_ids=ids, position_ids=pos, labels=labels, use_cache=False).loss   # mean CE
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, lm, opt


def _version(dist):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def is_oom(e):
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def bench_method(name, cfg, device, args, n_params, peak_flops):
    """Rows (dicts) for one method over every size; the model is built once and freed after."""
    rows = []
    built = setup_ours(cfg, device, args) if name == "ours" else setup_hf(cfg, device, args, name == "hf-liger")
    if isinstance(built, str):
        return [dict(method=name, tokens=t, note=built) for t in args.sizes]
    step, model, opt = built
    oom_at = None
    for t in args.sizes:
        if oom_at is not None:
            rows.append(dict(method=name, tokens=t, note=f"skipped (OOM at {oom_at:,})"))
            continue
        examples = make_row(t, cfg.vocab_size, args)
        seq_lens = [len(e[0]) for e in examples]
        err = None
        try:
            first_loss = None
            for _ in range(args.warmup):
                loss = step(examples)
                first_loss = loss if first_loss is None else first_loss
            base = peak_bytes_reset(device)
            times = []
            for _ in range(args.iters):
                sync(device)
                t0 = time.perf_counter()
                loss = step(examples)
                sync(device)
                times.append(time.perf_counter() - t0)
                first_loss = loss if first_loss is None else first_loss
            peak = peak_gib(device, base)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
            err = f"OOM ({str(e).splitlines()[0][:80]})"
        if err is not None:  # outside the except block: the traceback's frames (and tensors) are gone
            opt.zero_grad(set_to_none=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(dict(method=name, tokens=t, note="OOM"))
            print(f"  {name:<9} T={t:<7} {err}", file=sys.stderr, flush=True)
            oom_at = t
            continue
        dt = statistics.median(times)
        mfu = sft.train_flops(n_params, cfg, seq_lens) / dt / peak_flops if peak_flops else None
        rows.append(dict(method=name, tokens=t, convs=len(seq_lens), step_s=dt, tok_s=t / dt, mfu=mfu,
                         peak_gib=peak, loss=first_loss))
        print(f"  {name:<9} T={t:<7} {dt:.2f} s  {t / dt:,.0f} tok/s  peak {peak:.1f} GiB  loss {first_loss:.4f}",
              file=sys.stderr, flush=True)
    del step, model, opt, built
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def format_table(rows, header):
    base = {r["tokens"]: r for r in rows if r["method"] == BASELINE and "tok_s" in r}
    lines = [header, "",
             "| method | tokens/GPU | conv. | step s | tok/s | MFU | peak GiB | loss (step 1) | tok/s vs HF+Liger | peak vs HF+Liger |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["tokens"], ALL_METHODS.index(r["method"]))):
        label = LABELS[r["method"]]
        if "tok_s" not in r:
            lines.append(f"| {label} | {r['tokens']:,} | | {r['note']} | | | | | | |")
            continue
        b = base.get(r["tokens"])
        speed = f"{r['tok_s'] / b['tok_s']:.2f}x" if b else "-"
        mem = f"{r['peak_gib'] / b['peak_gib']:.2f}x" if b and b["peak_gib"] > 0 else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(f"| {label} | {r['tokens']:,} | {r['convs']} | {r['step_s']:.3f} | {r['tok_s']:,.0f} | {mfu} | "
                     f"{r['peak_gib']:.2f} | {r['loss']:.4f} | {speed} | {mem} |")
    return "\n".join(lines)


def main(argv=None):
    """Run the benchmark; returns (table text, rows)."""
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here; use --preset tiny (CPU)")
    cap = ""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if args.mem_cap_gib > 0:
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_cap_gib * 2**30 / total), device)
            cap = f", memory capped at {args.mem_cap_gib:g} GiB of {total / 2**30:.1f}"
    elif args.mem_cap_gib > 0:
        cap = ", --mem-cap-gib ignored on CPU"
    cfg = model_config(args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    peak_flops = next((v for k, v in sft.PEAK_BF16_FLOPS.items() if k in name), None) if device.type == "cuda" else None
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())  # tied: once
    header = make_header(args, cfg, device, name, n_params, peak_flops, cap)
    rows = []
    # Liger patches transformers' Qwen3 classes in place (RMSNorm, RoPE, MLP): its method runs last.
    for m in sorted(args.methods, key=lambda m: m == "hf-liger"):
        rows += bench_method(m, cfg, device, args, n_params, peak_flops)
        if args.out:  # after each method, so that a run stopped by a time limit leaves what it measured
            write_table(args, format_table(rows, header + " (partial: still running)"))
    table = format_table(rows, header)
    print(table)
    if args.out:
        write_table(args, table)
        print(f"wrote {args.out}", file=sys.stderr)
    return table, rows


def write_table(args, table):
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(table + "\n\n<!-- args: " + json.dumps(vars(args)) + " -->\n")


def make_header(args, cfg, device, name, n_params, peak_flops, cap):
    import transformers

    prec = ("fp32 master weights and AdamW state, bf16 autocast" if device.type == "cuda" else "fp32")
    header = (f"SFT step benchmark, {datetime.date.today().isoformat()}, {name}, torch {torch.__version__}, "
              f"transformers {transformers.__version__}, liger-kernel {_version('liger-kernel')}; "
              f"{'tiny Qwen3' if args.preset == 'tiny' else 'Qwen3-4B-shaped'} model ({n_params / 1e9:.3f}B params, "
              f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, random weights), "
              f"ours: {prec}; HF baselines: {args.hf_dtype} weights{' with bf16 autocast' if args.hf_dtype == 'fp32' and device.type == 'cuda' else ''}; "
              f"gradient checkpointing, {args.attn_implementation} attention, AdamW, grad clip 1.0 for all; "
              f"one packed row per step ({'one conversation' if not args.conv_len else f'conversations of {args.conv_len:,} tokens'}, "
              f"{args.prompt_frac:.0%} prompt); median of {args.iters} steps after {args.warmup}{cap}. "
              f"MFU = sft.train_flops (6 N per token + causal attention) / step time / "
              f"{'%.0f TFLOP/s' % (peak_flops / 1e12) if peak_flops else 'the card peak (none on CPU)'}; "
              f"peak GiB = max allocated during the timed steps (weights, gradients, AdamW state, activations)"
              f"{'; CPU: peak RSS growth, not a GPU figure' if device.type != 'cuda' else ''}.")
    return header


if __name__ == "__main__":
    if "--preset" in sys.argv and "tiny" in sys.argv and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # CPU peak memory is the kernel's peak-RSS mark: a fixed mmap threshold hands freed tensors back
        # to the OS, so the mark follows live tensors (as in bench_kernels.py)
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
    main()
