"""The offline harness itself: the real tokenizer's chat template and the tiny model's code path."""

import pytest
import torch

import common


def test_tokenizer_chat_template_and_think_tokens(tokenizer):
    assert len(tokenizer) == 151669
    think, end_think = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    assert (think, end_think) == (151667, 151668)
    msgs = [{"role": "user", "content": "Prove 1+1=2."},
            {"role": "assistant", "content": "<think>\nadd\n</think>\n\nBy definition."}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert text.startswith("<|im_start|>user\nProve 1+1=2.<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert think in ids and end_think in ids  # <think> tags are single special tokens
    no_think = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_tiny_model_roundtrip(tiny_model_dir, tiny_model, tokenizer):
    assert tiny_model.config.model_type == "qwen3" and tiny_model.config.num_hidden_layers == 2
    ids = torch.tensor([tokenizer("hello world")["input_ids"]])
    with torch.no_grad():
        a = tiny_model(ids).logits
        b = common.load_model(tiny_model_dir, dtype=torch.float32).eval()(ids).logits
    assert a.shape == (1, ids.shape[1], 151936)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # same seed, same weights: the tiny model is reproducible across machines and sessions
    c = common.tiny_qwen3_config()
    assert c.head_dim == 64 and c.tie_word_embeddings


def test_split_thinking():
    assert common.split_thinking("<think>\nabc\n</think>\n\nproof") == ("abc", "proof", False)
    assert common.split_thinking("abc</think>x</think> final") == ("abc</think>x", "final", False)
    assert common.split_thinking("still thinking ...") == ("still thinking ...", "", True)


def test_read_jsonl_skips_torn_tail(tmp_path):
    p = tmp_path / "x.jsonl"
    common.append_jsonl(p, {"a": 1})
    with open(p, "a") as f:
        f.write('{"a": 2')  # a kill mid-write
    assert common.read_jsonl(p) == [{"a": 1}]


def test_templates_behave_like_the_2507_models(thinking_tokenizer, instruct_tokenizer, tiny_model_dir):
    """Thinking-2507: the generation prompt always opens <think>, enable_thinking or not; the last assistant
    turn renders its reasoning, earlier ones only their answer. Instruct-2507: never a <think>."""
    msgs = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>\nr1\n</think>\n\nA1"},
            {"role": "user", "content": "Q2"}]
    for flag in (True, False):
        text = thinking_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                                      enable_thinking=flag)
        assert text.endswith("<|im_start|>assistant\n<think>\n") and "r1" not in text and "A1" in text
        text = instruct_tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True,
                                                      enable_thinking=flag)
        assert text.endswith("<|im_start|>assistant\n") and "<think>" not in text
    full = thinking_tokenizer.apply_chat_template(msgs[:2], tokenize=False)
    assert full.endswith("<|im_start|>assistant\n<think>\nr1\n</think>\n\nA1<|im_end|>\n")
    split = thinking_tokenizer.apply_chat_template([msgs[0], {"role": "assistant", "content": "A1",
                                                              "reasoning_content": "r1"}], tokenize=False)
    assert split == full
    # the tiny model is made with the thinking one (its tokenizer is what every stage loads)
    assert common.load_tokenizer(tiny_model_dir).chat_template == common.chat_template("thinking")


def test_bad_data_files_are_named(tmp_path):
    cases = {"empty.jsonl": (b"", "holds no rows"),
             "torn.jsonl": (b'{"problem": "a"}\n{"problem": \n', "line 2 is not valid JSON"),
             "latin1.jsonl": ('{"problem": "caf\u00e9"}\n'.encode("latin-1"), "not UTF-8"),
             "list.jsonl": (b'{"problem": "a"}\n[1, 2]\n', "line 2 is a JSON list")}
    for name, (data, msg) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(common.InputError, match=msg) as e:
            common.load_rows(str(path))
        assert str(path) in str(e.value)
    with pytest.raises(common.InputError, match="does not exist"):
        common.load_rows(str(tmp_path / "missing.jsonl"))
    good = tmp_path / "good.jsonl"
    good.write_text('{"problem": "a", "answer": "1"}\n\n{"problem": "b", "answer": "2"}\n')
    assert common.load_rows(str(good))["problem"] == ["a", "b"]
    mixed = tmp_path / "mixed.jsonl"  # types Arrow cannot unify: read anyway (the stage then names the row)
    mixed.write_text('{"a": 1}\n{"a": [1, 2]}\n')
    assert len(common.load_rows(str(mixed))) == 2


def test_model_path_typos_are_named(tmp_path):
    (tmp_path / "runs").mkdir()
    for name in (str(tmp_path / "runs" / "fnal"), "./nope", "runs/sft/fnal"):
        with pytest.raises(common.InputError, match="does not exist"):
            common.load_model(name)
        with pytest.raises(common.InputError, match="does not exist"):
            common.load_tokenizer(name)
    assert not common._looks_local("Qwen/Qwen3-4B-Thinking-2507")


def test_cli_prints_input_errors_in_one_line(capsys):
    def main(argv):
        raise common.InputError("--data x.jsonl: line 3 is not valid JSON")
    with pytest.raises(SystemExit) as e:
        common.cli(main, [])
    assert e.value.code == 2 and capsys.readouterr().err == "error: --data x.jsonl: line 3 is not valid JSON\n"
    with pytest.raises(KeyError):  # a bug keeps its traceback
        common.cli(lambda argv: {}["x"], [])


def test_hub_kernels_package_clash_is_named(tmp_path):
    """With Hugging Face's PyPI `kernels` installed (in the version range transformers uses), our kernels/
    folder shadows it and transformers would die inside model construction: every stage stops first."""
    import os
    import subprocess
    import sys

    dist = tmp_path / "kernels-0.18.5.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.18.5\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    p = subprocess.run([sys.executable, "sft.py", "--preset", "tiny"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "pip uninstall kernels" in p.stderr
    p = subprocess.run([sys.executable, "-c", "import common"], cwd=root, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 1 and "InputError" in p.stderr  # the Python API: a ValueError subclass


def test_fill_template_is_brace_safe_and_checks_placeholders():
    out = common.fill_template(r"Prove: {problem}. Use \frac{a}{b}; answer in {proof}.",
                               {"problem": "x^{2} {proof}", "proof": "P"}, known=("problem", "proof"), what="t.txt")
    assert out == r"Prove: x^{2} {proof}. Use \frac{a}{b}; answer in P."  # a field's text is never re-read
    with pytest.raises(common.InputError, match=r"t.txt has the placeholders \['problem'\] but the code fills "
                                                r"\['problem', 'proof'\]"):
        common.fill_template("{problem}", {"problem": "p", "proof": "q"}, known=("problem", "proof"), what="t.txt")
    with pytest.raises(ValueError, match="fix t.txt"):  # a known placeholder nobody fills
        common.fill_template("{problem} {proof}", {"problem": "p"}, known=("problem", "proof"), what="t.txt")


def test_epoch_rows_is_one_shuffle_per_epoch_and_a_pure_function_of_the_position():
    rows = common.epoch_rows(7, 3, 0, 21)
    for e in range(3):
        assert sorted(rows[7 * e:7 * (e + 1)]) == list(range(7))  # every row once per epoch
    assert rows[:7] != rows[7:14]  # reshuffled each epoch
    assert common.epoch_rows(7, 3, 5, 9) == rows[5:14]  # a resume at any position continues the stream
    assert common.epoch_rows(7, 4, 0, 7) != rows[:7]  # the seed matters


def test_parse_with_preset_sets_defaults_and_explicit_flags_win():
    import argparse

    def parser():
        p = argparse.ArgumentParser()
        p.add_argument("--preset", default="none")
        p.add_argument("--lr", type=float, default=1e-6)
        p.add_argument("--steps", type=int, default=150)
        return p

    presets = {"tiny": {"lr": 1e-3, "steps": 24}}
    assert vars(common.parse_with_preset(parser(), ["--preset", "tiny"], presets)) == \
        {"preset": "tiny", "lr": 1e-3, "steps": 24}
    assert common.parse_with_preset(parser(), ["--preset", "tiny", "--steps", "5"], presets).steps == 5
    assert common.parse_with_preset(parser(), [], presets).lr == 1e-6


def test_stages_parse_their_presets_without_side_effects(tmp_path, monkeypatch):
    """No stage builds the tiny model while parsing (it did in rc_decode and eval)."""
    import eval as ev
    import rc_decode
    import rl
    import sft

    monkeypatch.setattr(common, "make_tiny_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
    for parse in (sft.parse_args, rl.get_args, rc_decode.parse_args, ev.parse_args):
        assert parse(["--preset", "tiny"]).model == common.TINY_MODEL_DIR


def test_cli_prints_one_line_and_exits_2_for_bad_input_1_for_non_finite(capsys):
    def fails(exc):
        def main():
            raise exc
        return main

    for exc, code in ((common.InputError("--data x.jsonl: line 3 is not JSON"), 2),
                      (common.NonFiniteError("step 4: the gradient norm is nan"), 1)):
        with pytest.raises(SystemExit) as e:
            common.cli(fails(exc))
        assert e.value.code == code and capsys.readouterr().err == f"error: {exc}\n"
    with pytest.raises(KeyError):  # anything else keeps its traceback
        common.cli(fails(KeyError("bug")))
