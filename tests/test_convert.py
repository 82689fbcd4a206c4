"""The streaming conversion pipeline on the real fixture: exact ratios, honest reports, dense export, resume."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from model_factory import FIXTURE, fuse_experts, split_into_shards
from safetensors import safe_open

from vllm_moe_lowrank.converters import cli
from vllm_moe_lowrank.converters.checkpoint import Checkpoint
from vllm_moe_lowrank.converters.verify import verify_checkpoint
from vllm_moe_lowrank.format import PROJS, MoELowRankConfig
from vllm_moe_lowrank.materialize import materialize_projection

CALIB = ["--calib-data", str(FIXTURE / "calib.txt"), "--num-samples", "16", "--seq-len", "128"]


def convert(src: Path, out: Path, *extra: str, method: str = "svd", ratio: float = 0.3) -> dict:
    cli.main(["--method", method, "--ratio", str(ratio), str(src), str(out), *CALIB, *extra])
    return json.loads((out / "moe_lowrank_report.json").read_text())


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[float, Path]:
    root = tmp_path_factory.mktemp("svd")
    return {r: _conv(root, r) for r in (0.2, 0.5)}


def _conv(root: Path, ratio: float) -> Path:
    out = root / f"svd-{ratio}"
    convert(FIXTURE, out, "--dtype", "float32", "--export-dense", str(root / f"dense-{ratio}"), ratio=ratio)
    return out


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_achieved_ratio_recounted_from_written_tensors(converted, ratio):
    out = converted[ratio]
    report = json.loads((out / "moe_lowrank_report.json").read_text())
    kept = 0
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for name in st.keys():
                if ".mlp.experts." in name and st.get_slice(name).get_dtype() != "I32":
                    kept += math.prod(st.get_slice(name).get_shape())
    original = 3 * 16 * 192 * 192 * 4
    achieved = 1 - kept / original
    assert abs(achieved - ratio) <= 0.005
    assert report["achieved_ratio"] == pytest.approx(achieved, abs=1e-9)
    assert report["expert_params"] == {"original": original, "kept": kept, "index_bytes": 0}
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "moe_lowrank" and cfg["achieved_ratio"] == pytest.approx(achieved, abs=1e-6)
    assert report["command"].startswith("moe-convert --method svd")


def test_report_errors_equal_recomputation_from_written_tensors(converted):
    out = converted[0.5]
    report = json.loads((out / "moe_lowrank_report.json").read_text())
    cfg, _ = verify_checkpoint(out)
    comp, orig = Checkpoint(out), Checkpoint(FIXTURE)
    for layer in cfg.moe_layers:
        stored = comp.get_many(cfg.tensor_specs(layer))
        for p in PROJS:
            num = den = 0.0
            for e in range(cfg.num_experts):
                w = orig.get(f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight").double()
                num += float((w - materialize_projection(cfg, layer, p, e, stored.__getitem__)).square().sum())
                den += float(w.square().sum())
            assert report["layers"][str(layer)]["weight_rel_err"][p] == pytest.approx(math.sqrt(num / den),
                                                                                       rel=1e-9)
        assert 0 < report["layers"][str(layer)]["output_rel_err"] < 0.5


def test_non_expert_tensors_and_aux_files_are_copied_unchanged(converted):
    out = converted[0.2]
    src, dst = Checkpoint(FIXTURE), Checkpoint(out)
    for name in src.tensors:
        if ".mlp.experts." not in name:
            assert torch.equal(src.get(name), dst.get(name)), name
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (out / f).read_bytes() == (FIXTURE / f).read_bytes()
    assert not list(out.parent.glob("*.moe-convert-tmp"))


def test_dense_export_loads_in_transformers_and_generates(converted, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dense = converted[0.2].parent / "dense-0.2"
    assert "quantization_config" not in json.loads((dense / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(dense)
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    ids = tok("The built-in function", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:])
    assert out.shape[1] == ids.shape[1] + 12 and text.strip(), text
    # the export is the materialized compressed checkpoint: its experts equal the reference materializer
    cfg, _ = verify_checkpoint(converted[0.2])
    stored = Checkpoint(converted[0.2]).get_many(cfg.tensor_specs(1))
    w = Checkpoint(dense).get("model.layers.1.mlp.experts.3.down_proj.weight")
    assert torch.equal(w, materialize_projection(cfg, 1, "down", 3, stored.__getitem__).float())


def test_sharded_and_fused_inputs_convert_to_the_same_checkpoint(converted, tmp_path):
    """An indexed multi-shard copy and a fused 3-D expert copy of the fixture give identical tensors."""
    ref = Checkpoint(converted[0.2])
    for variant in ("sharded", "fused"):
        src = (split_into_shards if variant == "sharded" else fuse_experts)(FIXTURE, tmp_path / f"src-{variant}")
        assert (len(list(src.glob("*.safetensors"))) > 1) == (variant == "sharded")
        out = tmp_path / f"out-{variant}"
        convert(src, out, "--dtype", "float32", ratio=0.2)
        got = Checkpoint(out)
        assert set(got.tensors) == set(ref.tensors)
        for name in ref.tensors:
            assert torch.equal(got.get(name), ref.get(name)), (variant, name)


def test_dry_run_plans_without_writing(tmp_path, capsys):
    out = tmp_path / "never"
    cli.main(["--method", "svd", "--ratio", "0.3", str(FIXTURE), str(out), *CALIB, "--dry-run"])
    plan = json.loads(capsys.readouterr().out)
    assert not out.exists() and not list(tmp_path.iterdir())
    assert plan["moe_layers"] == 4 and len(plan["layers"]) == 4 and plan["peak_memory_estimate_gb"] > 0
    assert plan["layers"][0]["params"] <= (1 - 0.3) * 3 * 16 * 192 * 192


def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.name != "moe_lowrank_report.json"}


def _report_without_timings(folder: Path) -> dict:
    r = json.loads((folder / "moe_lowrank_report.json").read_text())
    r.pop("timings")
    r.pop("command")
    for layer in r["layers"].values():
        layer.pop("seconds")
    return r


def test_killed_run_resumes_to_identical_files(tmp_path):
    """SIGKILL a real conversion after its first layer is written, resume it, compare with an uninterrupted run."""
    args = ["--method", "svd", "--ratio", "0.4", str(FIXTURE), "", *CALIB, "--dtype", "float32"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    cmd = [sys.executable, "-m", "vllm_moe_lowrank.converters.cli"]
    subprocess.run(cmd + [a if a else str(whole) for a in args], check=True, capture_output=True)

    progress = resumed.with_name("resumed.moe-convert-tmp") / ".state" / "progress.json"
    proc = subprocess.Popen(cmd + [a if a else str(resumed) for a in args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file() and len(json.loads(progress.read_text() or "{}").get("layers", {})) >= 1:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the conversion finished before it could be killed"
    assert not resumed.exists()
    done = len(json.loads(progress.read_text())["layers"])
    assert 1 <= done < 4

    with pytest.raises(SystemExit) as exc:  # neither --resume nor --overwrite: refuse and explain
        cli.main([a if a else str(resumed) for a in args])
    assert exc.value.code == 2
    r = subprocess.run(cmd + [a if a else str(resumed) for a in args] + ["--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _files(resumed) == _files(whole)
    assert _report_without_timings(resumed) == _report_without_timings(whole)


def test_resume_refuses_changed_settings(tmp_path):
    tmp = tmp_path / "out.moe-convert-tmp"
    (tmp / ".state").mkdir(parents=True)
    (tmp / ".state" / "progress.json").write_text(json.dumps({"fingerprint": {"ratio": 0.9}, "layers": {}}))
    with pytest.raises(SystemExit):
        convert(FIXTURE, tmp_path / "out", "--resume")


def test_format_config_round_trips_through_config_json(converted):
    cfg = json.loads((converted[0.2] / "config.json").read_text())
    parsed = MoELowRankConfig.from_hf_config(cfg)
    assert parsed.moe_layers == [0, 1, 2, 3] and parsed.dense_layers() == []
    assert parsed.layers[2].gate.lowrank is not None
    ranks = [r for l in parsed.layers.values() for p in PROJS for r in l.proj(p).lowrank.ranks]
    assert max(ranks) - min(ranks) <= 1  # one uniform rank, topped up by one where the budget allows


# ----- calibration that sees the compressed model (issue 15) -------------------------------------------------------
def _routing_calib(T: int = 2000, n: int = 12, E: int = 4, k: int = 2, seed: int = 0):
    from vllm_moe_lowrank.converters.calibration import LayerCalibration

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, n, generator=g) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g))
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g) + 0.05
    return LayerCalibration(x=x, topk_ids=ids, topk_weights=w / w.sum(1, keepdim=True), num_experts=E)


def test_grams_are_routing_weighted_chunked_and_switchable(monkeypatch):
    from dataclasses import replace

    from vllm_moe_lowrank.converters import calibration

    calib = _routing_calib()
    tok, g = calib.token_index(1), calib.route_weight(1)
    x = calib.x[tok].double()
    torch.testing.assert_close(calib.gram_in(1), (x * g[:, None].double() ** 2).T @ x)
    monkeypatch.setattr(calibration, "GRAM_CHUNK", 7)  # many chunks, same sums
    torch.testing.assert_close(calib.gram_in(1), (x * g[:, None].double() ** 2).T @ x)
    w2 = calib.topk_weights.double().square().sum(1)
    torch.testing.assert_close(calib.mean_gram_in(), (calib.x.double() * w2[:, None]).T @ calib.x.double() / w2.sum())
    calib.opts = replace(calib.opts, weighted=False)  # --gram-weight none: the plain Σ x xᵀ
    torch.testing.assert_close(calib.gram_in(1), x.T @ x)
    torch.testing.assert_close(calib.mean_gram_in(), calib.x.double().T @ calib.x.double() / calib.num_tokens)


def test_smooth_shrinkage_has_no_cliff_and_cliff_keeps_the_old_rule():
    from vllm_moe_lowrank.converters.whitening import regularize_gram

    d = 8
    mean = torch.eye(d, dtype=torch.float64)
    zero = torch.zeros(d, d, dtype=torch.float64)
    prior = lambda n, smooth: float(regularize_gram(zero, n, mean, 0.0, 0.1, smooth=smooth).trace()) / d  # noqa
    assert prior(d - 1, True) == prior(d + 1, True) == pytest.approx(0.1 * d)  # every expert, continuous in N_e
    assert prior(d - 1, False) == pytest.approx(0.1 * (d - 1)) and prior(d + 1, False) == 0.0  # the old cliff


def test_down_target_is_the_least_squares_fit_on_compressed_intermediates():
    """‖W_d H − Ŵ Ĥ‖²_g = ‖(Ŵ − W*) Ĝ^½‖² + const for every Ŵ, so W* minimizes the routed output error of down
    fed with the compressed gate/up's ĥ (unregularized: damp = shrink = 0)."""
    from vllm_moe_lowrank.converters.experts import ExpertWeights

    calib = _routing_calib(n=6, E=3)
    g = torch.Generator().manual_seed(3)
    w = ExpertWeights(gate=torch.randn(3, 5, 6, generator=g), up=torch.randn(3, 5, 6, generator=g),
                      down=torch.randn(3, 6, 5, generator=g))
    gate_hat, up_hat = (w.proj(p)[1].double() + 0.3 * torch.randn(5, 6, generator=g, dtype=torch.float64)
                        for p in ("gate", "up"))
    W_star, G_hat = calib.down_target(1, w, gate_hat, up_hat, damp=0.0, shrink=0.0)
    r = calib.route_weight(1).double()[:, None]
    y = (calib.intermediate(1, w).double() @ w.down[1].double().T) * r  # dense output, routing-weighted
    h_hat = calib.intermediate(1, w, gate_hat, up_hat).double() * r

    def err(W):
        return float((y - h_hat @ W.T).square().sum())

    assert err(W_star) < 0.9 * err(w.down[1].double())
    for seed in (0, 1):
        W = W_star + torch.randn(W_star.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        quad = float(((W - W_star) @ G_hat * (W - W_star)).sum())
        assert err(W) == pytest.approx(err(W_star) + quad, rel=1e-6)


def test_down_fit_on_compressed_intermediates_lowers_in_sample_error():
    """svd at the same ranks: down refitted on ĥ (default) beats down fitted on h, on the calibration tokens."""
    from dataclasses import replace

    from method_fakes import fake_calib, fake_weights, make_method

    from vllm_moe_lowrank.converters.calibration import dense_expert_fn, moe_output
    from vllm_moe_lowrank.converters.layer_fit import cast_layer, written_expert_fn

    calib, w = fake_calib(16, 192, T=1500, k=4), fake_weights(16, 192, 192)
    exact = moe_output(calib.x, calib.topk_ids, calib.topk_weights, dense_expert_fn(w.gate, w.up, w.down))
    errs = {}
    for mode in ("dense", "compressed"):
        calib.opts = replace(calib.opts, down_fit=mode)
        m = make_method("svd", 0.6, [])
        comp = m.compress_layer(0, w, calib)
        tensors = cast_layer(m.arch, "svd", 0, comp, torch.float32)
        y = moe_output(calib.x, calib.topk_ids, calib.topk_weights, written_expert_fn(m.arch, "svd", 0, comp, tensors))
        errs[mode] = float((y - exact).norm() / exact.norm())
    assert errs["compressed"] < 0.97 * errs["dense"]


def test_propagation_calibrates_each_layer_on_the_compressed_model(tmp_path):
    """Layer 0 sees the same inputs either way; layer 1's routing (tokens_per_expert in the report) is that of the
    hidden states produced by layer 0's experts as written, recomputed here independently."""
    from vllm_moe_lowrank.converters.arch import detect
    from vllm_moe_lowrank.converters.experts import load_expert_weights
    from vllm_moe_lowrank.converters.pipeline import ConvertOptions, _calibration_batches
    from vllm_moe_lowrank.converters.runner import LayerRunner

    dense, comp = tmp_path / "dense", tmp_path / "comp"
    small = ("--num-samples", "4", "--seq-len", "64", "--dtype", "float32")  # after CALIB: these win
    rep_d = convert(FIXTURE, dense, *small, "--propagate", "dense", ratio=0.6)
    rep_c = convert(FIXTURE, comp, *small, ratio=0.6)
    assert rep_c["calibration"]["propagate"] == "compressed" and rep_d["calibration"]["propagate"] == "dense"
    l0 = "model-layer-00000.safetensors"
    assert _files(dense)[l0] == _files(comp)[l0]
    assert rep_d["layers"]["1"]["tokens_per_expert"] != rep_c["layers"]["1"]["tokens_per_expert"]

    ckpt = Checkpoint(FIXTURE)
    arch = detect(ckpt.config, "config.json")
    opts = ConvertOptions(method="svd", ratio=0.6, checkpoint=FIXTURE, output=comp, calib_data=FIXTURE / "calib.txt",
                          num_samples=4, seq_len=64)
    runner = LayerRunner(ckpt, arch)
    hidden = [runner.embed(b) for b in _calibration_batches(opts, ckpt)]
    written = Checkpoint(comp)
    cfg = MoELowRankConfig.from_hf_config(written.config)

    def expert(e, x):
        g, u, d = (materialize_projection(cfg, 0, p, e, written.get).float() for p in PROJS)
        return (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T

    module, probe = runner.load_layer(0, load_expert_weights(ckpt, arch, 0))
    hidden = runner.rerun_layer(module, probe, expert, hidden)
    assert not probe.x  # a re-run records no calibration rows
    runner.release_layer(0)
    module, probe = runner.load_layer(1, load_expert_weights(ckpt, arch, 1))
    runner.forward_layer(module, hidden)
    assert probe.calibration(arch.num_experts).counts().tolist() == rep_c["layers"]["1"]["tokens_per_expert"]
