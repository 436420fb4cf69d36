"""Generation engines and the reasoning-cache (RC) decoder.

One proof, three turns of summarize-and-refine, the final proof printed (the recipe's defaults):
    python rc_decode.py --model lm-provers/QED-Nano --problem "Prove that ..." --show-trace
A batch that resumes where it stopped (finished traces are appended one by one):
    python rc_decode.py --model lm-provers/QED-Nano --input problems.jsonl --output traces.jsonl
Other engines and scaffolds:
    python rc_decode.py --engine vllm --model lm-provers/QED-Nano --input p.jsonl --output t.jsonl
    python rc_decode.py --engine openai --base-url http://localhost:8000/v1 --model lm-provers/QED-Nano \
        --api-key-env OPENAI_API_KEY --input p.jsonl --output t.jsonl --scaffold verify-refine
    python rc_decode.py --summarizer-model Qwen/Qwen3-4B-Instruct-2507 --problem "..."   # RL's summarizer
Offline on the tiny random model (CPU, seconds):
    python rc_decode.py --preset tiny --show-trace

Python API (rl.py and eval.py import these; see README):
    engine = make_engine("hf", "lm-provers/QED-Nano")            # or "vllm", "openai"
    traces = run_rc(problems, engine, turns=3, reason_sampling=Sampling(49152), summary_sampling=...)
"""

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import re
import time

import torch

import common

PROMPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")

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


# ---------------------------------------------------------------------------------------------
# prompts: text files under prompts/, loaded by name; placeholders are {problem}, {summary}, ...

PLACEHOLDERS = ("problem", "summary", "reasoning", "proof", "reviews")  # what prompts/*.txt may hold


def load_prompt(name):
    """The text of prompts/<name>.txt (re-read on every call, so edits apply without a restart)."""
    path = os.path.join(PROMPT_DIR, name + ".txt")
    if not os.path.exists(path):
        raise ValueError(f"prompt {name!r} not found: expected the file {path}")
    with open(path) as f:
        return f.read().strip()


def fill_prompt(name, **fields):
    """prompts/<name>.txt with each {field} replaced in one pass (text inside a field is never re-read
    as a placeholder, so LaTeX braces in a problem are safe). A template missing a field is an error."""
    return common.fill_template(load_prompt(name), fields, known=PLACEHOLDERS, what=f"prompts/{name}.txt")


def _user(text):
    return [{"role": "user", "content": text}]


def task_text(problem, task_prompt="direct_proof"):
    """The task a model is given for `problem`: prompts/<task_prompt>.txt filled with it ("direct_proof":
    the evaluation and RL proof prompt; "answerbench": reason step by step, answer in \boxed{});
    task_prompt None = the problem text itself."""
    return problem if task_prompt is None else fill_prompt(task_prompt, problem=problem)


def direct_messages(problem, task_prompt="direct_proof"):
    return _user(task_text(problem, task_prompt))


# What the RC reasoning prompt holds in its summary slot before any attempt was summarized: every turn,
# the first included, uses the same prompt (the released eval and RL code do the same).
NO_SUMMARY = "(no previous summary: this is the first attempt)"


def reasoning_messages(problem, summary=None, task_prompt="direct_proof"):
    """The reasoner's prompt for one RC turn: the task text and the previous summary (None on turn 1 and
    for RL's empty state: the same prompt with the NO_SUMMARY marker in the summary slot)."""
    return _user(fill_prompt("rc_reasoning", problem=task_text(problem, task_prompt),
                             summary=NO_SUMMARY if summary is None else summary))


def summary_messages(problem, summary, reasoning):
    """The summarizer's prompt: problem, previous summary (None on turn 1) and the turn's thinking text."""
    return _user(fill_prompt("rc_summary", problem=problem, summary=NO_SUMMARY if summary is None else summary,
                             reasoning=reasoning))


def opened_thinking(c, tokenizer=None):
    """True when completion `c` started inside a <think> block: the chat template's generation prompt
    ended with <think> (Qwen3-4B-Thinking-2507's always does, whatever enable_thinking says) or the
    text opens one itself. Read from what came back, so no flag has to say that a model thinks."""
    if c.text.lstrip().startswith("<think>"):
        return True
    if tokenizer is not None and c.prompt_token_ids:
        return tokenizer.decode(c.prompt_token_ids[-4:]).rstrip().endswith("<think>")
    return False


def summary_text(c, tokenizer=None):
    """(summary, error) from a summarizer's completion. A summarizer that thinks gives its summary as the
    text after its last </think>; one that opened <think> and never closed it gave none (an error: its
    reasoning is never kept as the summary); a non-thinking summarizer's whole text is the summary."""
    if c.error:
        return None, c.error
    if "</think>" in c.text:
        text = common.split_thinking(c.text)[1]
    elif opened_thinking(c, tokenizer):
        return None, (f"the summarizer thought for {num_generated(c)} tokens and never closed </think> "
                      f"({c.finish_reason}); no summary")
    else:
        text = c.text.strip()
    return (text, None) if text else (None, "the summarizer returned an empty summary")


def verify_messages(problem, proof):
    return _user(fill_prompt("verify_proof", problem=problem, proof=proof))


def refine_messages(problem, proof, reviews):
    text = "\n\n".join(f"<review {i + 1}>\n{r}\n</review {i + 1}>" for i, r in enumerate(reviews))
    return _user(fill_prompt("refine_proof", problem=problem, proof=proof, reviews=text))


_SOLUTION_HEAD = re.compile(r"^[ \t]*#+[ \t]*\**[ \t]*solution\b.*$", re.IGNORECASE | re.MULTILINE)
_SELF_EVAL_HEAD = re.compile(r"^[ \t]*#+[ \t]*\**[ \t]*self[ \t-]*evaluation\b", re.IGNORECASE | re.MULTILINE)
_SELF_EVAL_ANY = re.compile(r"self[ \t-]*evaluation", re.IGNORECASE)


def extract_proof(answer):
    """The proof of a proof-then-self-evaluation answer (prompts/proof_self_eval.txt): the text after a
    "## Solution" heading and before the "## Self Evaluation" heading (or, without that heading, before
    the first mention of a self evaluation); the whole answer when neither marker is there."""
    start = _SOLUTION_HEAD.search(answer)
    body = answer[start.end():] if start else answer
    end = _SELF_EVAL_HEAD.search(body) or _SELF_EVAL_ANY.search(body)
    return (body[:end.start()] if end else body).strip()


_VERDICT = re.compile(r"\\boxed\{\s*(0|0\.5|1)\s*\}")


def parse_verdict(text):
    """A verification's score: the FIRST \\boxed{0}, \\boxed{0.5} or \\boxed{1} in the text after
    </think> (boxes holding anything else are skipped); None when the verification was cut before
    </think> or holds no such box (both count 0)."""
    _, answer, truncated = common.split_thinking(text)
    if truncated:
        return None
    m = _VERDICT.search(answer)
    return float(m.group(1)) if m else None


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
    probs = torch.softmax(kept, -1)
    # exponential race: argmax(p / E), E ~ Exp(1), is one draw from p (and needs no host sync)
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_(min=1e-30)
    tok = (probs / race).argmax(-1)
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


class HFEngine:
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
        if stop:
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
            if tok is None:
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
        raise ValueError(f"sampling must be a rc_decode.Sampling, got {type(s).__name__}")
    if s.max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {s.max_tokens}")
    if s.temperature < 0 or not 0 < s.top_p <= 1 or s.top_k < 0:
        raise ValueError(f"bad sampling settings {s}: need temperature >= 0, 0 < top_p <= 1, top_k >= 0")


# ---------------------------------------------------------------------------------------------
# vLLM engine (in-process vllm.LLM)


class VLLMWeightSync:
    """Mixed into every vLLM worker (LLM(worker_extension_cls="rc_decode.VLLMWeightSync")); the trainer
    reaches these methods with llm.collective_rpc(name, args=...). collective_rpc carries plain data,
    not tensors, so weights travel as raw bytes, or as a checkpoint folder on a shared filesystem.
    (On GPUs, vLLM's own NCCL/IPC weight transfer - LLM(weight_transfer_config=...) - avoids the copies.)"""

    def _qed_load(self, pairs=None, path=None):
        # vLLM's in-place reload (Worker.reload_weights) re-runs the loaders and the post-load processing,
        # so it works after kernels repacked the weights (model.load_weights alone does not)
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


class VLLMEngine:
    """vllm.LLM in this process, fed token prompts (our chat template, so enable_thinking is ours).

    Per request seed = sampling.seed + index (one seed for a whole group would give identical samples).
    logprobs: vLLM's "processed_logprobs" mode, the log-prob of the sampled token under the
    temperature-scaled distribution AFTER top-k/top-p filtering and renormalization. With top_p=1 and
    top_k=0 this equals the HF engine's definition; with a nucleus it is higher by -log(kept mass).
    """

    def __init__(self, model, tokenizer=None, *, dtype="bfloat16", max_model_len=None,
                 gpu_memory_utilization=0.9, seed=0, logprobs_mode="processed_logprobs", **llm_kwargs):
        from vllm import LLM
        self.tokenizer = common.load_tokenizer(tokenizer or model)
        self.llm = LLM(model=model, tokenizer=tokenizer or model, dtype=dtype, max_model_len=max_model_len,
                       gpu_memory_utilization=gpu_memory_utilization, seed=seed, logprobs_mode=logprobs_mode,
                       worker_extension_cls="rc_decode.VLLMWeightSync", **llm_kwargs)
        self.context_length = self.llm.llm_engine.model_config.max_model_len
        self._dtype = self.llm.llm_engine.model_config.dtype
        self.lora_request = None  # set by load_lora: every request then runs through that adapter

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

    def load_weights(self, named_tensors, chunk_bytes=1 << 29):
        """Push trainer weights ((HF name, tensor) pairs, e.g. model.state_dict().items()) into the running
        engine, ~chunk_bytes per RPC, cast to the engine's dtype; returns the number of tensors loaded.
        For a trainer in another process or node, save_pretrained to a shared folder and call
        load_weights_from_path(folder) instead."""
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

    def load_lora(self, path, version):
        """Generate through the LoRA adapter in folder `path` (PEFT's save_pretrained) from now on: the
        adapter-only weight sync. Needs LLM(enable_lora=True, max_lora_rank >= r). A new id per version
        makes vLLM read the new adapter instead of reusing the one it cached."""
        from vllm.lora.request import LoRARequest
        if not os.path.exists(os.path.join(path, "adapter_config.json")):
            raise ValueError(f"load_lora: {path!r} holds no adapter_config.json (save a PEFT adapter there)")
        self.lora_request = LoRARequest(f"policy-v{version}", version + 1, os.path.abspath(path))

    def load_weights_from_path(self, path):
        """Load a checkpoint folder (save_pretrained's safetensors, HF names) into the running engine."""
        if not os.path.isdir(path):
            raise ValueError(f"load_weights_from_path: {path!r} is not a checkpoint folder")
        self.llm.collective_rpc("qed_load_weights_from_path", args=(os.path.abspath(path),))
        self.llm.reset_prefix_cache()


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible engine (vllm serve, SGLang, hosted APIs)


class OpenAIEngine:
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


def make_engine(kind, model, **kw):
    """An engine with generate(prompts, sampling, thinking=True) -> list[Completion].
    kind "hf": model = hub id / folder / loaded model (+ tokenizer=); "vllm": hub id / folder;
    "openai": model = the server's model name (+ base_url=, api_key_env=, concurrency=, ...)."""
    if kind == "hf":
        return HFEngine(model, **kw)
    if kind == "vllm":
        return VLLMEngine(model, **kw)
    if kind == "openai":
        return OpenAIEngine(model, **kw)
    raise ValueError(f"unknown engine kind {kind!r}: choose hf, vllm or openai")


# ---------------------------------------------------------------------------------------------
# scaffolds: reasoning cache, direct, verify-and-refine. All batched across problems x samples.


def _items(problems, samples):
    if isinstance(problems, str):
        raise ValueError("problems must be a list of strings, not one string")
    for i, p in enumerate(problems):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"problem {i} is empty or not text ({str(p)[:80]!r})")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    return [(pi, si) for pi in range(len(problems)) for si in range(samples)]


def _turn(messages, c, thinking=True, keep_tokens=False):
    reasoning, answer, truncated = common.split_thinking(c.text) if thinking else ("", c.text.strip(), False)
    t = {"prompt": messages, "reasoning": reasoning, "answer": answer, "completion": c.text,
         "tokens": num_generated(c), "budget": c.max_tokens, "finish_reason": c.finish_reason,
         "truncated": truncated or bool(c.error)}
    if c.error:
        t["error"] = c.error
    if keep_tokens:
        t.update(token_ids=c.token_ids, logprobs=c.logprobs, prompt_token_ids=c.prompt_token_ids)
    return t


def _bar(progress, total, desc):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="seq", disable=not progress, dynamic_ncols=True)


def _finish(trace, turn):
    trace.update(final_answer=turn["answer"], final_completion=turn["completion"], truncated=turn["truncated"])
    trace["total_tokens"] = sum(t["tokens"] + (t.get("summary_tokens") or 0) for t in trace["turns"])
    return trace


def run_rc(problems, reasoner, *, summarizer=None, turns=3, reason_sampling=None, summary_sampling=None,
           samples=1, progress=True, summary_thinking=True, final_summary=False, keep_tokens=False,
           task_prompt="direct_proof"):
    """Reasoning cache: per turn, reason from (task, summary), then summarize that turn's thinking
    together with the old summary into a new summary that REPLACES it. Only the summary crosses turns;
    the answer is the last turn's text after </think>.

    Every turn uses the same prompt (rc_reasoning: turn 1 holds the NO_SUMMARY marker). The summary is
    read from what came back (summary_text): after the last </think> when the summarizer thought; a
    summarizer that opened <think> and never closed it fails that summary (turn["summary_error"], counted
    in trace["summary_failures"]) and the next turn starts from the last good summary. summary_thinking
    is only the enable_thinking the summarizer's chat template is asked for (a Thinking-2507 template
    thinks regardless). Each turn is one reasoner call and one summarizer call over every (problem,
    sample) still running; an engine error stops only its own trace. No summary follows the last turn
    unless final_summary=True (rl.py's states need it: None, S1, ..., S_turns).
    Returns one trace per (problem, sample), problem-major: dict(problem, problem_index, sample_index,
    scaffold, turns=[{prompt, summary_in, reasoning, answer, completion, summary_out, summary_error,
    tokens, budget, summary_tokens, finish_reason, summary_finish_reason, truncated}], states,
    summary_failures, final_answer, final_completion, truncated, total_tokens[, error]).
    """
    reason_sampling = reason_sampling or Sampling(49152)
    summary_sampling = summary_sampling or reason_sampling
    summarizer = summarizer or reasoner
    items = _items(problems, samples)
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    traces = [{"problem": problems[pi], "problem_index": pi, "sample_index": si, "scaffold": "rc",
               "turns": [], "states": [None], "summary_failures": 0} for pi, si in items]
    summary = [None] * len(items)  # the summary each (problem, sample) carries into its next turn
    active = list(range(len(items)))
    bar = _bar(progress, len(items) * (2 * turns - (0 if final_summary else 1)), "rc")
    for t in range(turns):
        msgs = [reasoning_messages(problems[items[k][0]], summary[k], task_prompt) for k in active]
        comps = reasoner.generate(msgs, _reseed(reason_sampling, 2 * t * 100_003), thinking=True,
                                  progress=bar.update)
        for k, m, c in zip(active, msgs, comps):
            turn = _turn(m, c, True, keep_tokens)
            turn.update(turn=t, summary_in=summary[k], summary_out=None, summary_error=None, summary_tokens=0,
                        summary_finish_reason=None)
            traces[k]["turns"].append(turn)
            if c.error:
                traces[k]["error"] = f"turn {t + 1} reasoning: {c.error}"
        active = [k for k in active if "error" not in traces[k]]
        if t == turns - 1 and not final_summary:
            break
        msgs = [summary_messages(problems[items[k][0]], summary[k], traces[k]["turns"][-1]["reasoning"])
                for k in active]
        comps = summarizer.generate(msgs, _reseed(summary_sampling, (2 * t + 1) * 100_003),
                                    thinking=summary_thinking, progress=bar.update)
        for k, c in zip(active, comps):
            turn = traces[k]["turns"][-1]
            text, err = summary_text(c, getattr(summarizer, "tokenizer", None))
            turn.update(summary_out=text, summary_error=err, summary_tokens=num_generated(c),
                        summary_finish_reason=c.finish_reason)
            if c.error:  # the engine failed (a server error after retries): the trace stops, a rerun redoes it
                traces[k]["error"] = f"turn {t + 1} summary: {c.error}"
            elif err:  # no usable summary: counted; the next turn keeps the last good one
                traces[k]["summary_failures"] += 1
            else:
                summary[k] = text  # replaces the old summary
                traces[k]["states"].append(text)
        active = [k for k in active if "error" not in traces[k]]
    bar.close()
    return [_finish(tr, tr["turns"][-1]) for tr in traces]


def run_direct(problems, engine, sampling=None, samples=1, progress=True, keep_tokens=False,
               task_prompt="direct_proof"):
    """One answer per (problem, sample) from prompts/<task_prompt>.txt; same trace shape as run_rc (one turn)."""
    sampling = sampling or Sampling(49152)
    items = _items(problems, samples)
    msgs = [direct_messages(problems[pi], task_prompt) for pi, _ in items]
    bar = _bar(progress, len(items), "direct")
    comps = engine.generate(msgs, sampling, thinking=True, progress=bar.update)
    bar.close()
    traces = []
    for (pi, si), m, c in zip(items, msgs, comps):
        tr = {"problem": problems[pi], "problem_index": pi, "sample_index": si, "scaffold": "direct",
              "turns": [dict(_turn(m, c, True, keep_tokens), turn=0, summary_in=None, summary_out=None)]}
        if c.error:
            tr["error"] = c.error
        traces.append(_finish(tr, tr["turns"][0]))
    return traces


def proof_messages(problem):
    """The verify-and-refine agent's first proofs: the proof, then a self-evaluation section (cut off
    by extract_proof before anything sees the proof)."""
    return _user(fill_prompt("proof_self_eval", problem=problem))


def run_verify_refine(problems, engine, *, proof_sampling=None, verify_sampling=None, refine_sampling=None,
                      n_proofs=4, n_verify=4, rounds=2, n_critiques=2, samples=1, verifier=None, progress=True):
    """Verify-and-refine in the style of DeepSeek-Math-V2, as the released agent runs it.

    Per (problem, sample): a pool of n_proofs proofs written with the proof-then-self-evaluation prompt
    (the proof is cut before its self-evaluation); each proof verified n_verify times, a verification
    scored by its FIRST \\boxed{0|0.5|1} after </think> (none: 0), a proof scored by the mean. Then up
    to `rounds` iterations: stop when some proof's mean reached 1; else refine each of the n_proofs best
    proofs by mean once, giving it its n_critiques lowest-scored verifications; the new proofs are
    verified the same way and join the pool. The answer is the best mean over the whole pool, the
    first on ties. A proof cut at its budget (no </think>) scores 0 without verification.
    turns = every candidate in pool order (round, parent, proof, verifications, score);
    final_answer/final_completion = the best candidate's proof and raw completion."""
    proof_sampling = proof_sampling or Sampling(49152)
    verify_sampling = verify_sampling or proof_sampling
    refine_sampling = refine_sampling or proof_sampling
    verifier = verifier or engine
    items = _items(problems, samples)
    traces = [{"problem": problems[pi], "problem_index": pi, "sample_index": si, "scaffold": "verify-refine",
               "turns": []} for pi, si in items]
    bar = _bar(progress, len(items) * n_proofs * (1 + n_verify) * (1 + rounds), "verify-refine")
    calls = [0]

    def add(jobs, rnd, sampling):  # jobs: [(trace k, messages, parent index)] -> new candidates, verified
        comps = engine.generate([m for _, m, _ in jobs], _reseed(sampling, calls[0] * 100_003),
                                thinking=True, progress=bar.update)
        calls[0] += 1
        new = []
        for (k, m, parent), c in zip(jobs, comps):
            cand = dict(_turn(m, c, True), turn=len(traces[k]["turns"]), round=rnd, parent=parent,
                        verifications=[], score=0.0)
            cand["proof"] = extract_proof(cand["answer"])
            traces[k]["turns"].append(cand)
            new.append((k, cand))
        vjobs = [(cand, verify_messages(problems[items[k][0]], cand["proof"])) for k, cand in new
                 if not cand["truncated"]] * n_verify
        bar.update(len(new) * n_verify - len(vjobs))
        comps = verifier.generate([m for _, m in vjobs], _reseed(verify_sampling, calls[0] * 100_003),
                                  thinking=True, progress=bar.update)
        calls[0] += 1
        for (cand, _), c in zip(vjobs, comps):
            cand["verifications"].append({"verdict": parse_verdict(c.text), "analysis": common.split_thinking(c.text)[1],
                                          "completion": c.text, "tokens": num_generated(c),
                                          "finish_reason": c.finish_reason, "error": c.error})
        for _, cand in new:
            vs = [v["verdict"] or 0.0 for v in cand["verifications"]]
            cand["score"] = sum(vs) / len(vs) if vs else 0.0

    def ranked(k):  # pool indices by mean score, best first; ties: the earlier candidate first
        cands = traces[k]["turns"]
        return sorted(range(len(cands)), key=lambda j: (-cands[j]["score"], j))

    add([(k, proof_messages(problems[pi]), None) for k, (pi, _) in enumerate(items) for _ in range(n_proofs)], 0,
        proof_sampling)
    for rnd in range(1, rounds + 1):
        jobs = []
        for k, (pi, _) in enumerate(items):
            cands = traces[k]["turns"]
            if cands[ranked(k)[0]]["score"] >= 1.0:
                continue  # a proof every verification accepted: done
            for j in ranked(k)[:n_proofs]:
                crit = sorted(cands[j]["verifications"], key=lambda v: v["verdict"] or 0.0)[:n_critiques]
                reviews = [v["analysis"] or v["completion"] for v in crit]
                jobs.append((k, refine_messages(problems[pi], cands[j]["proof"], reviews), j))
        if not jobs:
            break
        add(jobs, rnd, refine_sampling)
    bar.close()
    for k, tr in enumerate(traces):
        b = ranked(k)[0]
        tr["best_turn"], tr["best_score"] = b, tr["turns"][b]["score"]
        if all(c.get("error") for c in tr["turns"]):
            tr["error"] = tr["turns"][0]["error"]
        _finish(tr, tr["turns"][b])
        # graders read the text after </think>: the best proof alone, its self-evaluation cut (as released)
        c = tr["final_completion"]
        if not tr["truncated"]:
            tr["final_completion"] = c[:c.rfind(common.THINK_END) + len(common.THINK_END)] + "\n\n" + tr["turns"][b]["proof"]
        tr["final_answer"] = tr["turns"][b]["proof"]
    return traces


# ---------------------------------------------------------------------------------------------
# CLI

TINY_PRESET = dict(engine="hf", device="cpu", dtype="float32", turns=2, reason_budget=48, summary_budget=24,
                   verify_budget=24, n_proofs=2, n_verify=2, refine_rounds=1, n_critiques=1, max_batch_size=16)
TINY_PROBLEM = "Compute 2 + 3. Put the final answer in \\boxed{}."


def build_parser():
    p = argparse.ArgumentParser(description="Reasoning-cache / direct / verify-refine decoding with hf, vllm or "
                                            "an OpenAI-compatible server.")
    p.add_argument("--preset", choices=["tiny"], default=None,
                   help="tiny: the offline random tiny Qwen3 on CPU with small budgets (explicit flags still win)")
    # ---- model and engine
    p.add_argument("--model", default="lm-provers/QED-Nano",
                   help="hub id or local folder (hf, vllm); the served model name (openai)")
    p.add_argument("--tokenizer", default=None, help="tokenizer hub id/folder (default: --model)")
    p.add_argument("--engine", default="auto", choices=["auto", "hf", "vllm", "openai"],
                   help="auto = vllm when it is installed and a GPU is present, else hf")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="hf engine device")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="weights dtype (hf, vllm)")
    p.add_argument("--hf-impl", default="auto", choices=["auto", "static", "dynamic"],
                   help="hf decode loop: static KV cache (+CUDA graphs on GPU) or HF's DynamicCache")
    p.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"],
                   help="hf static loop: capture decode steps as CUDA graphs (auto = on when on a GPU)")
    p.add_argument("--max-batch-size", type=int, default=64, help="hf: rows per micro-batch")
    p.add_argument("--max-model-len", type=int, default=None, help="vllm: context length in tokens (default: model's)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm: fraction of GPU memory to use")
    p.add_argument("--base-url", default="http://localhost:8000/v1", help="openai: server URL up to /v1")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="openai: NAME of the env variable holding the key")
    p.add_argument("--concurrency", type=int, default=32, help="openai: requests in flight")
    p.add_argument("--timeout", type=float, default=3600.0, help="openai: seconds per request")
    p.add_argument("--max-retries", type=int, default=6, help="openai: retries per request (429/5xx/timeouts)")
    p.add_argument("--no-template-kwargs", action="store_true",
                   help="openai: do not send chat_template_kwargs.enable_thinking (for hosted APIs that reject it)")
    # ---- summarizer (rc)
    p.add_argument("--summarizer-model", default=None,
                   help="default: the reasoner summarizes itself (test time); RL used Qwen/Qwen3-4B-Instruct-2507")
    p.add_argument("--summarizer-engine", default=None, choices=["hf", "vllm", "openai"], help="default: --engine")
    p.add_argument("--summarizer-base-url", default=None, help="openai summarizer URL (default: --base-url)")
    p.add_argument("--summary-thinking", action=argparse.BooleanOptionalAction, default=True,
                   help="ask the summarizer's chat template for thinking (enable_thinking); the summary is read "
                        "from what comes back either way (the text after </think> when it thought)")
    # ---- scaffold and budgets (tokens)
    p.add_argument("--scaffold", default="rc", choices=["rc", "direct", "verify-refine"], help="decoding scaffold")
    p.add_argument("--task-prompt", default="direct_proof",
                   help="prompts/<name>.txt that turns a problem into the task (direct_proof; answerbench)")
    p.add_argument("--turns", type=int, default=3, help="rc: reasoning turns")
    p.add_argument("--reason-budget", type=int, default=229376,
                   help="max new tokens per reasoning turn / proof (rc, direct, verify-refine); the released "
                        "eval's 229,376; clamped per request to what the model's context leaves")
    p.add_argument("--summary-budget", type=int, default=-1,
                   help="rc: max new tokens per summary (-1 = --reason-budget, the released eval; RL's "
                        "instruct summarizer used 2048)")
    p.add_argument("--final-summary", action="store_true",
                   help="rc: also summarize the last turn (only RL's states need it; off in the released eval)")
    p.add_argument("--n-proofs", type=int, default=4, help="verify-refine: proofs per round")
    p.add_argument("--n-verify", type=int, default=4, help="verify-refine: verifications per proof")
    p.add_argument("--refine-rounds", type=int, default=2, help="verify-refine: refinement rounds (0 = none)")
    p.add_argument("--n-critiques", type=int, default=2, help="verify-refine: lowest-scored reviews used to refine")
    p.add_argument("--verify-budget", type=int, default=-1,
                   help="verify-refine: max new tokens per verification (-1 = --reason-budget)")
    p.add_argument("--samples", type=int, default=1, help="independent traces per problem")
    # ---- sampling
    p.add_argument("--temperature", type=float, default=0.8,
                   help="reasoner temperature (0 = greedy; the released eval's 0.8; the model card's 0.6)")
    p.add_argument("--top-p", type=float, default=1.0, help="reasoner nucleus (1 = off; the model card's 0.95)")
    p.add_argument("--top-k", type=int, default=0, help="reasoner top-k (0 = off)")
    p.add_argument("--summary-temperature", type=float, default=-1,
                   help="summarizer temperature (-1 = --temperature: the model summarizes itself, as at eval; "
                        "RL's instruct summarizer used 0.7)")
    p.add_argument("--summary-top-p", type=float, default=-1, help="summarizer nucleus (-1 = --top-p; RL: 0.8)")
    p.add_argument("--summary-top-k", type=int, default=-1, help="summarizer top-k (-1 = --top-k; RL: 20)")
    p.add_argument("--seed", type=int, default=0, help="base seed (-1 = nondeterministic)")
    # ---- input / output
    p.add_argument("--problem", default=None, help="one problem's text (prints the final proof)")
    p.add_argument("--input", default=None, help="JSONL of problems (one object per line)")
    p.add_argument("--problem-key", default=None, help="problem column (default: problem, Problem or question)")
    p.add_argument("--id-key", default=None, help="id column (default: id, Problem ID or problem_id; else line number)")
    p.add_argument("--output", default=None, help="JSONL of traces, appended as they finish; rerun to resume")
    p.add_argument("--batch-size", type=int, default=1024,
                   help="sequences (problems x samples) sent to the engine at once; traces are written after each")
    p.add_argument("--show-trace", action="store_true", help="print every turn, summary and verification")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset == "tiny":
        parser.set_defaults(model=common.make_tiny_model(), **TINY_PRESET)
        args = parser.parse_args(argv)
        if args.problem is None and args.input is None:
            args.problem = TINY_PROBLEM
    if (args.problem is None) == (args.input is None):
        parser.error("give exactly one of --problem TEXT or --input problems.jsonl")
    if args.problem is not None and not args.problem.strip():
        parser.error("--problem is empty")
    for flag, same in (("summary_budget", "reason_budget"), ("verify_budget", "reason_budget"),
                       ("summary_temperature", "temperature"), ("summary_top_p", "top_p"), ("summary_top_k", "top_k")):
        if getattr(args, flag) < 0:  # -1: the same as the reasoning turns
            setattr(args, flag, getattr(args, same))
    for flag in ("turns", "reason_budget", "summary_budget", "samples", "batch_size", "n_proofs", "n_verify",
                 "verify_budget", "max_batch_size", "concurrency"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.engine == "auto":
        import importlib.util
        args.engine = "vllm" if importlib.util.find_spec("vllm") and torch.cuda.is_available() else "hf"
    return args


def read_problems(path, problem_key=None, id_key=None):
    """[(id, problem text)] from a JSONL file; a bad line is an error naming the line and the fix."""
    if not os.path.exists(path):
        raise ValueError(f"--input {path!r} does not exist")
    out, seen = [], set()
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n} is not valid JSON ({e}); fix or delete that line") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {n} is not a JSON object")
            pk = problem_key or next((k for k in ("problem", "Problem", "question") if k in row), None)
            if pk not in row:
                raise ValueError(f"{path}: line {n} has no problem column (keys: {sorted(row)}); pass --problem-key")
            if not isinstance(row[pk], str) or not row[pk].strip():
                raise ValueError(f"{path}: line {n}: empty problem text in column {pk!r}")
            ik = id_key or next((k for k in ("id", "Problem ID", "problem_id") if k in row), None)
            if id_key and id_key not in row:
                raise ValueError(f"{path}: line {n} has no id column {id_key!r}")
            pid = str(row[ik]) if ik else f"line-{n}"
            if pid in seen:
                raise ValueError(f"{path}: line {n}: duplicate id {pid!r}; ids must be unique for resume")
            seen.add(pid)
            out.append((pid, row[pk]))
    if not out:
        raise ValueError(f"{path} holds no problems")
    return out


def engine_from_args(args, kind, model, base_url=None):
    if kind == "hf":
        return make_engine("hf", model, tokenizer=args.tokenizer if model == args.model else None,
                           device=None if args.device == "auto" else args.device, dtype=getattr(torch, args.dtype),
                           impl=args.hf_impl, cuda_graphs={"auto": None, "on": True, "off": False}[args.cuda_graphs],
                           max_batch_size=args.max_batch_size)
    if kind == "vllm":
        return make_engine("vllm", model, tokenizer=args.tokenizer if model == args.model else None,
                           dtype=args.dtype, max_model_len=args.max_model_len,
                           gpu_memory_utilization=args.gpu_memory_utilization, seed=max(args.seed, 0))
    return make_engine("openai", model, base_url=base_url or args.base_url, api_key_env=args.api_key_env,
                       concurrency=args.concurrency, timeout=args.timeout, max_retries=args.max_retries,
                       send_thinking=not args.no_template_kwargs)


def run_scaffold(args, problems, reasoner, summarizer):
    seed = None if args.seed < 0 else args.seed
    reason = Sampling(args.reason_budget, args.temperature, args.top_p, args.top_k, seed)
    progress = not args.no_progress
    if args.scaffold == "rc":
        summ = Sampling(args.summary_budget, args.summary_temperature, args.summary_top_p, args.summary_top_k,
                        None if seed is None else seed + 1)
        return run_rc(problems, reasoner, summarizer=summarizer, turns=args.turns, reason_sampling=reason,
                      summary_sampling=summ, progress=progress, summary_thinking=args.summary_thinking,
                      final_summary=args.final_summary, task_prompt=args.task_prompt)
    if args.scaffold == "direct":
        return run_direct(problems, reasoner, reason, progress=progress, task_prompt=args.task_prompt)
    verify = dataclasses.replace(reason, max_tokens=args.verify_budget)
    return run_verify_refine(problems, reasoner, proof_sampling=reason, verify_sampling=verify,
                             n_proofs=args.n_proofs, n_verify=args.n_verify, rounds=args.refine_rounds,
                             n_critiques=args.n_critiques, progress=progress)


def print_trace(tr):
    print(f"\n######## {tr.get('id', '')} sample {tr['sample_index']} ({tr['scaffold']}, "
          f"{tr['total_tokens']} tokens)")
    for t in tr["turns"]:
        head = f"==== turn {t['turn'] + 1}" + (f" (round {t['round']}, score {t['score']:.2f})" if "round" in t else "")
        print(f"{head}: {t['tokens']} tokens, {t['finish_reason']}")
        if t.get("summary_in"):
            print(f"---- summary in:\n{t['summary_in']}")
        print(f"---- reasoning:\n{t['reasoning']}\n---- answer:\n{t['answer'] or '(none: cut at the budget)'}")
        for j, v in enumerate(t.get("verifications", [])):
            print(f"---- verification {j + 1}: verdict {v['verdict']}\n{v['analysis']}")
        if t.get("summary_out") is not None:
            print(f"---- summary out ({t['summary_tokens']} tokens, {t['summary_finish_reason']}):\n{t['summary_out']}")
        elif t.get("summary_error"):
            print(f"---- summary failed ({t['summary_tokens']} tokens): {t['summary_error']}")


def _drop_torn_tail(path):
    """Cut a last line left half-written by a kill, so that new records start on a line of their own."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            common.print0(f"{path}: dropped a torn last line (an interrupted write); it will be redone")


# Flags that do not change what a trace holds: a rerun into the same --output may change them freely.
RESUME_FREE = {"input", "output", "problem", "show_trace", "no_progress", "batch_size", "max_batch_size",
               "concurrency", "timeout", "max_retries", "preset", "device", "cuda_graphs", "hf_impl"}


def check_same_run(path, args):
    """Refuse to append to `path` traces made with other settings (model, sampling, scaffold, budgets, ...):
    the first trace in it records the arguments that made it. Raises InputError naming each differing flag."""
    for r in common.read_jsonl(path):
        old = r.get("args") or {}
        new = vars(args)
        diff = [f"--{k.replace('_', '-')} {old[k]!r} -> {new.get(k)!r}" for k in sorted(old)
                if k not in RESUME_FREE and old[k] != new.get(k)]
        if diff:
            raise common.InputError(f"--output {path} holds traces made with other settings ({'; '.join(diff)}); "
                                    "rerun with those flags to continue it, or write to another --output")
        return


def main(argv=None):
    args = parse_args(argv)
    if args.problem is not None:
        problems = [("problem", args.problem)]
    else:
        problems = read_problems(args.input, args.problem_key, args.id_key)
    order = {pid: n for n, (pid, _) in enumerate(problems)}
    done = set()
    err_path = None
    if args.output:
        err_path = os.path.splitext(args.output)[0] + ".errors.jsonl"
        common.writable_path(args.output, "--output")  # before any model loads or generates
        _drop_torn_tail(args.output)
        check_same_run(args.output, args)
        done = {(r["id"], r["sample_index"]) for r in common.read_jsonl(args.output) if "id" in r}
    todo = [(pid, text, s) for pid, text in problems for s in range(args.samples) if (pid, s) not in done]
    common.print0(f"{len(problems)} problems x {args.samples} samples: {len(done)} done, {len(todo)} to run "
                  f"| scaffold {args.scaffold} | engine {args.engine} | model {args.model}")
    if not todo:
        return []
    reasoner = engine_from_args(args, args.engine, args.model)
    summarizer = reasoner
    s_kind = args.summarizer_engine or args.engine
    if args.scaffold == "rc" and (args.summarizer_model not in (None, args.model) or s_kind != args.engine):
        summarizer = engine_from_args(args, s_kind, args.summarizer_model or args.model, args.summarizer_base_url)
    results, n_err = [], 0
    for b in range(0, len(todo), args.batch_size):
        chunk = todo[b:b + args.batch_size]
        traces = run_scaffold(args, [text for _, text, _ in chunk], reasoner, summarizer)
        for (pid, _, s), tr in zip(chunk, traces):
            tr.update(id=pid, sample_index=s, problem_index=order[pid])
            if args.output:
                tr["args"] = vars(args)
                common.append_jsonl(err_path if "error" in tr else args.output, tr)
            n_err += "error" in tr
            results.append(tr)
    for tr in results:
        if args.show_trace:
            print_trace(tr)
        if args.problem is not None:
            print(f"\n==== final proof (sample {tr['sample_index']}):\n"
                  + (tr["final_answer"] or "(no final answer: the last turn was cut at the token budget)"))
    if n_err:
        common.print0(f"{n_err} traces failed (see {err_path or 'the error fields'}); rerun the same command to retry")
    if args.output:
        common.print0(f"wrote {len(results) - n_err} traces to {args.output}")
    return results


if __name__ == "__main__":
    common.exit_on_signals()  # finished traces are already on disk (fsync'd per batch)
    common.cli(main)
