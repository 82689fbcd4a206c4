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
from vllm_moe_lowrank.format import PROJS, MoELowRankConfig, materialize_projection

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
