"""scripts/make_fixture.py at tiny scale: a real corpus (this repository's docs), a trained tokenizer, a few training
steps, and the saved checkpoint loaded by transformers with the same perplexity as the script's own model."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("make_fixture", ROOT / "scripts" / "make_fixture.py")
mf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mf)

TINY = ["--hidden", "32", "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--experts", "8", "--topk", "2",
        "--inter", "16", "--layers", "2", "--vocab", "400", "--batch", "4", "--seq", "64", "--steps", "4",
        "--log-every", "2", "--holdout", "3", "--calib-bytes", "20000", "--eval-bytes", "60000", "--threads", "1"]


def test_batched_experts_match_a_loop_over_experts():
    gen = torch.Generator().manual_seed(0)
    c = mf.hf_config(mf.parse(["--out", "x", *TINY]))
    p = mf.init_params(c, gen)
    pre = "model.layers.0.mlp."
    x = torch.randn(37, 32, generator=gen)
    out, aux = mf.moe(x, p, pre, k=2)
    probs = torch.softmax(x @ p[pre + "gate.weight"].T, -1)
    w, idx = probs.topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    ref = torch.zeros_like(x)
    for n in range(37):
        for j in range(2):
            e = idx[n, j]
            g, u = p[pre + "experts.gate_proj"][e] @ x[n], p[pre + "experts.up_proj"][e] @ x[n]
            h = torch.nn.functional.silu(g) * u
            ref[n] += w[n, j] * (p[pre + "experts.down_proj"][e] @ h)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert aux.item() >= 1.0 - 1e-5  # E * sum(f * P) >= 1 (equality when balanced)


def test_tiny_fixture_loads_in_transformers_with_the_same_perplexity(tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(ROOT / "docs", corpus / "docs")
    shutil.copy(ROOT / "README.md", corpus / "README.md")
    out = tmp_path / "fx"
    mf.main(["--out", str(out), "--corpus", str(corpus), "--glob", "**/*.md", *TINY])
    assert sorted(f.name for f in out.iterdir()) == sorted(["config.json", "model.safetensors", "train_args.json",
                                                            *mf.TEXT_FILES])
    meta = json.loads((out / "train_args.json").read_text())
    assert meta["train_files"] + meta["val_files"] + meta["held_out_files"] == meta["corpus_files"]
    assert meta["dense_ppl_transformers"] == pytest.approx(meta["dense_ppl_own_model"], rel=1e-3)
    assert meta["dense_ppl_own_model"] < 400  # trained a little: better than uniform over the vocabulary
    # eval.txt comes from held-out files only (md5 of the path mod N == 0), never from a trained one
    held = [f for f in corpus.glob("**/*.md")
            if int(hashlib.md5(f.relative_to(corpus).as_posix().encode()).hexdigest(), 16) % 3 == 0]
    first = (out / "eval.txt").read_text()[:200]
    assert any(f.read_text().startswith(first) for f in held)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]) == (8, 2, 16)


def test_no_matching_corpus_file_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="no file matches"):
        mf.main(["--prepare", str(tmp_path / "p"), "--corpus", str(tmp_path), "--glob", "*.pod"])
