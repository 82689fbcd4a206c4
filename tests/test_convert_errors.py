"""Every bad input gets a clear error naming the file, tensor or flag (exit status 2, nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from model_factory import FIXTURE, split_into_shards

from vllm_moe_lowrank.converters import cli

CALIB = ["--calib-data", str(FIXTURE / "calib.txt"), "--num-samples", "8", "--seq-len", "64"]


def fails(capsys, *args: str, calib: list[str] = CALIB) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main([*args, *calib])
    assert exc.value.code == 2
    return capsys.readouterr().err


def copy_fixture(dst: Path) -> Path:
    shutil.copytree(FIXTURE, dst)
    return dst


def test_not_an_moe_model(tmp_path, capsys):
    src = copy_fixture(tmp_path / "llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    cfg.pop("num_local_experts")
    (src / "config.json").write_text(json.dumps(cfg))
    err = fails(capsys, "--method", "svd", "--ratio", "0.3", str(src), str(tmp_path / "out"))
    assert "not an MoE model" in err and "llama" in err and "config.json" in err


def test_unsupported_moe_architecture(tmp_path, capsys):
    """An MoE family transformers implements but no adapter covers (refused families: tests/test_families.py)."""
    src = copy_fixture(tmp_path / "hunyuan")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "hunyuan_v1_moe"
    (src / "config.json").write_text(json.dumps(cfg))
    err = fails(capsys, "--method", "svd", "--ratio", "0.3", str(src), str(tmp_path / "out"))
    assert "without an adapter" in err and "'hunyuan_v1_moe'" in err and "qwen3_moe" in err


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.2", "nan"])
def test_ratio_outside_open_interval(tmp_path, capsys, ratio):
    err = fails(capsys, "--method", "svd", "--ratio", ratio, str(FIXTURE), str(tmp_path / "out"))
    assert "--ratio" in err and "(0, 1)" in err
    assert not (tmp_path / "out").exists()


def test_ratio_infeasible_for_method(tmp_path, capsys):
    err = fails(capsys, "--method", "svd", "--ratio", "0.995", str(FIXTURE), str(tmp_path / "out"))
    assert "infeasible" in err and "largest feasible ratio is 0.9896" in err


def test_missing_shard(tmp_path, capsys):
    src = split_into_shards(FIXTURE, tmp_path / "sharded")
    (src / "model-00002.safetensors").unlink()
    err = fails(capsys, "--method", "svd", "--ratio", "0.3", str(src), str(tmp_path / "out"))
    assert "missing" in err and "model-00002.safetensors" in err


def test_truncated_shard(tmp_path, capsys):
    src = split_into_shards(FIXTURE, tmp_path / "sharded")
    shard = src / "model-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    err = fails(capsys, "--method", "svd", "--ratio", "0.3", str(src), str(tmp_path / "out"))
    assert "model-00003.safetensors" in err and "truncated" in err


def test_garbage_shard_header(tmp_path, capsys):
    src = copy_fixture(tmp_path / "bad")
    data = bytearray((src / "model.safetensors").read_bytes())
    data[8:40] = b"\xff" * 32
    (src / "model.safetensors").write_bytes(bytes(data))
    err = fails(capsys, "--method", "svd", "--ratio", "0.3", str(src), str(tmp_path / "out"))
    assert "model.safetensors" in err and "corrupt" in err


def test_missing_expert_tensor(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    src = copy_fixture(tmp_path / "incomplete")
    t = load_file(src / "model.safetensors")
    del t["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(t, src / "model.safetensors")
    err = fails(capsys, "--method", "svd", "--ratio", "0.3", str(src), str(tmp_path / "out"))
    assert "model.layers.2.mlp.experts.5.up_proj.weight" in err


def test_non_empty_output_is_refused(tmp_path, capsys):
    """A folder moe-convert did not write is never replaced, not even with --overwrite (tests/test_safety.py)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    err = fails(capsys, "--method", "svd", "--ratio", "0.3", str(FIXTURE), str(out))
    assert str(out) in err and "not empty" in err and "not written by moe-convert" in err
    assert (out / "keep.txt").read_text() == "precious"


def test_interrupted_run_needs_resume_or_overwrite(tmp_path, capsys):
    (tmp_path / "out.moe-convert-tmp").mkdir()
    err = fails(capsys, "--method", "svd", "--ratio", "0.3", str(FIXTURE), str(tmp_path / "out"))
    assert "--resume" in err and "--overwrite" in err


def test_empty_calibration_data(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    err = fails(capsys, "--method", "svd", "--ratio", "0.3", str(FIXTURE), str(tmp_path / "out"),
                calib=["--calib-data", str(empty)])
    assert "empty.txt" in err and "no text" in err


def test_too_short_calibration_data(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("def f(x):\n    return x\n" * 20)
    err = fails(capsys, "--method", "svd", "--ratio", "0.3", str(FIXTURE), str(tmp_path / "out"),
                calib=["--calib-data", str(short), "--num-samples", "64", "--seq-len", "256"])
    assert "short.txt" in err and "fewer than --num-samples 64 × --seq-len 256" in err


def test_missing_calibration_data(tmp_path, capsys):
    err = fails(capsys, "--method", "svd", "--ratio", "0.3", str(FIXTURE), str(tmp_path / "out"), calib=[])
    assert "--calib-data" in err


def test_calibration_formats(tmp_path):
    """jsonl with a text field and parquet give the same windows as the equivalent txt."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from vllm_moe_lowrank.converters.calib_data import read_documents, token_windows

    docs = ["first document about dict.get", "second one: the with statement", "third, on asyncio"]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"content": d}) for d in docs))
    pq.write_table(pa.table({"content": docs}), tmp_path / "c.parquet")
    tok = AutoTokenizer.from_pretrained(FIXTURE)
    a = token_windows(read_documents(tmp_path / "c.jsonl", "content"), tok, 2, 8, 0)
    b = token_windows(read_documents(tmp_path / "c.parquet", "content"), tok, 2, 8, 0)
    assert a.shape == (2, 8) and (a == b).all()
    from vllm_moe_lowrank.converters.errors import CalibDataError

    with pytest.raises(CalibDataError, match="no 'text' field"):
        read_documents(tmp_path / "c.jsonl")
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(CalibDataError, match="unknown format"):
        read_documents(tmp_path / "x.csv")


def test_unknown_method_option(tmp_path, capsys):
    err = fails(capsys, "--method", "svd", "--ratio", "0.3", str(FIXTURE), str(tmp_path / "out"), "-o", "rank=3")
    assert "rank" in err and "Valid options: whiten" in err


@pytest.mark.parametrize("quant_method", ["mxfp4", "gptq", "moe_lowrank"])
def test_already_quantized_checkpoint(tmp_path, capsys, quant_method):
    """Refused up front naming the format (FP8 is read: tests/test_fp8_input.py)."""
    src = copy_fixture(tmp_path / quant_method)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": quant_method}
    (src / "config.json").write_text(json.dumps(cfg))
    err = fails(capsys, "--method", "svd", "--ratio", "0.3", str(src), str(tmp_path / "out"))
    assert quant_method in err and "config.json" in err and len(err.strip().splitlines()) == 1
    assert ("gpt-oss" in err) == (quant_method == "mxfp4")
