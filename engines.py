"""Generation engines and the weight push: one contract, four engines, one flags-to-engine adapter.

    engine = make_engine("hf", "lm-provers/QED-Nano")     # or "vllm", "openai", "remote"
    engine = from_args(args)                              # what every stage's --engine ... flags build
    outs = engine.generate([[{"role": "user", "content": "Prove ..."}]], Sampling(49152))

The contract (every engine in ENGINES; the class Engine holds the optional parts' defaults):
    generate(prompts, sampling, thinking=True, progress=None) -> list[Completion], in prompt order.
        prompts: chat messages (the chat template is applied with enable_thinking=thinking) or token ids
        (not the openai engine); progress(n) is called as n prompts finish. A prompt that fails (no room
        in the context, a server error) comes back with finish_reason "error" and the batch goes on; bad
        arguments raise, and so does the openai engine when every request fails to connect or authenticate.
    tokenizer: the engine's tokenizer (None where a server tokenizes); context_length: tokens (None: unknown).
Optional (Engine's defaults: no-ops, or a ValueError naming the engine):
    sleeps: True when paused() frees memory, so nothing may generate inside it (default False).
    paused(): a context in which a colocated vLLM engine sleeps (weights to CPU memory, KV cache
        dropped) and after which it wakes; a no-op elsewhere.
    load_weights(named_tensors, version): the trainer's new weights ((HF name, tensor) pairs) replace the
        served ones (hf: copied into its model; vllm: through VLLMWorker; remote: bf16 over NCCL or a
        shared folder, then the servers' prefix caches are reset).
    load_lora(path, version, name=None): generate through the PEFT adapter saved in folder `path` from now
        on, under `name` (default policy-v<version>): the adapter-only weight sync (push_adapter).
    replicas: the engines behind this one that serve separately (one per server; [self] by default).
What RL needs back, per Completion: token_ids (the sampled tokens, EOS included when it stopped),
prompt_token_ids (what the model saw), and logprobs: log p(token) at the sampling temperature (the hf
engine: over the full vocabulary; vllm with processed_logprobs: after top-k/top-p; the openai and remote
engines only with logprobs=True and vLLM's return_token_ids).

vLLM loads our worker extension, and with it only this module and common:
    vllm serve MODEL --logprobs-mode processed_logprobs --worker-extension-cls engines.VLLMWorker
"""

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import shutil
import threading
import time

import torch

import common


# ---------------------------------------------------------------------------------------------
# what goes in and out of an engine


@dataclasses.dataclass
class Sampling:
    """Per-call sampling settings. temperature 0 = greedy; top_k 0 = off; top_p 1 = off.
    seed None = nondeterministic; engines derive one seed per request from it (seed + index).
    max_tokens is a cap: the hf and vllm engines clamp each request to what the model's context leaves
    after its prompt (Completion.max_tokens records the budget a request really had).
    The defaults are the released code's sampling (T 0.8, no nucleus, no top-k: eval's run scripts and
    RL's rollouts); the model card's T 0.6 / top_p 0.95 is Sampling(n, 0.6, 0.95)."""
    max_tokens: int
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False  # keep generating past EOS (benchmarks only)


@dataclasses.dataclass
class Completion:
    """One generated continuation.

    token_ids: the generated tokens, including the final EOS when finish_reason == "stop"
      (None when the engine does not expose them: the OpenAI engine).
    logprobs: per generated token, log p(token) under the temperature-scaled model distribution
      (see each engine for the exact definition), None if the engine was not asked / cannot.
    finish_reason: "stop" (EOS), "length" (hit max_tokens) or "error" (then `error` says why).
    """
    text: str
    token_ids: list | None
    logprobs: list | None
    finish_reason: str
    prompt_token_ids: list | None = None
    error: str | None = None
    num_tokens: int | None = None  # generated tokens when token_ids is None (from the server's usage)
    max_tokens: int | None = None  # the request's budget after clamping to the context (None: unknown)


def num_generated(c):
    return len(c.token_ids) if c.token_ids is not None else (c.num_tokens or 0)


def _reseed(sampling, offset):
    """A copy of `sampling` whose seed is shifted, so every engine call of a scaffold draws fresh samples."""
    return sampling if sampling.seed is None else dataclasses.replace(sampling, seed=sampling.seed + offset)


class Engine:
    """What every engine shares: the defaults of the contract's optional parts (module docstring): no
    sleep, one replica, and a ValueError naming the engine for a weight push it cannot take."""

    sleeps = False  # True: paused() frees memory, so nothing may generate inside it

    @property
    def replicas(self):  # the engines behind this one that serve separately (one per server)
        return [self]

    def paused(self):
        return contextlib.nullcontext()

    def load_weights(self, named_tensors, version):
        raise ValueError(f"{type(self).__name__} cannot load trainer weights (use --engine hf, vllm or remote)")

    def load_lora(self, path, version, name=None):
        raise ValueError(f"{type(self).__name__} cannot load a LoRA adapter (use --engine hf, vllm or remote)")


# ---------------------------------------------------------------------------------------------
# sampling on logits (shared by the HF decode loops; runs on the logits' device, no host sync)


def sample_tokens(logits, sampling, generator=None):
    """logits (B, V) -> (tokens (B,) int64, logprobs (B,) float32).

    logprob = log_softmax(logits / temperature)[token] over the FULL vocabulary, i.e. before top-k /
    top-p filtering: exactly what the trainer computes with the same temperature (rl.py's importance
    ratio). Greedy (temperature 0) reports log_softmax(logits) (temperature 1).
    """
    logits = logits.float()
    if sampling.temperature <= 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
    logp = torch.log_softmax(logits / sampling.temperature, -1)  # (B, V)
    kept = logp
    if 0 < sampling.top_k < logp.shape[-1]:
        kth = torch.topk(logp, sampling.top_k, dim=-1).values[:, -1:]  # (B, 1)
        kept = kept.masked_fill(kept < kth, -math.inf)
    if sampling.top_p < 1.0:
        srt, idx = torch.sort(kept, dim=-1, descending=True)
        p = torch.softmax(srt, -1)
        drop = (p.cumsum(-1) - p) >= sampling.top_p  # mass before this token already reaches top_p
        kept = kept.scatter(-1, idx, srt.masked_fill(drop, -math.inf))
    # inverse CDF: the first token whose cumulative probability reaches v ~ U(0, total] is one draw from
    # p (a filtered token adds nothing to the sum, so it is never first). One uniform per row and no host
    # sync: the exponential race, argmax(p / E) with E ~ Exp(1) per token, drew B x V random numbers, which
    # took 70% of a decode step of the tiny model on a CPU (0.3 s of 0.42 s at B 64, V 151,669).
    # The sum is unnormalized (kept holds log-probs, -inf where filtered): v is scaled by the row's total.
    # Summed in float64: in float32, a token's share of the running sum is rounded to ~6e-8, which is 1%
    # of a token's probability when 151,669 of them are near-uniform.
    cdf = kept.exp().cumsum(-1, dtype=torch.float64)
    u = torch.rand((logp.shape[0], 1), generator=generator, device=logp.device, dtype=torch.float64)
    tok = torch.searchsorted(cdf, (1 - u) * cdf[:, -1:])[:, 0]  # 1 - u in (0, 1]: v > 0, v <= total
    return tok, logp.gather(-1, tok[:, None])[:, 0]


# ---------------------------------------------------------------------------------------------
# Hugging Face engine


class _StaticKV:
    """A KV cache allocated once for (batch, max_len) and written in place, duck-typed as HF's Cache:
    each attention layer calls update(k, v, layer_idx) and attends over the returned buffers.
    `slots` (q,) = cache positions written by this forward; `span` = how many positions it attends."""

    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, dtype, device):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.batch, self.max_len = batch, max_len
        self.slots, self.span = None, max_len

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # (B, Hkv, q, D) each
        self.k[layer_idx].index_copy_(2, self.slots, key_states.to(self.k.dtype))
        self.v[layer_idx].index_copy_(2, self.slots, value_states.to(self.v.dtype))
        return self.k[layer_idx, :, :, :self.span], self.v[layer_idx, :, :, :self.span]


_STATIC_MODEL_TYPES = ("qwen3", "qwen2", "llama", "mistral")


class HFEngine(Engine):
    """transformers model + our decode loop: batched, sampling on the device, sampled-token logprobs.

    impl "static": a KV cache allocated once per batch shape, fixed-shape decode steps (positions and
      masks are tensors), captured as CUDA graphs on a GPU (one per attention-span bucket) and replayed;
      on CPU the same code runs eagerly. For Qwen3/Qwen2/Llama/Mistral with sdpa or eager attention.
    impl "dynamic": HF's DynamicCache and model(...) per step; works for any causal LM.
    impl "auto": static when supported.
    Prompts are sorted by length and cut into micro-batches of <= max_batch_size rows and <=
    max_batch_tokens cache slots (rows x (prompt + max_tokens)); outputs come back in input order.
    Rows that finish early keep their slot until the micro-batch ends (static batching).
    """

    def __init__(self, model, tokenizer=None, *, device=None, dtype=torch.bfloat16, impl="auto",
                 cuda_graphs=None, max_batch_size=64, max_batch_tokens=None, prefill_chunk=2048):
        if isinstance(model, str):
            tokenizer = tokenizer or model
            device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            try:
                model = common.load_model(model, dtype=dtype, device=device, attn_implementation="sdpa")
            except OSError as e:
                raise ValueError(f"could not load model {model!r}: give a hub id or a folder with "
                                 f"config.json and weights ({e})") from e
        if tokenizer is None:
            tokenizer = getattr(model.config, "_name_or_path", None)
            if not tokenizer:
                raise ValueError("make_engine('hf', model_object) needs tokenizer= (object or path)")
        self.tokenizer = common.load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        # a tokenizer with more tokens than the model's embedding rows would index past them (IndexError)
        common.check_tokenizer_matches(self.tokenizer, model, getattr(self.tokenizer, "name_or_path", "tokenizer"))
        self.model = model
        self.device = next(model.parameters()).device
        cfg = model.config
        self.context_length = getattr(cfg, "max_position_embeddings", None)
        eos = getattr(model.generation_config, "eos_token_id", None) if model.generation_config else None
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        eos |= {i for i in (self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>"))
                if isinstance(i, int) and i >= 0}
        self.eos_ids, self._eos = torch.tensor(sorted(eos), device=self.device), eos
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(eos)
        static_ok = (cfg.model_type in _STATIC_MODEL_TYPES
                     and getattr(cfg, "_attn_implementation", "sdpa") in ("sdpa", "eager")
                     and all(t == "full_attention" for t in (getattr(cfg, "layer_types", None) or [])))
        if impl == "auto":
            impl = "static" if static_ok else "dynamic"
        if impl not in ("static", "dynamic"):
            raise ValueError(f"impl={impl!r}: choose auto, static or dynamic")
        if impl == "static" and not static_ok:
            raise ValueError(f"impl='static' supports {_STATIC_MODEL_TYPES} with sdpa/eager attention and no "
                             f"sliding window; this model is {cfg.model_type!r}: use impl='dynamic'")
        self.impl = impl
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self.max_batch_size, self.prefill_chunk = max_batch_size, prefill_chunk
        n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._kv_shape = (cfg.num_hidden_layers, n_kv, head_dim)
        if max_batch_tokens is None:  # cache slots that fit in 60% of free GPU memory; CPU: bounded by rows
            max_batch_tokens = 1 << 40
            if self.device.type == "cuda":
                per_token = 2 * cfg.num_hidden_layers * n_kv * head_dim * next(model.parameters()).element_size()
                max_batch_tokens = int(0.6 * torch.cuda.mem_get_info(self.device)[0] / per_token)
        self.max_batch_tokens = max_batch_tokens
        self._cache, self._graphs, self._pool = None, {}, None

    # ---- the weight push (rl.py --engine hf: the model is the trainer's snapshot, changed only here)
    @torch.no_grad()
    def load_weights(self, named_tensors, version=None):
        """Copy the trainer's weights ((name, tensor) pairs, the model's own names) into the model."""
        self.model.load_state_dict(dict(named_tensors))

    def load_lora(self, path, version=None, name=None):
        """The adapter saved in folder `path` (PEFT's save_pretrained) replaces the adapter of the model,
        a PEFT model (rl.py --lora-r --engine hf: a copy of the trainer's)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        file = os.path.join(path, "adapter_model.safetensors")
        if not hasattr(self.model, "peft_config") or not os.path.exists(file):
            raise ValueError(f"load_lora: {path!r} holds no adapter_model.safetensors, or the hf engine's model "
                             "is not a PEFT model (give make_engine('hf', peft_model))")
        result = set_peft_model_state_dict(self.model, load_file(file))
        if result.unexpected_keys:
            raise ValueError(f"load_lora: {path!r} holds tensors this model has no place for: "
                             f"{result.unexpected_keys[:3]}")

    # ---- prompts
    def encode(self, prompt, thinking=True):
        """Token ids of one prompt: a list of chat messages (the chat template is applied with
        enable_thinking=thinking) or an already tokenized list of ints."""
        return _encode_prompt(self.tokenizer, prompt, thinking)

    # ---- public
    @torch.inference_mode()
    def generate(self, prompts, sampling, thinking=True, progress=None):
        """Completions for `prompts` (each a list of {role, content} messages or a list of token ids)."""
        _check_sampling(sampling)
        ids = [self.encode(p, thinking) for p in prompts]
        out = [None] * len(ids)
        budgets, errors = clamp_budgets(ids, sampling.max_tokens, self.context_length)
        for i, err in errors.items():
            out[i] = Completion("", None, None, "error", prompt_token_ids=ids[i], error=err)
        ok = [i for i in range(len(ids)) if i not in errors]
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in self._micro_batches(ok, ids, budgets):
                seed = None if sampling.seed is None else sampling.seed + batch[0]
                toks, lps = self._generate_batch([ids[i] for i in batch], [budgets[i] for i in batch], sampling, seed)
                for i, t, lp in zip(batch, toks, lps):
                    out[i] = self._completion(t[:budgets[i]], lp[:budgets[i]], ids[i], sampling, budgets[i])
                if progress:
                    progress(len(batch))
        finally:
            self.model.train(was_training)
        return out

    def _micro_batches(self, idx, ids, budgets):
        # longest prompt first, so a batch's rows have similar lengths and left padding wastes little; a
        # batch holds at most max_batch_size rows and rows x (longest prompt + largest budget) cache slots
        order = sorted(idx, key=lambda i: -len(ids[i]))
        batch = []
        for i in order:
            longest = len(ids[batch[0]]) if batch else len(ids[i])
            max_new = max(budgets[j] for j in batch + [i])
            if batch and (len(batch) >= self.max_batch_size
                          or (len(batch) + 1) * (longest + max_new) > self.max_batch_tokens):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def _completion(self, toks, lps, prompt_ids, sampling, budget):
        stop = [j for j, t in enumerate(toks) if t in self._eos] if not sampling.ignore_eos else []
        if stop:  # the EOS that stopped the row is kept: the contract's token_ids include it, as vLLM's do
            toks, lps, reason = toks[:stop[0] + 1], lps[:stop[0] + 1], "stop"
        else:
            reason = "length"
        text = self.tokenizer.decode(toks, skip_special_tokens=True)
        return Completion(text, toks, lps, reason, prompt_token_ids=list(prompt_ids), max_tokens=budget)

    def _generate_batch(self, batch_ids, budgets, sampling, seed):
        """(B rows of prompt ids, B budgets) -> (B lists of new token ids, B lists of logprobs), max(budgets)
        long each; row r is done after budgets[r] tokens (the caller cuts it there)."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
        B, P, N = len(batch_ids), max(len(x) for x in batch_ids), max(budgets)
        limit = torch.tensor(budgets, device=self.device)  # (B,)
        pad = torch.tensor([P - len(x) for x in batch_ids], device=self.device)  # left padding (B,)
        ids = torch.full((B, P), self.pad_id, dtype=torch.long, device=self.device)
        for r, x in enumerate(batch_ids):
            ids[r, P - len(x):] = torch.tensor(x, device=self.device)
        step = self._static_steps if self.impl == "static" else self._dynamic_steps
        out_tok = torch.full((B, N), self.pad_id, dtype=torch.long, device=self.device)
        out_lp = torch.zeros((B, N), dtype=torch.float32, device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        logits_fn = step(ids, pad, N)
        tok = None
        for t in range(N):
            logits = logits_fn(tok)  # (B, V): next-token logits given everything so far
            tok, lp = sample_tokens(logits, sampling, gen)
            tok = torch.where(done, self.pad_id, tok)
            out_tok[:, t], out_lp[:, t] = tok, lp
            done |= limit <= t + 1  # a row clamped to a shorter budget stops there
            if not sampling.ignore_eos:
                done |= torch.isin(tok, self.eos_ids)
            if t % 16 == 15 and bool(done.all()):  # the only host sync, every 16 steps
                break
        return out_tok.tolist(), out_lp.tolist()

    # ---- the generic path: HF's DynamicCache, one model() call per step
    def _dynamic_steps(self, ids, pad, N):
        from transformers import DynamicCache
        attn = (torch.arange(ids.shape[1], device=self.device)[None] >= pad[:, None]).long()  # (B, P)
        state = {"cache": DynamicCache(config=self.model.config), "attn": attn}

        def logits_fn(tok):
            if tok is None:  # prefill: positions count real tokens only, so a left-padded row starts at 0
                x, pos = ids, (attn.cumsum(-1) - 1).clamp_min(0)
            else:
                state["attn"] = torch.cat([state["attn"], torch.ones_like(tok[:, None])], 1)
                x, pos = tok[:, None], (state["attn"].sum(-1, keepdim=True) - 1)
            out = self.model(input_ids=x, attention_mask=state["attn"], position_ids=pos,
                             past_key_values=state["cache"], use_cache=True, logits_to_keep=1)
            state["cache"] = out.past_key_values
            return out.logits[:, -1]
        return logits_fn

    # ---- the fast path: static cache, fixed-shape decode step, CUDA graphs on a GPU
    def _static_steps(self, ids, pad, N):
        B, P = ids.shape
        T = -(-(P + N) // 256) * 256  # cache length rounded up, so nearby lengths share a cache and graphs
        if self._cache is None or (self._cache.batch, self._cache.max_len) != (B, T):
            self._cache, self._graphs, self._pool = None, {}, None  # free the old cache and graphs first
            L, Hkv, D = self._kv_shape
            self._cache = _StaticKV(L, B, Hkv, T, D, next(self.model.parameters()).dtype, self.device)
            self._tok_buf = torch.zeros((B, 1), dtype=torch.long, device=self.device)
            self._slot_buf = torch.zeros(1, dtype=torch.long, device=self.device)
            self._pad_buf = torch.zeros(B, dtype=torch.long, device=self.device)
        cache, decoder, head = self._cache, self.model.get_decoder(), self.model.get_output_embeddings()
        self._pad_buf.copy_(pad)
        # prefill in chunks: query rows c0..c1 attend to cache slots < c1 (causal, skipping left padding)
        kpos = torch.arange(T, device=self.device)
        h = None
        for c0 in range(0, P, self.prefill_chunk):
            c1 = min(P, c0 + self.prefill_chunk)
            q = kpos[c0:c1]
            mask = (kpos[None, None, :c1] <= q[None, :, None]) & (kpos[None, None, :c1] >= pad[:, None, None])
            mask |= kpos[None, None, :c1] == q[None, :, None]  # padding rows see themselves (no empty softmax)
            cache.slots, cache.span = q, c1
            h = decoder(input_ids=ids[:, c0:c1], attention_mask={"full_attention": mask[:, None]},
                        position_ids=(q[None] - pad[:, None]).clamp_min(0), past_key_values=cache,
                        use_cache=True).last_hidden_state
        first = head(h[:, -1]).float()
        bucket = max(256, -(-T // 16 // 256) * 256)  # attention-span buckets: at most ~16 graphs per shape

        def decode_step(span):  # reads only the static buffers: capturable as a CUDA graph
            slot, padb = self._slot_buf, self._pad_buf
            mask = (kpos[None, :span] <= slot) & (kpos[None, :span] >= padb[:, None])  # (B, span)
            cache.slots, cache.span = slot, span
            h = decoder(input_ids=self._tok_buf, attention_mask={"full_attention": mask[:, None, None]},
                        position_ids=slot[None] - padb[:, None], past_key_values=cache,
                        use_cache=True).last_hidden_state
            return head(h[:, -1]).float()

        state = {"slot": P}

        def logits_fn(tok):
            if tok is None:
                return first
            slot = state["slot"]
            state["slot"] += 1
            self._tok_buf.copy_(tok[:, None])
            self._slot_buf.fill_(slot)
            span = min(T, -(-(slot + 1) // bucket) * bucket)
            if not self.cuda_graphs:
                return decode_step(span)
            return self._graph_replay(span, decode_step)
        return logits_fn

    def _graph_replay(self, span, decode_step):
        if span not in self._graphs:
            # warm up on a side stream (the write it does is the one the replay repeats), then capture;
            # all graphs of this cache share one memory pool since they never run concurrently
            s = torch.cuda.Stream(self.device)
            s.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(s):
                decode_step(span)
            torch.cuda.current_stream(self.device).wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool):
                out = decode_step(span)
            self._pool = g.pool()
            self._graphs[span] = (g, out)
        g, out = self._graphs[span]
        g.replay()
        return out


def _encode_prompt(tokenizer, prompt, thinking):
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if (not isinstance(prompt, (list, tuple)) or not prompt
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in prompt)):
        raise ValueError(f"a prompt must be a non-empty list of {{'role', 'content'}} messages or of token "
                         f"ids; got {str(prompt)[:200]!r}")
    text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True,
                                         enable_thinking=thinking)
    return tokenizer(text, add_special_tokens=False).input_ids


def clamp_budgets(ids, max_tokens, context_length):
    """Per prompt, the new-token budget min(max_tokens, context - prompt length), and {index: error} for
    prompts that leave no room at all. The released eval asks for 229,376 new tokens per call whatever
    the prompt holds (an RC summary's prompt holds a whole reasoning turn), so a budget is a cap."""
    budgets, errors = [], {}
    for i, x in enumerate(ids):
        room = context_length - len(x) if context_length else max_tokens
        budgets.append(min(max_tokens, room))
        if room < 1:
            errors[i] = (f"prompt {i} has {len(x)} tokens: no room for new tokens in the model's context of "
                         f"{context_length}; shorten the prompt or use a longer context (--max-model-len)")
    return budgets, errors


def _check_sampling(s):
    if not isinstance(s, Sampling):
        raise ValueError(f"sampling must be an engines.Sampling, got {type(s).__name__}")
    if s.max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {s.max_tokens}")
    if s.temperature < 0 or not 0 < s.top_p <= 1 or s.top_k < 0:
        raise ValueError(f"bad sampling settings {s}: need temperature >= 0, 0 < top_p <= 1, top_k >= 0")


# ---------------------------------------------------------------------------------------------
# vLLM engine (in-process vllm.LLM)


class VLLMEngine(Engine):
    """vllm.LLM in this process, fed token prompts (our chat template, so enable_thinking is ours).

    Per request seed = sampling.seed + index (one seed for a whole group would give identical samples).
    logprobs: vLLM's "processed_logprobs" mode, the log-prob of the sampled token under the
    temperature-scaled distribution AFTER top-k/top-p filtering and renormalization. With top_p=1 and
    top_k=0 this equals the HF engine's definition; with a nucleus it is higher by -log(kept mass).
    """

    def __init__(self, model, tokenizer=None, *, dtype="bfloat16", max_model_len=None,
                 gpu_memory_utilization=0.9, seed=0, logprobs_mode="processed_logprobs", **llm_kwargs):
        from vllm import LLM
        if tokenizer is not None and not isinstance(tokenizer, str):  # a loaded tokenizer: vLLM loads its own copy
            tokenizer = tokenizer.name_or_path
        self.tokenizer = common.load_tokenizer(tokenizer or model)
        self.llm = LLM(model=model, tokenizer=tokenizer or model, dtype=dtype, max_model_len=max_model_len,
                       gpu_memory_utilization=gpu_memory_utilization, seed=seed, logprobs_mode=logprobs_mode,
                       worker_extension_cls="engines.VLLMWorker", **llm_kwargs)
        self.context_length = self.llm.llm_engine.model_config.max_model_len
        self._dtype = self.llm.llm_engine.model_config.dtype
        self.lora_request = None  # set by load_lora: every request then runs through that adapter
        self.sleeps = bool(llm_kwargs.get("enable_sleep_mode"))
        self._asleep = []  # what paused() put to sleep and nothing has woken yet

    @contextlib.contextmanager
    def paused(self):
        """Level-1 sleep: the weights go to CPU memory, the KV cache is dropped; on the way out what is still
        asleep wakes (load_weights wakes the weights first, so a push inside costs no KV cache memory)."""
        if not self.sleeps:
            yield
            return
        self.llm.sleep(level=1)
        self._asleep = ["weights", "kv_cache"]
        try:
            yield
        finally:
            self._wake("weights", "kv_cache")

    def _wake(self, *tags):
        for tag in [t for t in self._asleep if t in tags]:
            self.llm.wake_up(tags=[tag])
            self._asleep.remove(tag)

    def generate(self, prompts, sampling, thinking=True, progress=None):
        from vllm import SamplingParams
        _check_sampling(sampling)
        ids = [_encode_prompt(self.tokenizer, p, thinking) for p in prompts]
        budgets, errors = clamp_budgets(ids, sampling.max_tokens, self.context_length)
        ok = [i for i in range(len(ids)) if i not in errors]
        params = [SamplingParams(max_tokens=budgets[i], temperature=sampling.temperature,
                                 top_p=sampling.top_p, top_k=sampling.top_k, logprobs=0,
                                 ignore_eos=sampling.ignore_eos,
                                 seed=None if sampling.seed is None else sampling.seed + i) for i in ok]
        outs = self.llm.generate([{"prompt_token_ids": ids[i]} for i in ok], params, use_tqdm=False,
                                 lora_request=self.lora_request) if ok else []
        res = [Completion("", None, None, "error", prompt_token_ids=ids[i], error=errors[i]) if i in errors
               else None for i in range(len(ids))]
        for i, o in zip(ok, outs):
            c = o.outputs[0]
            lps = [d[t].logprob for t, d in zip(c.token_ids, c.logprobs)] if c.logprobs is not None else None
            reason = c.finish_reason if c.finish_reason in ("stop", "length") else "stop"
            res[i] = Completion(c.text, list(c.token_ids), lps, reason, prompt_token_ids=ids[i], max_tokens=budgets[i])
        if progress:
            progress(len(res))
        return res

    def load_weights(self, named_tensors, version=None, chunk_bytes=1 << 29):
        """Push trainer weights ((HF name, tensor) pairs, e.g. model.state_dict().items()) into the running
        engine, ~chunk_bytes per RPC, cast to the engine's dtype; returns the number of tensors loaded.
        For a trainer in another process or node, save_pretrained to a shared folder and call
        load_weights_from_path(folder) instead."""
        self._wake("weights")
        chunk, size, n = [], 0, 0
        for name, t in named_tensors:
            t = t.detach().to("cpu", self._dtype if t.is_floating_point() else t.dtype).contiguous()
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
            chunk.append((name, str(t.dtype).split(".")[-1], list(t.shape), raw))
            size += t.numel() * t.element_size()
            if size >= chunk_bytes:
                n += self.llm.collective_rpc("qed_load_weights", args=(chunk,))[0]
                chunk, size = [], 0
        if chunk:
            n += self.llm.collective_rpc("qed_load_weights", args=(chunk,))[0]
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        return n

    def load_lora(self, path, version, name=None):
        """Generate through the LoRA adapter in folder `path` (PEFT's save_pretrained) from now on: the
        adapter-only weight sync. Needs LLM(enable_lora=True, max_lora_rank >= r). A new id per version
        makes vLLM read the new adapter instead of reusing the one it cached."""
        from vllm.lora.request import LoRARequest
        if not os.path.exists(os.path.join(path, "adapter_config.json")):
            raise ValueError(f"load_lora: {path!r} holds no adapter_config.json (save a PEFT adapter there)")
        self.lora_request = LoRARequest(name or f"policy-v{version}", version + 1, os.path.abspath(path))

    def load_weights_from_path(self, path):
        """Load a checkpoint folder (save_pretrained's safetensors, HF names) into the running engine."""
        if not os.path.isdir(path):
            raise ValueError(f"load_weights_from_path: {path!r} is not a checkpoint folder")
        self.llm.collective_rpc("qed_load_weights_from_path", args=(os.path.abspath(path),))
        self.llm.reset_prefix_cache()


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible engine (vllm serve, SGLang, hosted APIs)


class OpenAIEngine(Engine):
    """POST {base_url}/chat/completions, `concurrency` requests in flight. 429 (waiting at least its
    Retry-After), 5xx, timeouts, connection errors and malformed replies are retried up to max_retries
    times with exponential backoff and jitter; then that item gets finish_reason "error" and the rest of
    the batch completes. If every item of a call fails to connect, to authenticate or with a 4xx (a
    misconfiguration rather than a bad item), it raises instead.
    A reasoning server's `reasoning_content` is put back as <think>...</think> in front of the answer.
    token_ids / prompt_token_ids are filled when the server returns them (vLLM with
    extra_body={"return_token_ids": True}); logprobs with logprobs=True."""

    def __init__(self, model, *, base_url="http://localhost:8000/v1", api_key_env="OPENAI_API_KEY",
                 concurrency=32, timeout=3600.0, max_retries=6, backoff=1.0, max_backoff=60.0,
                 send_thinking=True, logprobs=False, extra_body=None):
        import httpx
        self.model, self.url = model, base_url.rstrip("/") + "/chat/completions"
        self.api_key_env = api_key_env
        key = os.environ.get(api_key_env) if api_key_env else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers,
                                   limits=httpx.Limits(max_connections=concurrency))
        self.concurrency, self.max_retries = concurrency, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.send_thinking, self.logprobs, self.extra_body = send_thinking, logprobs, extra_body or {}
        self.context_length, self.tokenizer = None, None

    def generate(self, prompts, sampling, thinking=True, progress=None):
        _check_sampling(sampling)
        bodies = [self._payload(i, p, sampling, thinking) for i, p in enumerate(prompts)]
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as ex:
            res = list(ex.map(lambda b: self._one(b, progress), bodies))
        fatal = [c for c in res if c.error and c.error.startswith(("connection", "auth", "HTTP 4"))]
        if res and len(fatal) == len(res):
            raise RuntimeError(f"OpenAI-compatible server at {self.url} failed for all {len(res)} requests: "
                               f"{fatal[0].error}")
        return res

    def _payload(self, i, messages, s, thinking):
        if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
            raise ValueError(f"the openai engine takes chat messages, not token ids (prompt {i})")
        body = {"model": self.model, "messages": messages, "max_tokens": s.max_tokens,
                "temperature": s.temperature, "top_p": s.top_p, **self.extra_body}
        if s.top_k > 0:
            body["top_k"] = s.top_k
        if s.seed is not None:
            body["seed"] = s.seed + i
        if self.send_thinking:
            body["chat_template_kwargs"] = {"enable_thinking": thinking}
        if self.logprobs:
            body["logprobs"] = True
        if s.ignore_eos:
            body["ignore_eos"] = True
        return body

    def _one(self, body, progress):
        import httpx
        err = None
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                r = self.client.post(self.url, json=body)
            except httpx.TimeoutException:
                err = "timeout"
            except httpx.TransportError as e:
                err = f"connection error ({type(e).__name__}: {e})"
            else:
                if r.status_code == 429 or r.status_code >= 500:
                    err, retry_after = f"HTTP {r.status_code}: {r.text[:200]}", common.retry_after_s(r.headers)
                elif r.status_code in (401, 403):
                    err = (f"auth failed (HTTP {r.status_code}): set the API key in the environment variable "
                           f"{self.api_key_env!r}")
                    break
                elif r.status_code >= 400:
                    err = f"HTTP {r.status_code} (not retried): {r.text[:300]}"
                    break
                else:
                    try:
                        c = _parse_chat_reply(r.json())
                        if progress:
                            progress(1)
                        return c
                    except (ValueError, KeyError, IndexError, TypeError) as e:
                        err = f"malformed reply ({type(e).__name__}: {e}): {r.text[:200]!r}"
            if attempt < self.max_retries:
                time.sleep(common.retry_delay(attempt, self.backoff, self.max_backoff, retry_after))
        if progress:
            progress(1)
        return Completion("", None, None, "error", error=f"{err} (after {attempt + 1} attempts)")


def _parse_chat_reply(data):
    choice = data["choices"][0]
    msg = choice["message"]
    content = msg.get("content") or ""
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    if not isinstance(content, str) or (reasoning is not None and not isinstance(reasoning, str)):
        raise TypeError("message content is not text")
    text = f"<think>\n{reasoning}\n</think>\n\n{content}" if reasoning else content
    lps = None
    if choice.get("logprobs") and choice["logprobs"].get("content") is not None:
        lps = [float(t["logprob"]) for t in choice["logprobs"]["content"]]
    usage = data.get("usage") or {}
    ids, prompt_ids = choice.get("token_ids"), data.get("prompt_token_ids")  # vLLM's return_token_ids extension
    if ids is not None and not all(isinstance(t, int) for t in ids):
        raise TypeError("token_ids are not integers")
    return Completion(text, ids, lps, "length" if choice.get("finish_reason") == "length" else "stop",
                      prompt_token_ids=prompt_ids, num_tokens=usage.get("completion_tokens"))


# ---------------------------------------------------------------------------------------------
# remote vLLM servers (rl.py --engine remote): rollouts split over them, weights over NCCL or a shared folder


def server_post(base, endpoint, body, what, hint, timeout=3600, reply=None):
    """POST body to a vLLM server's base/endpoint: None if it answered 200 (its text appended to `reply`, a
    list, when given), else an error naming the server."""
    import httpx

    try:
        r = httpx.post(f"{base}/{endpoint}", json=body, timeout=timeout)
    except httpx.HTTPError as e:
        return f"vLLM server {base} did not answer {what} ({type(e).__name__}: {e}); is it still running?"
    if r.status_code != 200:
        return f"vLLM server {base} refused {what} (HTTP {r.status_code}: {r.text[:300]}); {hint}"
    if reply is not None:
        reply.append(r.text)
    return None


def prune_versions(root, prefix, oldest_kept):
    """Delete the sync folders <root>/<prefix>NNNNN older than <prefix><oldest_kept>."""
    for d in os.listdir(root):
        if d.startswith(prefix) and d < f"{prefix}{oldest_kept:05d}":
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


_RESUME_TAG = {}


def push_adapter(model, engine, root, version, resumed=False):
    """The adapter-only weight sync (--lora-r): save the PEFT adapter to <root>/lora_vNNNNN and have `engine`
    generate through it under the name policy-vN (engine.load_lora). A new name and folder per version is
    what keeps a vLLM server's prefix cache honest (its keys hold the adapter's name and path, not its
    weights); a resumed run pushes versions the servers may have seen from the run before it, with other
    weights, so its names and folders carry a tag of this process (policy-vN-rTAG)."""
    root = os.path.abspath(root)
    tag = ""
    if resumed:  # one tag per trainer process: pid + clock
        tag = "-r" + _RESUME_TAG.setdefault("tag", f"{os.getpid()}{int(time.time()) % 100000:05d}")
    path = os.path.join(root, f"lora_v{version:05d}{tag}")
    model.save_pretrained(path)
    engine.load_lora(path, version, name=f"policy-v{version}{tag}")
    prune_versions(root, "lora_v", version - 1)  # keep the one before too: a server may still be reading it


def reset_prefix_caches(urls, attempts=5):
    """POST /reset_prefix_cache on every server after a weight load. An in-place reload leaves vLLM's prefix
    cache alone, so a prompt that shares full KV blocks (128 tokens on vLLM's CPU build, 16 on GPUs) with an
    earlier request reuses keys and values computed with the old weights (tests/test_vllm_server.py: an
    876-token prompt's log-probs then matched neither the old nor the new weights). The route needs
    VLLM_SERVER_DEV_MODE=1; {"success": false} means running requests still hold blocks, so it is retried
    (none should run: the producer waits on the engine lock during a push)."""
    errors = []
    for url in urls:
        for attempt in range(attempts):
            reply = []
            err = server_post(url, "reset_prefix_cache", None, "reset_prefix_cache", "start it with "
                              "VLLM_SERVER_DEV_MODE=1 (else its prefix cache keeps KV computed with old weights)",
                              600, reply)
            if err or '"success":false' not in reply[0].replace(" ", ""):
                break
            err = f"vLLM server {url} kept its prefix cache after {attempt + 1} resets (blocks still held)"
            time.sleep(1.0)
        if err:
            errors.append(err)
    return errors


_NCCL = {}


class RemoteVLLMEngine(Engine):
    """vLLM servers (`vllm serve ... --worker-extension-cls engines.VLLMWorker`), one OpenAIEngine each,
    behind one generate(): prompts are split evenly, request seeds stay sampling.seed + prompt index.
    servers: base URLs without /v1. load_weights sends bf16 (what the servers serve: half the bytes) by NCCL
    broadcast from this process into VLLMWorker.qed_nccl_recv (weight_sync "nccl", nccl_master host:port
    reachable from the servers, server_gpus GPUs each), or as safetensors in sync_dir that every server
    reloads ("fs"); then every server's prefix cache is reset."""

    def __init__(self, servers, model, *, weight_sync="fs", sync_dir="sync", nccl_master="", server_gpus=1,
                 **openai_kw):
        self.urls = [u.strip().rstrip("/") for u in servers if u.strip()]
        if not self.urls:
            raise ValueError("the remote engine needs at least one server URL (--servers http://host:port)")
        openai_kw = {"logprobs": True, "concurrency": 512, "extra_body": {"return_token_ids": True}, **openai_kw}
        self.engines = [OpenAIEngine(model, base_url=u + "/v1", **openai_kw) for u in self.urls]
        self.tokenizer, self.context_length = None, None
        self.weight_sync = weight_sync
        self.sync_dir = sync_dir
        self.nccl_master = nccl_master
        self.server_gpus = server_gpus

    @property
    def replicas(self):
        return self.engines

    def generate(self, prompts, sampling, thinking=True, progress=None):
        k = -(-len(prompts) // len(self.engines))
        parts = [(e, prompts[i * k:(i + 1) * k], i * k) for i, e in enumerate(self.engines)]
        with concurrent.futures.ThreadPoolExecutor(len(parts)) as ex:
            outs = ex.map(lambda x: x[0].generate(x[1], _reseed(sampling, x[2]), thinking=thinking,
                                                  progress=progress), parts)
            return [c for o in outs for c in o]

    def load_lora(self, path, version, name=None):
        """Each server loads the adapter in `path` (POST /v1/load_lora_adapter; the servers run with
        --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, and see the folder on a shared filesystem)
        and serves it under `name`, which the rollout requests then ask for; the previous one is unloaded."""
        name = name or f"policy-v{version}"
        errors = []
        for e, base in zip(self.engines, self.urls):
            old = e.model
            err = server_post(base + "/v1", "load_lora_adapter", {"lora_name": name, "lora_path": path},
                              "load_lora_adapter", "start it with --enable-lora --max-lora-rank R and "
                              f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, with {os.path.dirname(path)} on a filesystem "
                              "it can read", timeout=600)
            if err:
                errors.append(err)
                continue
            e.model = name
            if old.startswith("policy-v"):  # the previous version: nothing is generating with it now
                err = server_post(base + "/v1", "unload_lora_adapter", {"lora_name": old}, "unload_lora_adapter", "",
                                  600)
                if err:  # costs the server some memory, not correctness
                    common.print0(f"warning: {err}")
        if errors:
            raise RuntimeError("weight sync failed: " + "; ".join(errors))

    def load_weights(self, named_tensors, version):
        """NCCL broadcast into VLLMWorker.qed_nccl_recv, or safetensors the servers reload (weight_sync fs)."""
        sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in named_tensors}
        errors = []  # the rpc threads' failures, raised by join() in the caller's thread

        def rpc(url, method, *a):
            err = server_post(url, "collective_rpc", {"method": method, "args": [str(x) for x in a]}, method,
                              "start it with VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls engines.VLLMWorker")
            if err:
                errors.append(err)

        def on_all(method, per_url):  # per_url: the rpc arguments of each server
            ts = [threading.Thread(target=rpc, args=(u, method, *a)) for u, a in zip(self.urls, per_url)]
            for t in ts:
                t.start()
            return ts

        def join(ts):
            for t in ts:
                t.join()
            if errors:
                raise RuntimeError("weight sync failed: " + "; ".join(errors))

        if self.weight_sync == "fs":
            self._push_folder(sd, version, on_all, join)
        else:
            self._push_nccl(sd, on_all, join)
        errors.extend(reset_prefix_caches(self.urls))
        join([])  # raises what failed
        if self.weight_sync == "fs":  # every server holds it: older copies fill the disk
            prune_versions(os.path.abspath(self.sync_dir), "v", version)

    def _push_folder(self, sd, version, on_all, join):
        from safetensors.torch import save_file

        path = os.path.abspath(os.path.join(self.sync_dir, f"v{version:05d}"))
        os.makedirs(path, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in sd.items()}, os.path.join(path, "model.safetensors"))
        join(on_all("qed_load_dir", [[path]] * len(self.urls)))

    def _push_nccl(self, sd, on_all, join):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        n = len(self.urls)
        if "comm" not in _NCCL:  # one group: the trainer (rank 0) and every server GPU
            host, port = self.nccl_master.rsplit(":", 1)
            world = 1 + n * self.server_gpus
            ts = on_all("qed_nccl_init", [[host, port, 1 + i * self.server_gpus, world] for i in range(n)])
            pg = StatelessProcessGroup.create(host=host, port=int(port), rank=0, world_size=world)
            _NCCL["comm"] = PyNcclCommunicator(pg, device=torch.cuda.current_device())
            join(ts)
        ts = on_all("qed_nccl_recv", [[json.dumps([[k, str(v.dtype)[6:], list(v.shape)] for k, v in sd.items()])]] * n)
        for v in sd.values():
            _NCCL["comm"].broadcast(v.contiguous().cuda(), src=0, stream=torch.cuda.current_stream())
        join(ts)


class VLLMWorker:
    """The one vLLM worker extension: mixed into every vLLM worker, by the in-process engine
    (LLM(worker_extension_cls="engines.VLLMWorker")) and by servers (`vllm serve ... --worker-extension-cls
    engines.VLLMWorker`, which then imports only this module and common). The trainer reaches these methods
    with llm.collective_rpc(name, args=...) or a server's POST /collective_rpc (string arguments).
    collective_rpc carries plain data, not tensors, so in-process weights travel as raw bytes; servers get
    a checkpoint folder on a shared filesystem or an NCCL broadcast. (On GPUs, vLLM's own NCCL/IPC weight
    transfer - LLM(weight_transfer_config=...) - avoids the copies.)"""

    def _qed_load(self, pairs=None, path=None):
        # vLLM's in-place reload (Worker.reload_weights) re-runs the loaders and the post-load processing,
        # so it works after kernels repacked the weights (its CPU backend empties the original linear
        # weights, and model.load_weights alone then fails)
        if pairs is not None and getattr(self.model_runner.model_config.hf_config, "tie_word_embeddings", False):
            pairs = [(n, t) for n, t in pairs if n != "lm_head.weight"]  # vLLM ties it to the embedding
        self.reload_weights(weights_iterator=iter(pairs) if pairs is not None else None, weights_path=path,
                            is_checkpoint_format=True)
        return len(pairs) if pairs is not None else -1

    def qed_load_weights(self, packed):  # [(name, dtype name, shape, bytes)]
        return self._qed_load([(n, torch.frombuffer(bytearray(b), dtype=torch.uint8).view(getattr(torch, dt))
                                .reshape(shape)) for n, dt, shape, b in packed])

    def qed_load_weights_from_path(self, path):  # a folder holding the safetensors of a checkpoint
        return self._qed_load(path=path)

    def qed_load_dir(self, path):
        return self._qed_load(path=path)

    def qed_nccl_init(self, host, port, rank_offset, world_size):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.parallel_state import get_world_group
        from vllm.distributed.utils import StatelessProcessGroup

        pg = StatelessProcessGroup.create(host=host, port=int(port), rank=get_world_group().rank + int(rank_offset),
                                          world_size=int(world_size))
        self._qed_comm = PyNcclCommunicator(pg, device=self.device)

    def qed_nccl_recv(self, meta_json):
        pairs = []  # the whole model once more on the GPU, briefly: one reload instead of one per tensor
        for name, dtype, shape in json.loads(meta_json):
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            self._qed_comm.broadcast(t, src=0, stream=torch.cuda.current_stream())
            pairs.append((name, t))
        torch.cuda.synchronize()
        return self._qed_load(pairs)


# ---------------------------------------------------------------------------------------------
# the registry and the one place flags become an engine

ENGINES = {"hf": HFEngine, "vllm": VLLMEngine, "openai": OpenAIEngine, "remote": RemoteVLLMEngine}


def kinds(trainable=False):
    """The --engine choices of a stage: every engine that generates on its own (remote needs rl.py's
    servers), or with trainable=True those that take trainer weights (rl.py). Read at parse time, so an
    engine added to ENGINES is offered by every stage without touching it."""
    if trainable:
        # a factory function (not a class) cannot be asked: offered, and it refuses a push by itself
        return [k for k, c in ENGINES.items() if not isinstance(c, type) or c.load_weights is not Engine.load_weights]
    return [k for k in ENGINES if k != "remote"]


def make_engine(kind, model, **kw):
    """An engine of ENGINES[kind] (the contract: the module docstring).
    kind "hf": model = hub id / folder / loaded model (+ tokenizer=); "vllm": hub id / folder;
    "openai": model = the server's model name (+ base_url=, api_key_env=, concurrency=, ...);
    "remote": model = the served model name (+ servers=[base URLs], weight_sync=, ...)."""
    if kind not in ENGINES:
        raise ValueError(f"unknown engine kind {kind!r}: choose {', '.join(ENGINES)}")
    if kind == "remote":
        return RemoteVLLMEngine(kw.pop("servers"), model, **kw)
    return ENGINES[kind](model, **kw)


def _flag(args, name, default=None):
    """A flag of the shared vocabulary, or `default` where a stage has no such flag."""
    value = getattr(args, name, default)
    return default if value is None else value


def from_args(args, model=None, kind=None, base_url=None, policy=False, **kw):
    """The only place flags become an engine: --engine --model --tokenizer --dtype --device --max-model-len
    --gpu-memory-utilization --base-url --api-key-env, and the engine-specific flags a stage has (hf:
    --hf-impl --cuda-graphs --max-batch-size; vllm: --tensor-parallel-size; openai: --concurrency --timeout
    --max-retries --no-template-kwargs; remote: --servers --served-model --weight-sync --sync-dir
    --nccl-master --server-gpus); a flag a stage lacks takes the engine's default.
    model / kind / base_url default to --model / --engine / --base-url (a summarizer passes its own; a
    remote engine serves --served-model, else --model). policy=True: the engine RL trains, which sleeps
    with --vllm-sleep and serves --lora-r adapters. kw override what the flags say (tokenizer and dtype
    only reach the hf and vllm engines)."""
    kind = kind or args.engine
    model = args.model if model is None else model
    own = not isinstance(model, str) or model == args.model  # --tokenizer belongs to --model (or a loaded one)
    tokenizer = kw.pop("tokenizer") if "tokenizer" in kw else (_flag(args, "tokenizer") if own else None)
    dtype = kw.pop("dtype") if "dtype" in kw else _flag(args, "dtype", "bfloat16")
    max_len = _flag(args, "max_model_len", 0)
    if kind == "hf":
        graphs = _flag(args, "cuda_graphs", "auto")
        flags = dict(tokenizer=tokenizer, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype,
                     impl=_flag(args, "hf_impl", "auto"), cuda_graphs={"auto": None, "on": True, "off": False}[graphs],
                     max_batch_size=_flag(args, "max_batch_size", 64))
        if isinstance(model, str):  # a loaded model stays where it is
            flags["device"] = common.compute_init(_flag(args, "device", "auto"))[3]
    elif kind == "vllm":
        flags = dict(tokenizer=tokenizer, dtype=dtype, max_model_len=max_len if max_len > 0 else None,
                     gpu_memory_utilization=_flag(args, "gpu_memory_utilization", 0.9),
                     seed=max(_flag(args, "seed", 0), 0))
        if _flag(args, "tensor_parallel_size", 1) != 1:
            flags["tensor_parallel_size"] = args.tensor_parallel_size
        if policy and _flag(args, "vllm_sleep", False):
            flags["enable_sleep_mode"] = True
        if policy and _flag(args, "lora_r", 0):  # the adapter-only weight sync (load_lora)
            flags.update(enable_lora=True, max_lora_rank=args.lora_r, max_loras=1)
    elif kind == "openai":
        flags = dict(base_url=base_url or args.base_url, api_key_env=_flag(args, "api_key_env", "OPENAI_API_KEY"),
                     concurrency=_flag(args, "concurrency", 32), timeout=_flag(args, "timeout", 3600.0),
                     max_retries=_flag(args, "max_retries", 6),
                     send_thinking=not _flag(args, "no_template_kwargs", False))
    elif kind == "remote":
        model = args.served_model or args.model
        flags = dict(servers=args.servers.split(","), weight_sync=args.weight_sync, nccl_master=args.nccl_master,
                     sync_dir=args.sync_dir or os.path.join(args.output_dir, "sync"), server_gpus=args.server_gpus)
    else:  # an engine added to ENGINES: the model and what it says it needs of the shared flags
        flags = {name: _flag(args, name) for name in getattr(ENGINES[kind], "flags", ())}
    return make_engine(kind, model, **{**flags, **kw})
