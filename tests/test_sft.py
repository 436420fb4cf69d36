"""sft.py on the tiny Qwen3 with the real tokenizer and the bundled data, all on CPU.

One 16-step run (module fixture) is shared: the loss falls, its checkpoints reload, a killed copy
resumes onto the same curve bit for bit, and two torchrun processes reproduce its first steps.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import common
import sft
from kernels import linear_cross_entropy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data", "tiny_sft.jsonl")
STEPS = 16


def tiny_argv(model_dir, out, *extra):
    # a shorter, hotter schedule than the preset's 100-step warm-up, so the mechanics tests run in seconds
    return ["--preset", "tiny", "--model", model_dir, "--output-dir", out, "--max-steps", str(STEPS),
            "--global-batch-size", "8", "--micro-batch-size", "4", "--lr", "5e-3", "--warmup-ratio", "0.03",
            "--min-lr-ratio", "0", "--save-every", "4", "--keep-last", "-1", "--eval-every", "4", *extra]


def metrics(out):
    return [r for r in common.read_jsonl(os.path.join(out, "metrics.jsonl")) if "step" in r]


def sub_env():
    # same thread count as this process, so subprocess runs are bitwise comparable with in-process ones
    return dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sft") / "run")
    result = sft.main(sft.parse_args(tiny_argv(tiny_model_dir, out)))
    return out, result


# ---------------------------------------------------------------------------------------------
# data: chat template, assistant-only mask, packing


def test_mask_covers_exactly_the_assistant_turn(tokenizer):
    row = json.loads(open(DATA).readline())
    msgs = sft.row_messages(row)
    (ids, mask), = sft.tokenize_conversations(tokenizer, [msgs])
    # same tokens as the template's own tokenization of the whole conversation
    assert ids == list(tokenizer.apply_chat_template(msgs, tokenize=True)["input_ids"])
    pieces = [tokenizer.decode([i]) for i in ids]
    start = pieces.index("<think>")
    assert pieces[start - 3:start] == ["<|im_start|>", "assistant", "\n"]
    assert mask == [0] * start + [1] * (len(ids) - start - 1) + [0]  # the trailing "\n" is template filler
    assert pieces[-2:] == ["<|im_end|>", "\n"]
    trained = "".join(p for p, m in zip(pieces, mask) if m)
    assert trained == msgs[-1]["content"] + "<|im_end|>"
    assert "".join(p for p, m in zip(pieces, mask) if not m).endswith("<|im_start|>assistant\n\n")
    # rows without `messages` are built from problem / reasoning_content / proof, with the same tokens
    flat = {k: row[k] for k in ("problem", "reasoning_content", "proof")}
    assert sft.tokenize_conversations(tokenizer, [sft.row_messages(flat)]) == [(ids, mask)]


def test_mask_under_the_thinking_2507_template(thinking_tokenizer):
    """Qwen3-4B-Thinking-2507's template opens <think> in the generation prompt: the prompt (what the
    model is given at inference) ends with it, so it is not trained; everything the model generates at
    inference (reasoning, </think>, proof, <|im_end|>) is, and the prompt tokens are exactly the
    inference prompt's."""
    tok = thinking_tokenizer
    row = json.loads(open(DATA).readline())
    msgs = sft.row_messages(row)
    (ids, mask), = sft.tokenize_conversations(tok, [msgs])
    first = mask.index(1)
    prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert ids[:first] == tok(prompt, add_special_tokens=False).input_ids  # what generation starts from
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == f"{row['reasoning_content']}\n</think>\n\n{row['proof']}<|im_end|>"
    assert sum(mask) == len(ids) - first - 1  # all of the assistant turn, then the template's "\n"
    flat = {k: row[k] for k in ("problem", "reasoning_content", "proof")}
    assert sft.tokenize_conversations(tok, [sft.row_messages(flat)]) == [(ids, mask)]


def test_mask_multi_turn_trains_only_the_last_assistant_turn(tokenizer):
    msgs = [{"role": "system", "content": "Be rigorous."},
            {"role": "user", "content": "Prove 1 = 1."},
            {"role": "assistant", "content": "<think>\nold reasoning\n</think>\n\nTrivial."},
            {"role": "user", "content": "Now prove 2 = 2."},
            {"role": "assistant", "content": "<think>\nreflexivity\n</think>\n\nBy reflexivity."},
            {"role": "user", "content": "trailing turn, dropped"}]
    (ids, mask), = sft.tokenize_conversations(tokenizer, [sft.row_messages({"messages": msgs})])
    text = tokenizer.decode(ids)
    assert "old reasoning" not in text and "trailing turn" not in text  # the template drops old thinking
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "<think>\nreflexivity\n</think>\n\nBy reflexivity.<|im_end|>"
    first = mask.index(1)
    assert sum(mask) == len(ids) - first - 1 and tokenizer.decode(ids[:first]).endswith("<|im_start|>assistant\n")


def test_packed_rows_give_the_unpacked_per_row_loss(tiny_model_dir, tokenizer):
    rows = [json.loads(line) for line in open(DATA)][:3]
    ex = sft.tokenize_conversations(tokenizer, [sft.row_messages(r) for r in rows])
    for impl in ("sdpa", "eager"):
        lm = common.load_model(tiny_model_dir, dtype=torch.float32, attn_implementation=impl).eval()
        w = lm.lm_head.weight
        with torch.no_grad():
            ids, pos, tgt = sft.pack(ex, "cpu")
            assert pos[0].tolist() == [t for e in ex for t in range(len(e[0]))]
            hidden = lm.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[0]
            off = 0
            for e in ex:
                n = len(e[0])
                i1, p1, t1 = sft.pack([e], "cpu")
                assert torch.equal(t1, tgt[off:off + n]) and t1[-1] == -100  # no target across rows
                alone = lm.model(input_ids=i1, position_ids=p1, use_cache=False).last_hidden_state[0]
                torch.testing.assert_close(hidden[off:off + n], alone, atol=1e-5, rtol=1e-5)
                packed_ce = linear_cross_entropy(hidden[off:off + n], w, t1, reduction="sum")
                # float64 reference from the materialized logits of the unpacked row
                logp = torch.log_softmax(alone.double() @ w.double().T, -1)
                keep = t1 != -100
                ref = -logp[keep].gather(1, t1[keep, None]).sum()
                assert keep.sum() == sum(e[1][1:])
                torch.testing.assert_close(packed_ce.double(), ref, rtol=2e-5, atol=1e-4)
                off += n
            # without per-row positions the rows would see each other: the check above can fail
            leaky = lm.model(input_ids=ids, use_cache=False).last_hidden_state[0]
            assert (leaky[len(ex[0][0]):] - hidden[len(ex[0][0]):]).abs().max() > 1e-2


def test_the_loss_module_matches_full_logits_in_value_and_gradient(tiny_model_dir, tokenizer):
    """CausalLMLoss sends only the loss positions through the lm head (prompt rows skip the V-wide
    matmul); loss and gradients equal a float64 reference over the full logits of the packed row."""
    rows = [json.loads(line) for line in open(DATA)][:3]
    ex = sft.tokenize_conversations(tokenizer, [sft.row_messages(r) for r in rows])
    ids, pos, tgt = sft.pack(ex, "cpu")
    assert (tgt == -100).sum() > (tgt != -100).sum()  # mostly prompt: the skipped rows are most of the row
    lm = common.load_model(tiny_model_dir, dtype=torch.float32).train()
    ours = sft.CausalLMLoss(lm, torch.float32)(ids, pos, tgt)
    ours.backward()
    got = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad(set_to_none=True)
    lm.double()
    logp = torch.log_softmax(lm(input_ids=ids, position_ids=pos, use_cache=False).logits[0], -1)
    keep = tgt != -100
    ref = -logp[keep].gather(1, tgt[keep, None]).sum()
    ref.backward()
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-5, atol=1e-4)
    for n, p in lm.named_parameters():
        torch.testing.assert_close(got[n].double(), p.grad, rtol=1e-3, atol=1e-5, msg=n)


def test_lr_schedule():
    lr = lambda s: sft.lr_at(s, peak=3e-5, total=620, warmup_ratio=0.03)  # noqa: E731
    assert lr(0) == pytest.approx(3e-5 / 19) and lr(18) == pytest.approx(3e-5)  # ceil(0.03 * 620) = 19
    decay = [lr(s) for s in range(18, 620)]
    assert all(a >= b * (1 - 1e-12) for a, b in zip(decay, decay[1:])) and 0 < lr(619) < 1e-8
    assert lr(319) == pytest.approx(1.5e-5, rel=1e-2)


def test_overlong_rows_dropped_or_truncated(tokenizer):
    args = sft.parse_args(["--preset", "tiny", "--max-length", "52"])
    ex, stats = sft.load_examples(args, tokenizer)
    assert stats["dropped_overlong"] > 0 and stats["kept"] == len(ex) == 512 - stats["dropped_overlong"]
    assert all(len(i) <= 52 for i, _ in ex)
    args = sft.parse_args(["--preset", "tiny", "--max-length", "52", "--overlong", "truncate"])
    ex, stats = sft.load_examples(args, tokenizer)
    assert stats["dropped_overlong"] == 0 and stats["truncated"] > 0 and len(ex) == 512
    assert max(len(i) for i, _ in ex) == 52 and all(len(i) == len(m) for i, m in ex)


# ---------------------------------------------------------------------------------------------
# training runs


def test_loss_falls_and_checkpoints_reload(tiny_run):
    out, result = tiny_run
    hist = metrics(out)
    assert [r["step"] for r in hist] == list(range(1, STEPS + 1))
    first, last = hist[0]["loss"], sum(r["loss"] for r in hist[-3:]) / 3
    assert first > 11 and last < 0.4 * first, (first, last)
    vals = [r["val_loss"] for r in hist if "val_loss" in r]
    assert len(vals) == 4 and vals[3] < vals[2] < vals[1] < vals[0] < first
    # the final export reloads with plain transformers to identical logits
    lm = result["model"].lm.eval()
    reloaded = AutoModelForCausalLM.from_pretrained(os.path.join(out, "final"), dtype=torch.float32).eval()
    x = torch.tensor([[151644, 872, 198, 46126, 220, 16, 488, 220, 24, 13]])
    with torch.no_grad():
        assert torch.equal(lm(input_ids=x).logits, reloaded(input_ids=x).logits)
    state = json.load(open(os.path.join(out, "step_00008", "trainer_state.json")))
    assert state["step"] == 8 and state["args"]["lr"] == 5e-3 and state["data"]["kept"] == 512
    assert os.path.exists(os.path.join(out, "step_00008", "model.safetensors"))


def test_killed_run_resumes_onto_the_same_curve(tiny_run, tiny_model_dir, tmp_path):
    ref_out, _ = tiny_run
    out = str(tmp_path / "run")
    cmd = [sys.executable, "sft.py", *tiny_argv(tiny_model_dir, out)]
    # 1. SIGKILL after step 6: what came after the step-4 checkpoint is lost, nothing before
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=sub_env())
    for line in proc.stdout:
        if line.startswith("step 00006/"):
            proc.kill()
            break
    proc.wait()
    assert sorted(n for n in os.listdir(out) if n.startswith("step_")) == ["step_00004"]
    # 2. resume, then SIGTERM: the run finishes its step, saves it and exits with 128 + 15
    proc = subprocess.Popen(cmd + ["--resume"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=sub_env())
    log = []
    for line in proc.stdout:
        log.append(line)
        if line.startswith("step 00005/"):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 143, "".join(log[-20:])
    assert any("resumed from" in x and "step_00004" in x for x in log)
    stopped = max(r["step"] for r in metrics(out))
    assert stopped in (5, 6) and os.path.isdir(os.path.join(out, f"step_{stopped:05d}"))
    # 3. resume in this process up to the step-8 checkpoint: the curve so far and the weights equal
    #    those of the uninterrupted run, bit for bit
    sft.main(sft.parse_args(tiny_argv(tiny_model_dir, out, "--resume", "--stop-after", "8")))
    got, want = metrics(out), metrics(ref_out)[:8]
    assert [r["step"] for r in got] == list(range(1, 9))
    assert [(r["loss"], r["gnorm"], r.get("val_loss")) for r in got] == \
        [(r["loss"], r["gnorm"], r.get("val_loss")) for r in want]
    a = load_file(os.path.join(out, "step_00008", "model.safetensors"))
    b = load_file(os.path.join(ref_out, "step_00008", "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a = load_file(os.path.join(out, "step_00008", "resume", "rank00000.safetensors"))
    b = load_file(os.path.join(ref_out, "step_00008", "resume", "rank00000.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # optimizer state too


def test_torchrun_two_processes_match_one(tiny_run, tiny_model_dir, tmp_path):
    ref_out, _ = tiny_run
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sft.py",
           *tiny_argv(tiny_model_dir, out)]
    env = dict(sub_env(), OMP_NUM_THREADS="1")
    # two steps, stop; resume from the sharded optimizer state for two more
    for extra in (["--stop-after", "2"], ["--resume", "--stop-after", "4"]):
        p = subprocess.run(cmd + extra, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "2 process(es) (FSDP2)" in p.stdout and "resumed from" in p.stdout
    got, want = metrics(out), metrics(ref_out)[:4]
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for g, w in zip(got, want):  # same global batch -> same loss, up to summation order
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5) and g["gnorm"] == pytest.approx(w["gnorm"], rel=1e-4)
        assert g["loss_tokens"] == w["loss_tokens"]
    assert got[3]["val_loss"] == pytest.approx(want[3]["val_loss"], rel=1e-5)
    # the FSDP-gathered export holds the same weights as the single-process step-4 checkpoint
    a = load_file(os.path.join(out, "step_00004", "model.safetensors"))
    b = load_file(os.path.join(ref_out, "step_00004", "model.safetensors"))
    init = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert a.keys() == b.keys() == init.keys()
    for k in a:  # Adam amplifies rounding where a gradient is ~0: compare the size of the updates
        moved = (b[k] - init[k]).norm()
        assert moved > 0 and (a[k] - b[k]).norm() < 1e-3 * moved, k
    assert len(os.listdir(os.path.join(out, "step_00004", "resume"))) == 2  # one optimizer shard per rank


def test_lora_trains_only_the_adapter(tiny_model_dir, tmp_path):
    out = str(tmp_path / "lora")
    res = sft.main(sft.parse_args(["--preset", "tiny", "--model", tiny_model_dir, "--output-dir", out,
                                   "--max-steps", "3", "--lora-r", "4", "--merge-lora", "--eval-every", "0"]))
    base = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    peft_model = res["model"].lm
    n_lora = 0
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            n_lora += 1
            assert p.requires_grad
            if "lora_B" in name:
                assert p.abs().max() > 0  # B starts at zero: it moved
        else:
            assert not p.requires_grad
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(p.detach(), base[key]), key
    assert n_lora == 2 * 7 * 2  # A and B on 7 linear layers in each of 2 decoder layers
    files = os.listdir(os.path.join(out, "final"))
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "final-merged"), dtype=torch.float32).eval()
    x = torch.tensor([[151644, 872, 198, 46126, 220, 16]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, peft_model.eval()(input_ids=x).logits,
                                   atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# bad input


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def test_bad_rows_are_named(tokenizer, tmp_path):
    good = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    cases = [([{"text": "hi"}], "has columns ['text']"),
             ([good, {"messages": [{"role": "user", "content": "Q"}]}],
              "row 1: the conversation has no assistant turn"),
             ([{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": 3}]}],
              "row 0: message 1 is not a {role: str, content: str}"),
             ([{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "  "}]}],
              "row 0: message 1 (assistant) has empty content"),
             ([{"messages": []}], "row 0: `messages` must be a non-empty list")]
    for i, (rows, msg) in enumerate(cases):
        path = write_jsonl(tmp_path / f"bad{i}.jsonl", rows)
        with pytest.raises(ValueError) as e:
            sft.load_examples(sft.parse_args(["--preset", "tiny", "--data", path]), tokenizer)
        assert msg in str(e.value) and path in str(e.value), str(e.value)
    path = write_jsonl(tmp_path / "mixed.jsonl", [good, {"messages": [{"role": "user", "content": "Q"}]}, good])
    ex, stats = sft.load_examples(sft.parse_args(["--preset", "tiny", "--data", path, "--bad-rows", "skip"]), tokenizer)
    assert len(ex) == 2 and stats["skipped_bad"] == 1


def test_bad_setup_errors(tiny_run, tiny_model_dir, tmp_path):
    run_out, _ = tiny_run
    # a tokenizer without a chat template
    plain = str(tmp_path / "plain")
    shutil.copytree(tiny_model_dir, plain)
    os.remove(os.path.join(plain, "chat_template.jinja"))
    cfg = json.load(open(os.path.join(plain, "tokenizer_config.json")))
    cfg.pop("chat_template", None)
    json.dump(cfg, open(os.path.join(plain, "tokenizer_config.json"), "w"))
    with pytest.raises(ValueError, match="no chat template.*--tokenizer"):
        sft.main(sft.parse_args(["--preset", "tiny", "--model", plain, "--output-dir", str(tmp_path / "a")]))
    # an output dir holding another run, without --resume / --overwrite
    with pytest.raises(ValueError, match="already holds a run.*--resume.*--overwrite"):
        sft.main(sft.parse_args(tiny_argv(tiny_model_dir, run_out)))
    # --resume with different settings names the flag
    with pytest.raises(ValueError, match=r"--lr: 0\.005 -> 0\.001"):
        sft.main(sft.parse_args(tiny_argv(tiny_model_dir, run_out, "--resume", "--lr", "1e-3")))
    # batch sizes that do not divide
    with pytest.raises(ValueError, match="--global-batch-size 16 must be a multiple of --micro-batch-size 3"):
        sft.check_args(sft.parse_args(["--preset", "tiny", "--micro-batch-size", "3"]), 1)
    with pytest.raises(ValueError, match="--load-in-4bit.*--lora-r"):
        sft.check_args(sft.parse_args(["--preset", "tiny", "--load-in-4bit"]), 1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--load-in-4bit needs a CUDA GPU"):
            sft.main(sft.parse_args(["--preset", "tiny", "--model", tiny_model_dir, "--output-dir",
                                     str(tmp_path / "q"), "--lora-r", "4", "--load-in-4bit"]))


def test_impossible_flags_and_a_resume_of_nothing_are_refused(tmp_path):
    for bad in (["--max-steps", "0"], ["--max-steps", "-2"], ["--lr", "inf"], ["--lr", "0"], ["--val-rows", "-3"],
                ["--global-batch-size", "0"], ["--warmup-ratio", "1.5"], ["--grad-clip", "nan"]):
        with pytest.raises(common.InputError, match=bad[0]):
            sft.check_args(sft.parse_args(["--preset", "tiny", *bad]), 1)
    with pytest.raises(common.InputError, match="holds no run.*drop --resume"):
        sft.main(sft.parse_args(["--preset", "tiny", "--output-dir", str(tmp_path / "empty"), "--resume"]))


def test_an_unknown_device_is_refused_not_run_on_the_cpu(capsys):
    # common.compute_init takes any --device other than auto/cuda as the CPU: a typo must stop at the parser
    for bad in ("gpu", "cuda:1"):
        with pytest.raises(SystemExit):
            sft.parse_args(["--preset", "tiny", "--device", bad])
        assert "--device" in capsys.readouterr().err


def test_non_finite_gradient_stops_before_the_optimizer_step(tiny_model_dir):
    args = sft.parse_args(["--preset", "tiny", "--model", tiny_model_dir])
    model, trainable, dtype = sft.build_model(args, torch.device("cpu"), 1)
    opt = sft.build_optimizer(args, trainable)
    before = [p.detach().clone() for p in trainable]
    with torch.no_grad():
        trainable[0][0, 0] = float("nan")  # a poisoned weight: NaN loss and gradients
    example = ([1, 2, 3, 4], [0, 0, 1, 1])
    with pytest.raises(sft.NonFiniteError, match="gradient norm is nan"):
        sft.train_step(model, opt, trainable, [[example]], 2, torch.device("cpu"), 1, contextlib.nullcontext(), 1.0)
    assert all(torch.equal(p, q) or torch.isnan(p).any() for p, q in zip(trainable, before))
    assert not opt.state  # the optimizer never stepped
