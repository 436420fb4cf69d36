"""Decode throughput: engines.py's HF engine (static KV cache, fixed-shape steps, CUDA graphs on a GPU,
sampling on the device) against transformers' plain `model.generate` (dynamic cache), same run,
same model, same prompts, sampling with no early stop.

The issue's setting (one GPU, a Qwen3-4B-shaped model with random bf16 weights, 256-token prompts):
    python bench/bench_decode.py
At toy sizes on a CPU (checks that the script runs; says nothing about GPU speed):
    python bench/bench_decode.py --preset tiny
Prints one markdown table and writes it (with the device, versions and date) to --out.
"""

import argparse
import datetime
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import engines as R  # noqa: E402

# ---- CLI
p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--preset", choices=["tiny"], default=None, help="tiny: the tiny random Qwen3 on CPU, small sizes")
p.add_argument("--model", default="qwen3-4b-random",
               help="hub id / folder, or qwen3-4b-random (Qwen3-4B's shapes, random weights, no download)")
p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the engines run")
p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="weights dtype")
p.add_argument("--batch-sizes", default="1,16,64", help="comma-separated batch sizes (sequences)")
p.add_argument("--new-tokens", default="512,4096", help="comma-separated numbers of generated tokens")
p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens per sequence")
p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass (1 = off)")
p.add_argument("--engines", default="ours,generate", help="any of ours, ours-dynamic, generate")
p.add_argument("--skip-generate-above", type=int, default=1 << 30,
               help="skip plain generate for batch x new tokens above this (it can take long)")
p.add_argument("--out", default="bench/results_decode.md", help="where the table is written")
args = p.parse_args()
if args.preset == "tiny":
    args.model, args.device, args.dtype = common.make_tiny_model(), "cpu", "float32"
    args.batch_sizes, args.new_tokens, args.prompt_len = "1,4", "16,64", 32
device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                      ("cpu" if args.device == "auto" else args.device))
dtype = getattr(torch, args.dtype)
torch.manual_seed(0)

# ---- model
if args.model == "qwen3-4b-random":
    from transformers import AutoModelForCausalLM, Qwen3Config
    cfg = Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                      rope_theta=1_000_000, tie_word_embeddings=True, rms_norm_eps=1e-6)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    tokenizer = common.load_tokenizer(common.qwen_tokenizer_dir())
else:
    model = common.load_model(args.model, dtype=dtype, device=device, attn_implementation="sdpa")
    tokenizer = common.load_tokenizer(args.model)
model.eval()
pad = tokenizer.pad_token_id


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_generate(prompts, n):
    ids = torch.tensor(prompts, device=device)
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=args.temperature,
                       top_p=args.top_p, top_k=0, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad)


def make_ours(impl):
    e = R.HFEngine(model, tokenizer, impl=impl, max_batch_size=1 << 20, max_batch_tokens=1 << 40)

    def run(prompts, n):
        e.generate(prompts, R.Sampling(n, args.temperature, args.top_p, seed=0, ignore_eos=True))
    return run


runners = {"ours": lambda: make_ours("static"), "ours-dynamic": lambda: make_ours("dynamic"),
           "generate": lambda: run_generate}
engines = [x.strip() for x in args.engines.split(",")]
for name in engines:
    if name not in runners:
        sys.exit(f"unknown engine {name!r} in --engines; choose from {sorted(runners)}")
fns = {name: runners[name]() for name in engines}

# ---- measure: one warm-up run of the same shape first (CUDA graphs get captured there), then one timed run
rows = []
for B in [int(x) for x in args.batch_sizes.split(",")]:
    for N in [int(x) for x in args.new_tokens.split(",")]:
        prompts = torch.randint(0, 150000, (B, args.prompt_len)).tolist()
        base = None
        for name in engines:
            if name == "generate" and B * N > args.skip_generate_above:
                continue
            fns[name](prompts, min(N, 32) if name == "generate" else N)
            sync()
            t0 = time.perf_counter()
            fns[name](prompts, N)
            sync()
            dt = time.perf_counter() - t0
            rows.append([name, B, N, dt, B * N / dt, 1000 * dt / N])
            if name == "generate":
                base = rows[-1]
        for r in rows:
            if r[1] == B and r[2] == N:
                r.append(f"{r[4] / base[4]:.1f}x" if base else "-")

dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
import transformers  # noqa: E402
head = (f"decode benchmark, {datetime.date.today()}, {dev}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, model {args.model if isinstance(args.model, str) else ''} ({args.dtype}), "
        f"prompt {args.prompt_len} tokens, temperature {args.temperature}, top_p {args.top_p}, no early stop; "
        f"'ours' = engines.HFEngine (impl static{', CUDA graphs' if device.type == 'cuda' else ', eager'})")
table = ["| engine | batch | new tokens | time s | tokens/s | ms/step | vs generate |",
         "|---|---|---|---|---|---|---|"]
table += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.1f} | {r[5]:.2f} | {r[6]} |" for r in rows]
text = head + "\n\n" + "\n".join(table) + "\n"
print(text)
os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
with open(args.out, "w") as f:
    f.write(text)
print(f"wrote {args.out}")
