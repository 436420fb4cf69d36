"""The policy side of rl.py: the trained model's pieces and what happens to its weights.

- the policy-gradient loss of a packed micro-batch through the lm head (kernels.linear_policy_loss on
  the final hidden states: no (tokens, vocab) logits), the sequences' log-probs, the optimizer step
  with its statistics by name (TrainStats) and the non-finite guard;
- packing: sequences -> micro-batches of at most --pack-tokens tokens, balanced over ranks;
- building the policy (fp32 master weights, LoRA, FSDP2), the frozen KL reference, the hf snapshot;
- the weights' way out: the push to the engine after each step, checkpoints (checkpoint.py's format),
  and the start-up probe that the engine's sampling log-probs are the ones the ratio divides by.

rl.py is the algorithm and calls these; nothing here knows about rewards, groups or the producer.
"""

import copy
import dataclasses
import os
from dataclasses import dataclass

import torch

import checkpoint
import common
import engines
from checkpoint import barrier
from common import print0


def from_rank0(obj, world_size):
    """Rank 0's dict on every rank (a broadcast when there are several); {"error": message} raises the
    same RuntimeError on all of them, so that every rank saves and stops together."""
    if world_size > 1:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        obj = box[0]
    if "error" in obj:
        raise RuntimeError(obj["error"])
    return obj


def plan_microbatches(seqs, world_size, max_tokens):
    """[rank][micro] -> [seq]: sequences go longest first to the least-loaded rank, then each rank's
    share is packed into micro-batches of <= max_tokens tokens. Every rank gets the same number of
    micro-batches (empty ones pad: FSDP needs the same forwards on every rank)."""
    load, shares = [0] * world_size, [[] for _ in range(world_size)]
    for s in sorted(seqs, key=lambda s: -s["num_tokens"]):
        r = min(range(world_size), key=lambda i: load[i])
        shares[r].append(s)
        load[r] += s["num_tokens"]
    plans = []
    for share in shares:
        micro, n = [], max_tokens
        for s in share:
            if n + s["num_tokens"] > max_tokens:
                micro.append([])
                n = 0
            micro[-1].append(s)
            n += s["num_tokens"]
        plans.append(micro)
    most = max(1, max(len(m) for m in plans))
    return [m + [[] for _ in range(most - len(m))] for m in plans]


def make_microbatch(seqs, pad_id, device):
    """One packed row: input_ids/position_ids (1, T) (positions restart per sequence, which transformers
    turns into a block-diagonal mask), tmask (T,) True where position t predicts completion token t+1,
    cu (S+1,) sequence offsets, advantages (S,), and per completion token targets/old_logp/weights/
    ref_logp (N,). No sequences: a 2-token dummy with weight 0 (a rank without data still runs FSDP's
    collectives)."""
    if not seqs:
        seqs = [{"prompt_ids": [pad_id], "completion_ids": [pad_id], "old_logp": [0.0], "weight": 0.0,
                 "advantage": 0.0}]
    ids, pos, comp, cu, targets, old, w, ref = [], [], [], [0], [], [], [], []
    for s in seqs:
        p, c = s["prompt_ids"], s["completion_ids"]
        ids += p + c
        pos += list(range(len(p) + len(c)))
        comp += [False] * len(p) + [True] * len(c)
        cu.append(len(ids))
        targets += c
        old += s["old_logp"]
        w += [s["weight"]] * len(c)
        ref += s.get("ref_logp") or [0.0] * len(c)
    f32 = dict(dtype=torch.float32, device=device)
    return {"input_ids": torch.tensor([ids], device=device), "position_ids": torch.tensor([pos], device=device),
            "tmask": torch.tensor(comp[1:] + [False], device=device), "cu": torch.tensor(cu, device=device),
            "advantages": torch.tensor([s["advantage"] for s in seqs], **f32),
            "targets": torch.tensor(targets, device=device), "old_logp": torch.tensor(old, **f32),
            "weights": torch.tensor(w, **f32), "ref_logp": torch.tensor(ref, **f32), "num_tokens": len(ids)}


# ---------------------------------------------------------------------------------------------
# Model pieces: final hidden states through a hook (so FSDP2's root hooks run), the lm head, the loss


def unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def tap_hidden(model):
    """Each forward leaves the final-norm output (1, T, H) in the returned dict under 'h'."""
    box = {}
    unwrap(model).model.norm.register_forward_hook(lambda mod, inp, out: box.__setitem__("h", out))
    return box


def completion_hidden(model, tap, mb):
    """(N, H) hidden states at the positions that predict completion tokens. logits_to_keep=1 keeps the
    model's own lm head to one row; the kernels apply the head to these rows."""
    model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], logits_to_keep=1, use_cache=False)
    return tap.pop("h")[0][mb["tmask"]]


def head_weight(model):
    return unwrap(model).get_output_embeddings().weight  # (V, H); FSDP2: unsharded after the root forward


def policy_loss(hidden, weight, mb, args):
    """(loss, stats) of a packed micro-batch given its completion rows' hidden states (N, H) and the lm
    head (V, H), through kernels.linear_policy_loss; the flags pick the variant."""
    from kernels import broadcast_advantages, linear_policy_loss

    adv = broadcast_advantages(mb["advantages"], mb["cu"], mb["tmask"])[mb["tmask"]]  # (N,)
    return linear_policy_loss(hidden, weight.to(hidden.dtype), mb["targets"], advantages=adv, old_logp=mb["old_logp"],
                              token_weights=mb["weights"], ref_logp=mb["ref_logp"] if args.kl_beta > 0 else None,
                              temperature=args.logp_temperature, ratio_mode=args.loss, ratio_cap=args.ratio_cap,
                              clip_low=args.clip_low, clip_high=args.clip_high, kl_beta=args.kl_beta,
                              entropy_coef=args.entropy_coef)


def microbatch_loss(model, tap, mb, args):
    return policy_loss(completion_hidden(model, tap, mb), head_weight(model), mb, args)


@torch.no_grad()
def sequence_logprobs(model, tap, seqs, temperature, pad_id, max_tokens):
    """Per sequence ({"prompt_ids", "completion_ids", ...}), the list of its completion tokens' log-probs
    under `model` (sampler or reference)."""
    from kernels import linear_logprob

    device = next(model.parameters()).device
    # packing records of the ids alone (the loss fields unused here), in the input's order
    recs = [{"prompt_ids": s["prompt_ids"], "completion_ids": s["completion_ids"], "i": i, "weight": 0.0,
             "advantage": 0.0, "old_logp": [0.0] * len(s["completion_ids"]),
             "num_tokens": len(s["prompt_ids"]) + len(s["completion_ids"])} for i, s in enumerate(seqs)]
    out = [None] * len(recs)
    for micro in plan_microbatches(recs, 1, max_tokens)[0]:
        mb = make_microbatch(micro, pad_id, device)
        hidden = completion_hidden(model, tap, mb)
        lp = linear_logprob(hidden, head_weight(model).to(hidden.dtype), mb["targets"],
                            temperature=temperature).float().cpu().tolist()
        for s in micro:
            out[s["i"]], lp = lp[:len(s["completion_ids"])], lp[len(s["completion_ids"]):]
    return out


def full_state_dict(model):
    """{name: full tensor}: gathers FSDP2 shards (a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Start-up probe: the engine's log-probs are the ones the importance ratio divides by

PROBE_PROMPT = [{"role": "user", "content": "Prove that the sum of two odd integers is even."}]


def check_sampler_logprobs(args, engine, policy, tap, tokenizer, rank, world_size, probe_tokens=32):
    """The ratio r_t = exp(logp_t - logp_sampler_t) assumes logp_sampler_t = log p(token) at --temperature,
    which is vLLM's --logprobs-mode processed_logprobs; a server started without it reports raw_logprobs
    (temperature 1) and the ratio of on-policy data is then off by the temperature (seen: mean 1.13,
    per token 0.16-1.77 at T 0.7). One short sample per server (top_p 1, top_k 0, so that no filtering
    enters either side), then the trainer's own log-probs of those tokens at --temperature and at 1
    (sequence_logprobs -> kernels.linear_logprob). Raises with the flag to add when the served ones are
    clearly closer to temperature 1, and when they differ by more than --logprob-probe-tol nats per token.
    Every rank calls this (an FSDP2 forward is a collective); rank 0 generates."""
    from engines import Sampling

    temperature = args.temperature if args.temperature > 0 else 1.0
    probe = {"seqs": []}
    if rank == 0:
        for e in engine.replicas:  # each server on its own
            where = getattr(e, "url", "the vLLM engine")
            sampling = Sampling(probe_tokens, temperature=temperature, top_p=1.0, top_k=0, seed=args.seed)
            c = e.generate([PROBE_PROMPT], sampling)[0]
            if c.error or not c.token_ids or c.logprobs is None or c.prompt_token_ids is None:
                probe = {"error": f"log-prob probe: {where} returned no tokens/log-probs ({c.error or 'empty'})"}
                break
            probe["seqs"].append({"prompt_ids": c.prompt_token_ids, "completion_ids": c.token_ids, "where": where,
                                  "served": c.logprobs, "old_logp": [0.0] * len(c.token_ids), "weight": 0.0,
                                  "advantage": 0.0})
    seqs = from_rank0(probe, world_size)["seqs"]
    at_t = sequence_logprobs(policy, tap, seqs, temperature, tokenizer.pad_token_id, args.pack_tokens)
    at_1 = sequence_logprobs(policy, tap, seqs, 1.0, tokenizer.pad_token_id, args.pack_tokens)
    for s, lt, l1 in zip(seqs, at_t, at_1):
        served = torch.tensor(s["served"], dtype=torch.float64)
        d_t = (served - torch.tensor(lt, dtype=torch.float64)).abs().mean().item()  # mean |diff|, nats per token
        d_1 = (served - torch.tensor(l1, dtype=torch.float64)).abs().mean().item()
        print0(f"log-prob probe: {s['where']}: mean |served - trainer| {d_t:.4f} nats/token at temperature "
               f"{temperature} ({d_1:.4f} at 1) over {len(served)} tokens")
        # raw_logprobs: clearly closer to temperature 1 than to T, and off T by more than rounding (a bf16
        # server: ~0.002 nats/token on the tiny model; raw ones there: ~0.075 off at T 0.7, ~0.002 at 1)
        if d_t > args.logprob_probe_tol / 10 and d_1 < d_t / 2:
            raise RuntimeError(f"{s['where']} reports log-probs before temperature (vLLM's default raw_logprobs: "
                               f"off by {d_t:.3f} nats/token from the sampling distribution at temperature "
                               f"{temperature}), so the importance ratio would be wrong: restart it with "
                               "--logprobs-mode processed_logprobs")
        if d_t > args.logprob_probe_tol:
            raise RuntimeError(f"{s['where']}: its log-probs differ from the trainer's by {d_t:.3f} nats/token "
                               f"(more than --logprob-probe-tol {args.logprob_probe_tol}): does it serve the "
                               "weights the trainer starts from (--model, or the resumed checkpoint), with "
                               "--logprobs-mode processed_logprobs?")


# ---------------------------------------------------------------------------------------------
# Weight sync to the engine, and the worker extension that --engine remote servers load


def push_weights(args, model, engine, lora_scale, version, rank):
    """Every rank calls this (gathering FSDP2 shards is a collective); rank 0 pushes."""
    if lora_scale:  # adapter-only sync: a few MB of adapter in a folder instead of the full weights
        if rank == 0:
            engines.push_adapter(model, engine, args.sync_dir or os.path.join(args.output_dir, "sync"), version,
                                 resumed=args.resume)
        return
    sd = full_state_dict(model)
    if rank == 0:
        engine.load_weights(sd.items(), version)


# ---------------------------------------------------------------------------------------------
# Checkpoints: Hugging Face layout + resume state (optimizer shards as safetensors: no pickles)


def save_checkpoint(path, policy, tokenizer, opt, state, args, rank, world_size, resumable=True, extra=None):
    """checkpoint.py's format; the export is in the compute dtype (bf16 on GPUs, what vLLM serves), the
    resume state keeps the fp32 master weights. state: {"step", "next_batch"}; extra: checkpoint.save's."""
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    checkpoint.save(path, export=lambda folder: export_hf(policy, tokenizer, folder, rank, dtype), model=policy,
                    opt=opt, args=args, state=state, rank=rank, world_size=world_size, resumable=resumable,
                    keep_last=args.keep_last, extra=extra)


def export_hf(policy, tokenizer, folder, rank, dtype):
    """save_pretrained of the policy gathered from all ranks (a collective), in `dtype`; LoRA: the adapter."""
    if hasattr(policy, "peft_config"):
        if rank == 0:
            policy.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        return
    sd = full_state_dict(policy)
    if rank == 0:
        unwrap(policy).save_pretrained(folder, state_dict={k: v.to("cpu", dtype) for k, v in sd.items()})
        tokenizer.save_pretrained(folder)


@dataclass
class TrainStats:
    """One step's training statistics on this rank, by name. reduce() sums the fields over ranks (one
    SUM all-reduce) except the max_* ones (one MAX all-reduce): a new statistic is a field here and the
    line in train_step that adds to it."""
    tokens: float = 0.0  # completion tokens with a weight (the sums below are over them)
    entropy: float = 0.0
    clipped: float = 0.0
    ratio: float = 0.0
    kl: float = 0.0
    loss: float = 0.0  # the sum of this rank's micro-batch losses (each already x world_size)
    train_tokens: float = 0.0  # prompt + completion tokens through the model
    max_ratio: float = -1e30
    max_neg_ratio: float = -1e30  # -min(ratio): the minimum, reduced as a maximum

    def reduce(self, world_size, device):
        """Totals over ranks, on the device (NCCL reduces CUDA tensors only)."""
        if world_size == 1:
            return self
        names = [f.name for f in dataclasses.fields(self)]
        for op, group in ((torch.distributed.ReduceOp.SUM, [n for n in names if not n.startswith("max_")]),
                          (torch.distributed.ReduceOp.MAX, [n for n in names if n.startswith("max_")])):
            t = torch.tensor([getattr(self, n) for n in group], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(t, op=op)
            for n, v in zip(group, t.tolist()):
                setattr(self, n, v)
        self.loss /= world_size  # each rank's loss carried the x world_size of training_sequences
        return self


NonFiniteError = common.NonFiniteError


def train_step(policy, tap, ref, ref_tap, opt, params, micro_seqs, args, lr, pad_id, device):
    """--ppo-epochs optimizer steps over this rank's micro-batches. Returns (TrainStats of the first
    pass, i.e. of the sampler's batch; grad norm; tokens through the model)."""
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")

    def autocast():  # bf16 compute over the fp32 master weights
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    micro = [make_microbatch(m, pad_id, device) for m in micro_seqs]
    if ref is not None:
        for m, mb in zip(micro_seqs, micro):
            if m:
                with autocast():
                    lps = sequence_logprobs(ref, ref_tap, m, args.logp_temperature, pad_id, args.pack_tokens)
                mb["ref_logp"] = torch.tensor([x for lp in lps for x in lp], dtype=torch.float32, device=device)
    stats = TrainStats(train_tokens=float(sum(mb["num_tokens"] for mb in micro)))
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # tokens, entropy, clipped, ratio, kl, loss
    highs = torch.full((2,), -1e30, dtype=torch.float64, device=device)  # max ratio, -min ratio
    gnorm = torch.zeros(())
    for epoch in range(args.ppo_epochs):
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        for mb in micro:
            with autocast():
                loss, st = microbatch_loss(policy, tap, mb, args)
            loss.backward()
            real = mb["weights"] != 0  # (N,) completion tokens that carry a loss
            if epoch == 0 and real.any():
                r = st["ratio"][real].double()
                kl = st["kl"][real].double().sum() if "kl" in st else r.new_zeros(())
                # accumulated on the device: one host sync per step (below), not eight per micro-batch
                sums = sums + torch.stack([real.sum().double(), st["entropy"][real].double().sum(),
                                           st["clipped"][real].double().sum(), r.sum(), kl, loss.detach().double()])
                highs = torch.maximum(highs, torch.stack([r.max(), -r.min()]))
        if epoch == 0:
            for name, v in zip(("tokens", "entropy", "clipped", "ratio", "kl", "loss", "max_ratio", "max_neg_ratio"),
                               torch.cat([sums, highs]).tolist()):
                setattr(stats, name, v)
        # the released 0.3 clips a gradient that DeepSpeed had divided by --grad-clip-divisor; ours is the
        # plain gradient of sum_t w_t loss_t, so the same clip is 0.3 x divisor here (README)
        clip = args.grad_clip * args.grad_clip_divisor if args.grad_clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(params, clip)
        gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
        if not torch.isfinite(gnorm):  # before the optimizer step: the weights stay the last good ones
            raise NonFiniteError(f"the gradient norm is {float(gnorm)} (loss {stats.loss}): training stopped "
                                 "before the optimizer step; the last checkpoint is the last good state (lower --lr, "
                                 "check the data)")
        opt.step()
    return stats, float(gnorm), int(stats.train_tokens)


def build_policy(args, rank, world_size, device):
    """(tokenizer, policy, ref, snapshot, lora_scale): the fp32 trained policy (LoRA-wrapped, FSDP2-sharded
    under torchrun), the frozen start policy for --kl-beta and the --engine hf sampling copy."""
    if args.model == common.TINY_MODEL_DIR and rank == 0:
        common.make_tiny_model()
    barrier(world_size)
    tokenizer = common.load_tokenizer(args.tokenizer or args.model, flag="--tokenizer" if args.tokenizer else "--model")
    policy = common.load_model(args.model, dtype=torch.float32, device=device)  # fp32 master weights
    common.check_tokenizer_matches(tokenizer, policy, args.tokenizer or args.model)
    # the KL reference is the start policy: copied before a resume restores the trained weights
    ref = copy.deepcopy(policy).eval().requires_grad_(False) if args.kl_beta > 0 else None
    lora_scale = args.lora_alpha / args.lora_r if args.lora_r else 0.0
    if args.lora_r:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                                                   target_modules=args.lora_targets, task_type="CAUSAL_LM"))
    snapshot = None
    if args.engine == "hf" and rank == 0:  # generation runs on a copy whose weights change only at sync points
        snap = copy.deepcopy(policy).eval().requires_grad_(False)
        snapshot = (snap, tap_hidden(snap))
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if args.lora_r:
            policy.enable_input_require_grads()
    policy.train()
    if world_size > 1:
        from torch.distributed.fsdp import fully_shard

        for m in [policy] + ([ref] if ref is not None else []):
            for layer in unwrap(m).model.layers:
                fully_shard(layer)
            fully_shard(m)  # the root (embeddings, norm, head) stays unsharded after forward: FSDP2's root default
    return tokenizer, policy, ref, snapshot, lora_scale
