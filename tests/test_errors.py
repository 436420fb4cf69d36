"""Issue 16's probes that still gave a traceback, a wrong flag or no error (2026-12-01, session 5): each
bad input is one InputError (a ValueError subclass; the CLIs print it as one line, exit 2) that names
the file and line, the flag or the model, and the fix."""

import pytest

import common
import judge
import rc_decode
import rl
import sft


def bad_files(tmp_path):
    """The data files of the probes: empty, a bad last line, not UTF-8."""
    files = {"empty.jsonl": b"", "torn.jsonl": b'{"problem": "a", "proof": "b"}\n{"problem": "x", "proof": \n',
             "latin1.jsonl": '{"problem": "caf\u00e9"}\n'.encode("latin-1")}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: str(tmp_path / name) for name in files}


@pytest.mark.parametrize("name,msg", [("empty.jsonl", "holds no problems"), ("torn.jsonl", "line 2 is not valid JSON"),
                                      ("latin1.jsonl", "not UTF-8 text")])
def test_rc_decode_input_errors_are_input_errors(tmp_path, name, msg):
    """Before: a bare ValueError (traceback, exit 1) and, for the bytes, a UnicodeDecodeError naming no file."""
    path = bad_files(tmp_path)[name]
    with pytest.raises(common.InputError, match=msg) as e:
        rc_decode.read_problems(path)
    assert path in str(e.value)


@pytest.mark.parametrize("name,msg", [("empty.jsonl", "holds no rows"), ("torn.jsonl", "line 2 is not valid JSON"),
                                      ("latin1.jsonl", "not UTF-8 text")])
def test_judge_input_errors(tmp_path, name, msg):
    """Before: an empty input 'graded 0 rows' with exit 0, a bad last line was skipped without a word (taken
    for a torn tail of our own output), the bytes were a UnicodeDecodeError."""
    path = bad_files(tmp_path)[name]
    args = judge.parse_args(["--input", path, "--output", str(tmp_path / "grades.jsonl"), "--judge-base-url",
                             "http://127.0.0.1:9/v1"])
    with pytest.raises(common.InputError, match=msg) as e:
        judge.main(args)
    assert path in str(e.value)


def test_output_dir_that_cannot_be_a_folder_is_named(tmp_path, tiny_model_dir):
    """Before: NotADirectoryError from os.makedirs (sft.py, rl.py), after the flags were parsed."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = str(blocker / "run")
    with pytest.raises(common.InputError, match="--output-dir .*cannot write there"):
        sft.main(sft.parse_args(["--preset", "tiny", "--model", tiny_model_dir, "--output-dir", out]))
    with pytest.raises(common.InputError, match="--output-dir .*cannot write there"):
        rl.main(rl.parse_args(["--preset", "tiny", "--model", tiny_model_dir, "--output-dir", out]))


def test_model_typos_name_the_flag_given(tmp_path):
    """sft.py named --tokenizer for a typo in --model (and raised a plain ValueError: a traceback)."""
    typo = str(tmp_path / "runs" / "sft-tni" / "final")
    with pytest.raises(common.InputError, match=r"^--model tokenizer path .*does not exist"):
        sft.main(sft.parse_args(["--preset", "tiny", "--model", typo, "--output-dir", str(tmp_path / "o")]))
    with pytest.raises(common.InputError, match=r"^--tokenizer tokenizer path"):
        sft.main(sft.parse_args(["--preset", "tiny", "--tokenizer", typo, "--output-dir", str(tmp_path / "p")]))


def test_a_model_the_hub_cannot_give_is_one_line(monkeypatch):
    """A name of hub form that is no folder here and that the hub does not give (offline, a typo, gated):
    before, transformers' OSError traceback. (from_pretrained raises here as it does without a network,
    minus its minute of retries.)"""
    import transformers

    def offline(name, **kw):
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {name}.\nCheck ...")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", offline)
    for load in (common.load_model, common.load_tokenizer):
        with pytest.raises(common.InputError, match="'nobody-here/no-such-model': not a folder here, and the "
                                                    "Hugging Face hub did not give it .We couldn't connect"):
            load("nobody-here/no-such-model")
    with pytest.raises(common.InputError, match="^--tokenizer 'nobody-here/x': not a folder"):
        common.load_tokenizer("nobody-here/x", flag="--tokenizer")


def test_sft_flag_messages():
    """--lr inf said 'must be a finite number in (0, inf]'; the batch-size multiple was a plain ValueError."""
    with pytest.raises(common.InputError, match=r"--lr inf: must be a finite number in \(0, inf\)$"):
        sft.check_args(sft.parse_args(["--preset", "tiny", "--lr", "inf"]), 1)
    with pytest.raises(common.InputError, match="--global-batch-size 16 must be a multiple"):
        sft.check_args(sft.parse_args(["--preset", "tiny", "--global-batch-size", "16", "--micro-batch-size", "3"]), 1)


def test_eval_names_a_tokenizer_flag_it_has(tmp_path, tiny_model_dir):
    """A model whose vocabulary the tokenizer does not fit: the error says to pass --tokenizer, which eval.py
    did not have (its parser refused the flag the error named)."""
    import eval as ev
    from transformers import AutoModelForCausalLM

    small = str(tmp_path / "small")
    cfg = common.tiny_qwen3_config(vocab_size=1000)
    cfg.pad_token_id = 0
    AutoModelForCausalLM.from_config(cfg).save_pretrained(small)
    common.load_tokenizer(tiny_model_dir).save_pretrained(small)
    with pytest.raises(common.InputError, match="vocabulary is 1000.*pass the matching one with --tokenizer"):
        ev.main(ev.parse_args(["--preset", "tiny", "--model", small, "--output-dir", str(tmp_path / "e")]))
    assert ev.parse_args(["--preset", "tiny", "--tokenizer", tiny_model_dir]).tokenizer == tiny_model_dir
