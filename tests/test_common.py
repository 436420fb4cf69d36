"""The offline harness itself: the real tokenizer's chat template and the tiny model's code path."""

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
