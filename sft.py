"""Stage 1 of QED-Nano: supervised fine-tuning (distillation) on FineProofs-SFT.

    python sft.py --preset tiny                  # tiny random Qwen3 + bundled data on CPU, about 90 s: the RL warm-up
    torchrun --nproc_per_node=8 sft.py           # the paper's recipe: Qwen3-4B-Thinking-2507 on 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 sft.py
    python sft.py --lora-r 64 --load-in-4bit --optim adamw8bit    # QLoRA on one GPU
    torchrun --nproc_per_node=8 sft.py --resume  # continue runs/sft from its last checkpoint

A plain PyTorch loop, top to bottom: CLI, compute init, tokenizer and model (FSDP2 `fully_shard`
when WORLD_SIZE > 1), optimizer, data (chat template, assistant-only loss mask, packing), the lr
schedule, the loop, checkpoints. The loss is kernels.linear_cross_entropy on the final hidden
states: the [tokens, vocab] logits never exist.

One optimizer step = --global-batch-size conversations over all processes. Each process runs
global / (micro * world) micro-batches; a micro-batch packs --micro-batch-size conversations into
one row with position ids restarting at 0 per conversation, which transformers turns into attention
that never crosses conversations (varlen with flash attention, a block-diagonal mask with sdpa).
The loss is the summed cross-entropy of the assistant tokens divided by the number of assistant
tokens in the whole global batch, so micro-batching and world size do not change it.

Output dir: args.json, metrics.jsonl (one record per step), step_NNNNN/ (Hugging Face model in
safetensors, resume/rank*.safetensors with optimizer state, trainable weights and RNG per rank,
trainer_state.json), final/ (the trained model; LoRA: the adapter, plus final-merged/ with --merge-lora).
"""

import argparse
import contextlib
import functools
import math
import os
import resource
import signal
import time

import torch
import torch.distributed as dist

import checkpoint
import common
from checkpoint import barrier
from common import print0

HERE = os.path.dirname(os.path.abspath(__file__))
RESUME_FREE_ARGS = {"resume", "overwrite", "stop_after", "save_every", "keep_last", "eval_every", "wandb_project"}
# The tiny preset is the warm-up before `rl.py --preset tiny` (README quick start): a constant lr, 160 steps
# (at step 80 of such a run, seeds 1 and 2 found the digit in 12% and 4% of held-out samples); it
# imitates the data's flawed teacher, which leaves RL room to climb (data/make_tiny_data.py: the SFT, RL
# and eval problems are disjoint).
TINY = dict(model=common.TINY_MODEL_DIR, data=os.path.join(HERE, "data", "tiny_sft.jsonl"), data_config=None,
            max_steps=160, global_batch_size=16, micro_batch_size=16, lr=2e-3, warmup_ratio=0.05, min_lr_ratio=1.0,
            max_length=256, val_rows=8, eval_every=40, save_every=80, output_dir="runs/sft-tiny", device="cpu")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["none", "tiny"], default="none",
                   help="tiny: random 2-layer Qwen3, real tokenizer, data/tiny_sft.jsonl, CPU (explicit flags win)")
    # ---- model
    p.add_argument("--model", default="Qwen/Qwen3-4B-Thinking-2507", help="hub id or local folder of the base model")
    p.add_argument("--tokenizer", default=None,
                   help="hub id or folder of the tokenizer (default: --model); needs a chat template")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="compute precision; auto = bf16 on CUDA (fp32 master weights and optimizer), fp32 on CPU")
    p.add_argument("--attn-implementation", default="sdpa",
                   help="sdpa | eager | flash_attention_2 (varlen: the fast way to pack long rows on GPU)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute each decoder layer in the backward pass (needed for 45k-token rows)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto = cuda when torch sees a GPU, else cpu")
    # ---- data
    p.add_argument("--data", default="lm-provers/FineProofs-SFT", help="hub id or local .jsonl/.json/.parquet")
    p.add_argument("--data-config", default="default", help="hub dataset config ('default' = 4.3k unique problems)")
    p.add_argument("--data-split", default="train", help="hub dataset split")
    p.add_argument("--max-length", type=int, default=45056, help="max tokens per conversation (prompt + answer)")
    p.add_argument("--overlong", choices=["drop", "truncate"], default="drop",
                   help="conversations longer than --max-length: drop them (counted) or cut them at --max-length")
    p.add_argument("--bad-rows", choices=["error", "skip"], default="error",
                   help="malformed rows (no assistant turn, empty or non-string content): error, or skip and count")
    p.add_argument("--val-rows", type=int, default=0,
                   help="conversations held out for the validation loss (0 = none, as in the paper)")
    # ---- optimization
    p.add_argument("--max-steps", type=int, default=620, help="optimizer steps of the run (the schedule spans them)")
    p.add_argument("--global-batch-size", type=int, default=32, help="conversations per optimizer step, all processes")
    p.add_argument("--micro-batch-size", type=int, default=1,
                   help="conversations packed into one row per forward pass, per process")
    p.add_argument("--optim", choices=["adamw", "adamw8bit"], default="adamw",
                   help="adamw8bit = bitsandbytes 8-bit AdamW (one process only)")
    p.add_argument("--lr", type=float, default=3e-5, help="peak learning rate")
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="fraction of --max-steps with linear warmup")
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="the cosine decays towards lr * this")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0 = no clipping)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, the validation split and LoRA init")
    # ---- LoRA / QLoRA
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
    p.add_argument("--lora-alpha", type=int, default=0, help="LoRA alpha (0 = 2 * rank)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    p.add_argument("--lora-targets", default="all-linear", help="comma-separated module names, or all-linear")
    p.add_argument("--load-in-4bit", action="store_true",
                   help="QLoRA: frozen NF4 base (bitsandbytes; one CUDA GPU; needs --lora-r)")
    p.add_argument("--merge-lora", action="store_true", help="also save base + merged adapter to final-merged/")
    # ---- checkpoints, eval, logging
    p.add_argument("--output-dir", default="runs/sft", help="run folder (on a shared filesystem for several nodes)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete the run already in --output-dir and start over")
    p.add_argument("--save-every", type=int, default=100, help="steps between resumable checkpoints (0 = at the end)")
    p.add_argument("--keep-last", type=int, default=1, help="resumable checkpoints kept, >= 1 (-1 = all)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between validation losses (0 = never)")
    p.add_argument("--stop-after", type=int, default=-1,
                   help="save and exit after this step, to be --resume'd (jobs with a time limit; -1 = never)")
    p.add_argument("--wandb-project", default=None, help="log to this Weights & Biases project (off by default)")
    return common.parse_with_preset(p, argv, {"tiny": TINY})


def check_args(args, world_size):
    """Refuse impossible flag values before anything is loaded (each error names its flag)."""
    for name in ("max_steps", "global_batch_size", "micro_batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise common.InputError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    for name, lo, hi in (("lr", 0.0, math.inf), ("warmup_ratio", 0.0, 1.0), ("min_lr_ratio", 0.0, 1.0),
                         ("weight_decay", 0.0, math.inf), ("grad_clip", 0.0, math.inf)):
        v = getattr(args, name)
        if not (math.isfinite(v) and lo <= v <= hi) or (name == "lr" and v == 0):
            raise common.InputError(f"--{name.replace('_', '-')} {v}: must be a finite number in "
                                    f"{'(' if name == 'lr' else '['}{lo:g}, {hi:g}{')' if hi == math.inf else ']'}")
    if args.val_rows < 0:
        raise common.InputError(f"--val-rows {args.val_rows}: must be >= 0 (0 = no validation split)")
    if args.global_batch_size % (args.micro_batch_size * world_size):
        raise common.InputError(f"--global-batch-size {args.global_batch_size} must be a multiple of --micro-batch-size "
                         f"{args.micro_batch_size} x {world_size} processes; change one of them")
    if (args.load_in_4bit or args.merge_lora) and args.lora_r <= 0:
        raise ValueError("--load-in-4bit and --merge-lora are LoRA options: also pass --lora-r (e.g. 64)")
    if args.eval_every > 0 and args.val_rows <= 0:
        raise ValueError("--eval-every needs a held-out split: pass --val-rows N")
    if args.keep_last == 0 or args.keep_last < -1:
        raise ValueError("--keep-last must be >= 1, or -1 to keep every checkpoint")
    if world_size > 1 and (args.load_in_4bit or args.optim == "adamw8bit"):
        raise ValueError("--load-in-4bit and --optim adamw8bit run in one process only (bitsandbytes does not take "
                         "FSDP2-sharded parameters); use one process or --optim adamw")


# ---------------------------------------------------------------------------------------------
# data: rows -> chat messages -> (token ids, assistant-token mask) -> packed rows


def row_messages(row):
    """The conversation of one FineProofs-SFT row, ending with its last assistant turn.

    Uses `messages` when the row has it, else builds user=problem, assistant=<think>reasoning</think>proof.
    Raises ValueError (without the row number; the caller adds it) for a malformed row."""
    msgs = row.get("messages")
    if msgs is None:
        if not isinstance(row.get("problem"), str) or not isinstance(row.get("proof"), str):
            raise ValueError("no `messages` and no string `problem` + `proof` to build them from")
        thinking = (row.get("reasoning_content") or "").strip()
        msgs = [{"role": "user", "content": row["problem"]},
                {"role": "assistant", "content": f"<think>\n{thinking}\n</think>\n\n{row['proof'].strip()}"}]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("`messages` must be a non-empty list of {role, content}")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {j} is not a {{role: str, content: str}} dict")
        if not m["content"].strip():
            raise ValueError(f"message {j} ({m['role']}) has empty content")
    last = max((j for j, m in enumerate(msgs) if m["role"] == "assistant"), default=-1)
    if last < 1:
        raise ValueError("the conversation has no assistant turn to train on" if last < 0 else
                         "the conversation starts with the assistant turn; it needs a user turn before it")
    keep = ("role", "content", "reasoning_content")  # the Qwen3 template reads reasoning_content if given
    return [{k: m[k] for k in keep if isinstance(m.get(k), str)} for m in msgs[:last + 1]]


def render_conversation(tokenizer, messages):
    """(prompt, answer, tail) strings from the chat template: prompt = everything before the last
    assistant turn plus the generation prompt (what the model is given at inference), answer = what
    it must generate (reasoning, proof, end-of-turn token), tail = template whitespace after that."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render the prompt + generation prompt as a prefix of the "
                         "conversation, so the assistant turn cannot be located; use a standard chat template")
    answer = full[len(prompt):].rstrip()
    return prompt, answer, full[len(prompt) + len(answer):]


def tokenize_conversations(tokenizer, conversations):
    """[(ids, mask)] with mask[t] = 1 on the assistant's tokens. Prompt and answer are tokenized
    separately, as at inference (the prompt is encoded alone, the model generates the rest)."""
    parts = [render_conversation(tokenizer, m) for m in conversations]
    enc = [tokenizer([p[k] for p in parts], add_special_tokens=False)["input_ids"] for k in range(3)]
    return [(p + a + t, [0] * len(p) + [1] * len(a) + [0] * len(t)) for p, a, t in zip(*enc)]


def load_examples(args, tokenizer):
    """Tokenized (ids, mask) examples of --data and a stats dict (rows, skipped, dropped, truncated)."""
    ds = common.load_rows(args.data, split=args.data_split, config=args.data_config)
    cols = set(ds.column_names)
    if "messages" not in cols and not {"problem", "proof"} <= cols:
        raise ValueError(f"data {args.data!r} has columns {sorted(cols)}; need `messages` (a list of {{role, "
                         "content}) or `problem`, `proof` (and `reasoning_content`) as in lm-provers/FineProofs-SFT")
    convs, skipped = [], 0
    for i, row in enumerate(ds):
        try:
            convs.append(row_messages(row))
        except ValueError as e:
            if args.bad_rows == "error":
                raise ValueError(f"data {args.data!r} row {i}: {e}; fix the row or pass --bad-rows skip") from None
            skipped += 1
    examples, dropped, truncated = [], 0, 0
    for ids, mask in tokenize_conversations(tokenizer, convs):
        if len(ids) > args.max_length:
            if args.overlong == "drop" or sum(mask[:args.max_length]) == 0:
                dropped += 1
                continue
            ids, mask, truncated = ids[:args.max_length], mask[:args.max_length], truncated + 1
        examples.append((ids, mask))
    stats = dict(rows=len(ds), skipped_bad=skipped, dropped_overlong=dropped, truncated=truncated, kept=len(examples))
    if not examples:
        raise ValueError(f"no usable conversations in {args.data!r} ({stats}); raise --max-length or fix the data")
    return examples, stats


def pack(examples, device):
    """Conversations packed into one row: input_ids (1, T), position_ids (1, T) restarting at 0 per
    conversation, targets (T,) = the next token where that token is the assistant's, else -100.
    Targets are shifted inside each conversation, so none points across a boundary."""
    ids, pos, tgt = [], [], []
    for e_ids, e_mask in examples:
        n = len(e_ids)
        ids += e_ids
        pos += range(n)
        tgt += [e_ids[t + 1] if e_mask[t + 1] else -100 for t in range(n - 1)] + [-100]
    as_t = functools.partial(torch.tensor, dtype=torch.long, device=device)
    return as_t(ids)[None], as_t(pos)[None], as_t(tgt)


def n_loss_tokens(example):
    return sum(example[1][1:])


def micro_batches(rows, lengths, rank, world_size, micro):
    """This rank's micro-batches (lists of example indices). Rows are sorted by length and dealt
    round-robin within each group of world * micro rows, so all ranks get similar work per micro-step."""
    rows = sorted(rows, key=lambda i: -lengths[i])
    group = world_size * micro
    return [rows[g:g + group][rank::world_size] for g in range(0, len(rows), group)]


# ---------------------------------------------------------------------------------------------
# model and optimizer


class CausalLMLoss(torch.nn.Module):
    """Summed cross-entropy of the targets from a causal LM's final hidden states, through
    kernels.linear_cross_entropy (gradients formed in the forward pass, no [T, V] logits).
    A module of its own so that under FSDP2 its forward gathers the embedding / lm-head weight."""

    def __init__(self, lm, compute_dtype):
        super().__init__()
        self.lm, self.compute_dtype = lm, compute_dtype

    def causal_lm(self):
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm  # peft wraps it

    def forward(self, input_ids, position_ids, targets):
        from kernels import linear_cross_entropy

        lm = self.causal_lm()
        hidden = lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        hidden = hidden.flatten(0, 1)  # (1, T, H) -> (T, H)
        keep = targets != -100
        if not bool(keep.all()):  # prompt tokens carry no loss: only the others go through the V-wide head
            hidden, targets = hidden[keep], targets[keep]  # (a copy of the kept rows; one host sync)
        weight = lm.lm_head.weight  # (V, H); tied to the embedding in Qwen3-4B
        return linear_cross_entropy(hidden.to(self.compute_dtype), weight.to(self.compute_dtype), targets,
                                    reduction="sum")


def build_model(args, device, world_size, lm=None):
    """(loss module, trainable params, compute dtype): fp32 master weights, bf16 compute on CUDA.
    `lm`: an already built fp32 causal LM to use instead of loading --model (bench/bench_sft.py's
    random-weight Qwen3-4B)."""
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    compute_dtype = torch.bfloat16 if bf16 else torch.float32
    attn = args.attn_implementation
    if lm is not None:
        lm = lm.to(device)
    elif args.load_in_4bit:  # QLoRA: from_pretrained quantizes the frozen base onto this GPU
        if device.type != "cuda":
            raise ValueError("--load-in-4bit needs a CUDA GPU (bitsandbytes 4-bit); drop it on CPU")
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                               bnb_4bit_use_double_quant=True)
        lm = AutoModelForCausalLM.from_pretrained(args.model, dtype=compute_dtype, quantization_config=q,
                                                  device_map={"": device.index or 0}, attn_implementation=attn)
    else:  # a one-process LoRA run keeps its frozen base in the compute dtype; the rest fp32
        dtype = compute_dtype if args.lora_r > 0 and world_size == 1 else torch.float32
        lm = common.load_model(args.model, dtype=dtype, device="cpu" if world_size > 1 else device,
                               attn_implementation=attn)
    lm.config.use_cache = False
    if args.gradient_checkpointing:
        enable = getattr(lm, "activation_checkpointing_enable", None)  # the newer transformers 5.x name
        enable() if enable else lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(args.seed)  # the LoRA A matrices are random
        targets = "all-linear" if args.lora_targets == "all-linear" else args.lora_targets.split(",")
        lm = get_peft_model(lm, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha or 2 * args.lora_r,
                                           lora_dropout=args.lora_dropout, target_modules=targets,
                                           task_type="CAUSAL_LM"))
        for p in lm.parameters():  # adapters train in fp32, also on a bf16 base
            if p.requires_grad:
                p.data = p.data.float()
    model = CausalLMLoss(lm, compute_dtype)
    if world_size > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        for layer in model.causal_lm().model.layers:
            fully_shard(layer, mp_policy=mp or MixedPrecisionPolicy())
        fully_shard(model, mp_policy=mp or MixedPrecisionPolicy())  # root: embedding (= lm head), final norm
    elif not args.load_in_4bit:
        model.to(device)
    return model, [p for p in model.parameters() if p.requires_grad], compute_dtype


def build_optimizer(args, params):
    if args.optim == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def lr_at(step, *, peak, total, warmup_ratio, min_ratio=0.0):
    """Learning rate of optimizer step `step` (0-based): linear warmup over ceil(warmup_ratio * total)
    steps, reaching `peak` at the last of them, then a cosine that would hit peak * min_ratio at step `total`."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------
# checkpoints: checkpoint.py's format; the Hugging Face export is this stage's own


def export_hf(model, tokenizer, path, rank, world_size, dtype):
    """save_pretrained (safetensors) of the trained model gathered from all ranks; LoRA: the adapter."""
    lm = model.lm
    if world_size > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        sd = {k.removeprefix("lm."): v for k, v in sd.items()}
    else:
        sd = {k: v.detach().cpu() for k, v in lm.state_dict().items()}
    if rank != 0:
        return
    if not hasattr(lm, "get_base_model"):  # full model: in the training precision, tied weights once
        names = {}
        for n, p in lm.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(n)
        tied = {n for group in names.values() for n in group[1:]}  # lm_head.weight is embed_tokens.weight
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items() if k not in tied}
    lm.save_pretrained(path, state_dict=sd, safe_serialization=True)
    tokenizer.save_pretrained(path)


def merge_lora(args, adapter_dir, tokenizer):
    """The base model (reloaded unquantized) with the trained adapter merged in -> final-merged/."""
    from peft import PeftModel

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    base = common.load_model(args.model, dtype=dtype, device="cpu")
    out = os.path.join(args.output_dir, "final-merged")
    PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print0(f"saved {out} (adapter merged)")


# ---------------------------------------------------------------------------------------------
# one optimizer step


def make_autocast(device, world_size, compute_dtype):
    """bf16 autocast over the fp32 master weights in one process; FSDP2 casts by itself (no-op context)."""
    return (torch.autocast(device.type, dtype=torch.bfloat16) if world_size == 1
            and compute_dtype == torch.bfloat16 else contextlib.nullcontext())


NonFiniteError = common.NonFiniteError


def train_step(model, opt, trainable, batches, total_tokens, device, world_size, autocast, grad_clip):
    """One optimizer step over this rank's micro-batches (`batches`: lists of (ids, mask) examples, each
    packed into one row): forward, backward, clipping, AdamW, zero_grad. The loss is divided by
    `total_tokens`, the loss tokens of the whole global batch. Returns (summed CE of this rank's
    micro-batches as a 0-dim float64 tensor, gradient norm before clipping)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for batch in batches:
        with autocast:
            ce = model(*pack(batch, device))  # summed CE of this micro-batch
        # FSDP averages gradients over ranks and each rank's CE is already over the global token
        # count, so scale by the world size to get their sum (a divide factor of 1 needs PREMUL_SUM,
        # which gloo lacks)
        (ce * (world_size / total_tokens)).backward()
        loss_sum += ce.detach()
    gnorm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip if grad_clip > 0 else float("inf"))
    gnorm = (gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm).item()
    if not math.isfinite(gnorm):  # before the optimizer step: the weights stay the last good ones
        raise NonFiniteError(f"the gradient norm is {gnorm} (summed loss {loss_sum.item()}): training stopped "
                             "before the optimizer step; the last checkpoint is the last good state (lower --lr, "
                             "check the data)")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum, gnorm


# ---------------------------------------------------------------------------------------------
# distributed helpers and throughput bookkeeping


def all_sum(x, world_size, device):
    """Sum of a number (or 0-dim tensor) over ranks, as a Python float (NCCL wants it on the GPU)."""
    t = torch.as_tensor(x, dtype=torch.float64).to(device)
    if world_size > 1:
        dist.all_reduce(t)
    return t.item()


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}  # dense, per GPU


def train_flops(n_params, cfg, seq_lens):
    """6 N per token (matmuls, forward + backward) plus causal attention 6 L d sum(len^2)."""
    d = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    return 6 * n_params * sum(seq_lens) + 6 * cfg.num_hidden_layers * d * sum(n * n for n in seq_lens)


def peak_mem_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---------------------------------------------------------------------------------------------
# the run


def load_policy(args, rank, world_size, device):
    """(tokenizer, model, trainable parameters, compute dtype), the tokenizer checked against the model."""
    if args.preset == "tiny" and args.model == common.TINY_MODEL_DIR:
        if rank == 0:
            common.make_tiny_model()
        barrier(world_size)
    tokenizer = common.load_tokenizer(args.tokenizer or args.model, flag="--tokenizer" if args.tokenizer else "--model")
    model, trainable, compute_dtype = build_model(args, device, world_size)
    common.check_tokenizer_matches(tokenizer, model.causal_lm(), args.tokenizer or args.model)
    n_params = sum(p.numel() for p in model.parameters())  # tied weights count once
    print0(f"model {args.model}: {n_params / 1e6:.1f}M params, {sum(p.numel() for p in trainable) / 1e6:.2f}M "
           f"trainable, compute {compute_dtype}, {world_size} process(es){' (FSDP2)' if world_size > 1 else ''}, "
           f"device {device}")
    return tokenizer, model, trainable, compute_dtype


def print_step(rec, max_steps):
    val_s = f" | val {rec['val_loss']:.4f}" if "val_loss" in rec else ""
    mfu = rec["mfu"]
    print0(f"step {rec['step']:05d}/{max_steps:05d} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | gnorm "
           f"{rec['gnorm']:.3f} | tok/s {rec['tok_s']:.0f} | mfu {'-' if mfu is None else f'{mfu:.2f}'} | "
           f"mem {rec['mem_gib']:.1f}G | dt {rec['dt']:.2f}s{val_s}")


def split_data(args, tokenizer, world_size):
    """(train examples, validation examples, load stats): --val-rows conversations held out by a seeded
    shuffle, the rest in file order."""
    examples, stats = load_examples(args, tokenizer)
    if args.val_rows >= len(examples):
        raise ValueError(f"--val-rows {args.val_rows} leaves no training data ({len(examples)} usable conversations)")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed)).tolist()
    val = [examples[i] for i in order[:args.val_rows]]
    train_ex = [examples[i] for i in sorted(order[args.val_rows:])]
    n_tokens = sum(len(e[0]) for e in train_ex)
    grad_accum = args.global_batch_size // (args.micro_batch_size * world_size)
    print0(f"data {args.data}: {stats['rows']} rows -> {len(train_ex)} train + {len(val)} val conversations; "
           f"dropped {stats['dropped_overlong']} longer than {args.max_length} tokens, truncated "
           f"{stats['truncated']}, skipped {stats['skipped_bad']} malformed; {n_tokens} train tokens, "
           f"{args.global_batch_size * args.max_steps / len(train_ex):.2f} epochs, {grad_accum} micro-batches/step")
    return train_ex, val, stats


def validation_loss(model, val, args, rank, world_size, device, autocast, pad_id):
    """Mean cross-entropy over all held-out assistant tokens (every rank calls it: FSDP2 collectives)."""
    model.eval()
    total, loss = sum(n_loss_tokens(e) for e in val), 0.0
    with torch.no_grad():
        for mb in micro_batches(range(len(val)), [len(e[0]) for e in val], rank, world_size, args.micro_batch_size):
            batch = [val[i] for i in mb] or [([pad_id], [0])]  # idle ranks still join FSDP
            with autocast:
                loss += model(*pack(batch, device)).detach()
    model.train()
    return all_sum(loss, world_size, device) / total


def main(args):
    """Run SFT with parsed `args`; returns dict(model=the trained CausalLMLoss, history=step records)."""
    rank, _, world_size, device = common.compute_init(args.device)
    check_args(args, world_size)
    stop = {"signal": None}  # SIGTERM / Ctrl-C: finish the step, save, exit
    old_handlers = {s: signal.signal(s, lambda signum, frame: stop.update(signal=signum))
                    for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _train(args, rank, world_size, device, stop)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)


def optimizer_step(step, args, model, opt, trainable, train_ex, lengths, lr, autocast, rank, world_size, device,
                   mfu_of):
    """Optimizer step `step` (0-based) on its rows of the epoch stream (lengths: train_ex's token counts);
    returns its metrics record."""
    t0 = time.time()
    rows = common.epoch_rows(len(train_ex), args.seed, step * args.global_batch_size, args.global_batch_size)
    total_tokens = sum(n_loss_tokens(train_ex[i]) for i in rows)  # of the whole global batch: every rank knows
    for g in opt.param_groups:
        g["lr"] = lr
    mbs = micro_batches(rows, lengths, rank, world_size, args.micro_batch_size)
    assert len(mbs) == args.global_batch_size // (args.micro_batch_size * world_size)
    try:
        loss_sum, gnorm = train_step(model, opt, trainable, [[train_ex[i] for i in mb] for mb in mbs],
                                     total_tokens, device, world_size, autocast, args.grad_clip)
    except NonFiniteError as e:
        raise NonFiniteError(f"step {step + 1}: {e}") from None
    loss = all_sum(loss_sum, world_size, device) / total_tokens
    seq_lens = [lengths[i] for i in rows]
    dt = time.time() - t0
    return dict(step=step + 1, loss=loss, lr=lr, gnorm=gnorm, tokens=sum(seq_lens), loss_tokens=total_tokens,
                tok_s=sum(seq_lens) / dt, mfu=mfu_of(seq_lens, dt), mem_gib=peak_mem_gib(device), dt=dt)


def peak_flops(device):
    """The GPU's dense bf16 peak (for MFU), or None where it is not in PEAK_BF16_FLOPS."""
    if device.type != "cuda":
        return None
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(device)), None)


def _train(args, rank, world_size, device, stop):
    opened = checkpoint.open_run(args, rank, world_size, RESUME_FREE_ARGS)
    if opened is None:
        return None
    resume_from, wandb_run = opened
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    common.set_seed(args.seed)

    # ---- tokenizer and model
    tokenizer, model, trainable, compute_dtype = load_policy(args, rank, world_size, device)
    cfg = model.causal_lm().config
    n_params = sum(p.numel() for p in model.parameters())  # tied weights count once
    autocast = make_autocast(device, world_size, compute_dtype)

    # ---- optimizer and schedule
    opt = build_optimizer(args, trainable)
    lr_of = functools.partial(lr_at, peak=args.lr, total=args.max_steps, warmup_ratio=args.warmup_ratio,
                              min_ratio=args.min_lr_ratio)

    # ---- data
    train_ex, val, stats = split_data(args, tokenizer, world_size)
    lengths = [len(e[0]) for e in train_ex]  # once: every step looks them up

    def evaluate():
        return validation_loss(model, val, args, rank, world_size, device, autocast, tokenizer.pad_token_id)

    # ---- resume (steps logged after the checkpoint are forgotten: they are redone)
    start = checkpoint.load(resume_from, model, opt, rank)["step"] if resume_from else 0
    print0(f"resumed from {resume_from} at step {start} ({start * args.global_batch_size} conversations done)"
           if resume_from else f"starting {args.output_dir}")
    if rank == 0:
        checkpoint.forget_after(start, metrics_path)
    history = []

    def save(step, path, resumable=True):
        state = dict(step=step, rows_consumed=step * args.global_batch_size, data=stats, last=history[-1:])
        checkpoint.save(path, export=lambda out: export_hf(model, tokenizer, out, rank, world_size, compute_dtype),
                        model=model, opt=opt, args=args, state=state, rank=rank, world_size=world_size,
                        resumable=resumable, keep_last=args.keep_last)
        print0(f"saved {path}")

    # ---- loop
    peak = peak_flops(device)
    model.train()
    for step in range(start, args.max_steps):
        rec = optimizer_step(step, args, model, opt, trainable, train_ex, lengths, lr_of(step), autocast, rank,
                             world_size, device, mfu_of=lambda seq_lens, dt: train_flops(n_params, cfg, seq_lens) / dt /
                             (peak * world_size) if peak else None)
        last = step + 1 == args.max_steps
        if args.eval_every > 0 and ((step + 1) % args.eval_every == 0 or last):
            rec["val_loss"] = evaluate()
        history.append(rec)
        print_step(rec, args.max_steps)
        if rank == 0:
            common.append_jsonl(metrics_path, rec)
            if wandb_run:
                wandb_run.log(rec, step=step + 1)
        stop_now = all_sum(stop["signal"] is not None, world_size, device) > 0  # all ranks stop together
        stopping = stop_now or step + 1 == args.stop_after
        if stopping or (args.save_every > 0 and (step + 1) % args.save_every == 0 and not last):
            save(step + 1, os.path.join(args.output_dir, f"step_{step + 1:05d}"))
        if stopping:
            why = f"signal {stop['signal']}" if stop_now else f"--stop-after {args.stop_after}"
            print0(f"stopped after step {step + 1} ({why}); continue with the same command plus --resume")
            if stop_now:
                raise SystemExit(128 + (stop["signal"] or signal.SIGTERM))
            return dict(model=model, history=history)

    # ---- the trained model
    final = os.path.join(args.output_dir, "final")
    save(args.max_steps, final, resumable=False)
    if args.merge_lora and rank == 0:
        merge_lora(args, final, tokenizer)
    if wandb_run:
        wandb_run.finish()
    return dict(model=model, history=history)


if __name__ == "__main__":
    try:
        common.cli(lambda: main(parse_args()))
    finally:
        common.compute_cleanup()
