"""bench/bench_sft.py at toy sizes on the CPU: it prints its table, sft.py's step and transformers'
own loss compute the same loss on the same packed batch, and an out-of-memory size is a row."""

import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import bench_sft  # noqa: E402


def test_bench_sft_tiny_table_and_same_loss(tmp_path):
    out = tmp_path / "sft.md"
    table, rows = bench_sft.main(["--preset", "tiny", "--out", str(out)])
    assert out.read_text().startswith(table)
    by = {(r["method"], r["tokens"]): r for r in rows}
    for t in (64, 128):
        ours, hf = by[("ours", t)], by[("hf", t)]
        # one model (same seed, same bf16-valued weights), one batch: the two step codes agree on the
        # loss of the first step (ours: packed targets through kernels/; HF: shifted labels, its own CE)
        assert abs(ours["loss"] - hf["loss"]) <= 1e-5 * hf["loss"], (ours["loss"], hf["loss"])
        # near-uniform predictions of a freshly initialized model: CE about log V
        assert abs(ours["loss"] - math.log(4096)) < 0.5
        assert ours["tok_s"] > 0 and ours["peak_gib"] == ours["peak_gib"]
        assert by[("hf-liger", t)]["note"] in ("needs CUDA", "not installed (pip install liger-kernel)")
        assert f"| {bench_sft.LABELS['ours']} | {t:,} | 1 |" in table
    assert "not installed" in table or "needs CUDA" in table


def test_bench_sft_out_of_memory_is_a_row(monkeypatch):
    args = bench_sft.parse_args(["--preset", "tiny", "--sizes", "64", "128", "256"])

    class FakeOpt:
        def zero_grad(self, set_to_none=True):
            pass

    def fake_setup(cfg, device, a):
        def step(examples):
            if len(examples[0][0]) > 64:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
            return 1.0
        return step, None, FakeOpt()

    monkeypatch.setattr(bench_sft, "setup_ours", fake_setup)
    rows = bench_sft.bench_method("ours", bench_sft.model_config(args), torch.device("cpu"), args, 1000, None)
    assert [r.get("note") for r in rows] == [None, "OOM", "skipped (OOM at 128)"]
    table = bench_sft.format_table(rows, "header")
    assert "| 128 | | OOM |" in table and "| 256 | | skipped (OOM at 128) |" in table
