"""Data safety (issue 16): the converter deletes only what it wrote, locks its output, publishes into mount points
and symlinks, refuses bad input with one line naming the file, tensor, flag or device; moe-eval stays local.

Conversions here are data-free (``svd -o whiten=false``) unless calibration is the point.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from model_factory import FIXTURE, split_into_shards
from safetensors.torch import load_file, save_file

from vllm_moe_lowrank.converters import cli
from vllm_moe_lowrank.converters.errors import OutputError
from vllm_moe_lowrank.evaluation import cli as eval_cli

DATA_FREE = ["--method", "svd", "--ratio", "0.3", "-o", "whiten=false"]
CALIB = ["--method", "svd", "--ratio", "0.3", "--num-samples", "8", "--seq-len", "64"]
REPORT = "moe_lowrank_report.json"


def run(capsys, *args: str, method: list[str] = DATA_FREE) -> tuple[int, str]:
    try:
        cli.main([*method, *map(str, args)])
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def fails(capsys, *args: str, method: list[str] = DATA_FREE) -> str:
    """Exit status 2 and one line ``moe-convert: error: ...`` (the progress bar aside)."""
    code, err = run(capsys, *args, method=method)
    lines = [line for line in err.splitlines() if line.startswith("moe-convert: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def weights(folder: Path) -> dict[str, str]:
    """Hashes of what a server loads (the report holds timings and the command)."""
    return {k: v for k, v in hashes(folder).items() if k != REPORT}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    cli.main([*DATA_FREE, str(FIXTURE), str(out)])
    return out


def no_leftovers(folder: Path) -> None:
    stray = [p.name for p in folder.parent.iterdir() if ".moe-convert" in p.name or ".export-tmp" in p.name]
    stray += [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert not stray, stray


# ----- the converter deletes only what it wrote --------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["same", "dotted", "symlink"])
def test_output_equal_to_input_is_refused_and_nothing_is_deleted(tmp_path, capsys, spelling):
    src = shutil.copytree(FIXTURE, tmp_path / "m")
    before = hashes(src)
    out = {"same": src, "dotted": src / ".." / "m", "symlink": tmp_path / "link"}[spelling]
    if spelling == "symlink":
        out.symlink_to(src)
    err = fails(capsys, src, out, "--overwrite")
    assert "is the input checkpoint" in err
    assert hashes(src) == before


def test_output_containing_or_inside_input_is_refused(tmp_path, capsys):
    parent = tmp_path / "parent"
    src = shutil.copytree(FIXTURE, parent / "m")
    (parent / "unrelated.txt").write_text("keep me")
    (parent / REPORT).write_text("{}")  # even a folder that looks like an old output
    before = hashes(parent)
    assert "contains the input checkpoint" in fails(capsys, src, parent, "--overwrite")
    assert "lies inside the input checkpoint" in fails(capsys, src, src / "out", "--overwrite")
    assert hashes(parent) == before


def test_export_dense_equal_to_output_is_refused_before_any_work(tmp_path, capsys, reference):
    out = shutil.copytree(reference, tmp_path / "out")
    before = hashes(out)
    t0 = time.time()
    for extra in ([], ["--overwrite"]):
        err = fails(capsys, FIXTURE, out, "--export-dense", out, *extra)
        assert "is --export-dense" in err and str(out) in err
    assert "contains --export-dense" in fails(capsys, FIXTURE, out, "--export-dense", out / "dense", "--overwrite")
    assert time.time() - t0 < 10  # refused up front: no conversion ran
    assert hashes(out) == before
    assert not (tmp_path / "out.moe-convert-tmp").exists()


def test_overwrite_replaces_only_a_previous_output(tmp_path, capsys, reference):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    err = fails(capsys, FIXTURE, foreign, "--overwrite")
    assert "not written by moe-convert" in err and str(foreign) in err
    assert (foreign / "notes.txt").read_text() == "precious"

    old = shutil.copytree(reference, tmp_path / "old")
    (old / "model-layer-00099.safetensors").write_bytes(b"from a larger old model")  # a file the new run lacks
    assert "--overwrite" in fails(capsys, FIXTURE, old)
    assert run(capsys, FIXTURE, old, "--overwrite")[0] == 0
    assert weights(old) == weights(reference)
    no_leftovers(old)


# ----- the lock ----------------------------------------------------------------------------------------------
def test_second_converter_on_the_same_output_fails_at_once(tmp_path, capsys):
    out = tmp_path / "out"
    first = subprocess.Popen(
        [sys.executable, "-m", "vllm_moe_lowrank.converters.cli", *DATA_FREE, str(FIXTURE), str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "out.moe-convert-tmp" / ".moe-convert.lock"
    deadline = time.time() + 120
    while not lock.is_file() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert lock.is_file(), first.stderr.read() if first.poll() is not None else "no lock file"
    try:
        for extra in ([], ["--resume"], ["--overwrite"]):
            t0 = time.time()
            err = fails(capsys, FIXTURE, out, *extra)
            assert time.time() - t0 < 5
            assert f"pid {first.pid}" in err and "another moe-convert" in err
        assert first.poll() is None  # the refusals above were against a live run
    finally:
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert json.loads((out / REPORT).read_text())["method"] == "svd"
    no_leftovers(out)


# ----- publishing into mount points and symlinks -----------------------------------------------------------
def test_symlinked_empty_output(tmp_path, capsys, reference):
    target = tmp_path / "volume"
    target.mkdir()
    link = tmp_path / "out"
    link.symlink_to(target)
    assert run(capsys, FIXTURE, link)[0] == 0
    assert link.is_symlink() and weights(target) == weights(reference)
    no_leftovers(link)


def _mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"mount not permitted here: {r.stderr.strip()}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=True)  # lazy: never leaves a mount behind


def test_bind_mounted_empty_output(tmp_path, capsys, reference):
    volume, mnt = tmp_path / "volume", tmp_path / "mnt"
    volume.mkdir()
    mnt.mkdir()
    _mount("--bind", str(volume), str(mnt))
    try:
        assert run(capsys, FIXTURE, mnt)[0] == 0
        assert weights(mnt) == weights(reference)
        no_leftovers(mnt)
    finally:
        _umount(mnt)
    assert weights(volume) == weights(reference)


@pytest.mark.parametrize("existing", [False, True])
def test_failed_publish_is_resumable(tmp_path, capsys, reference, monkeypatch, existing):
    """A failure while moving the finished files leaves the temporary folder and its progress; --resume then
    completes the same output (not a false 'different settings' refusal)."""
    from vllm_moe_lowrank.converters import output

    out = tmp_path / "out"
    if existing:
        out.mkdir()  # an empty folder (a volume): files are moved one by one
    real_move, real_replace, calls = shutil.move, os.replace, []

    def failing_move(src, dst):
        calls.append(src)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_move(src, dst)

    def failing_replace(src, dst):
        if str(src).endswith(output.CONVERT_TMP):
            raise OSError(errno.EBUSY, "Device or resource busy", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(output.shutil, "move", failing_move)
    monkeypatch.setattr(output.os, "replace", failing_replace)
    err = fails(capsys, FIXTURE, out)
    assert "--resume" in err and ("No space left" in err or "busy" in err)
    monkeypatch.undo()
    assert run(capsys, FIXTURE, out, "--resume")[0] == 0
    assert weights(out) == weights(reference)
    no_leftovers(out)


# ----- bad input: one line naming the file, tensor, flag or device ----------------------------------------
@pytest.mark.parametrize("name,content,where", [
    ("garbage.txt", b"def f():\n    pass\n" + bytes(range(128, 256)) * 40, "garbage.txt:3: not UTF-8"),
    ("zeros.txt", b"print(1)\n" + b"\x00" * 5000, "zeros.txt:2: not text"),
    ("null.jsonl", b'{"text": "def f(): pass"}\n{"text": null}\n', "null.jsonl:2: 'text' is null"),
    ("number.jsonl", b'{"text": "x = 1"}\n\n{"text": 42}\n', "number.jsonl:3: 'text' is of type int"),
    ("binary.jsonl", b'{"text": "x"}\n' + bytes(range(128, 256)) * 40, "binary.jsonl:2: not UTF-8"),
])
def test_calibration_text_is_validated(tmp_path, capsys, name, content, where):
    (tmp_path / name).write_bytes(content)
    err = fails(capsys, FIXTURE, tmp_path / "out", "--calib-data", tmp_path / name, method=CALIB)
    assert where in err
    assert not (tmp_path / "out.moe-convert-tmp").exists()


def test_read_only_output_filesystem(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    _mount("-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro))
    try:
        err = fails(capsys, FIXTURE, ro / "out")
        assert "Read-only file system" in err and str(ro / "out") in err
    finally:
        _umount(ro)


def test_disk_full_is_resumable(tmp_path, capsys, reference):
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount("-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk))
    try:
        err = fails(capsys, FIXTURE, disk / "out")
        assert "No space left on device" in err and "--resume" in err and ".safetensors" in err
        done = json.loads((disk / "out.moe-convert-tmp" / ".state" / "progress.json").read_text())["layers"]
        assert done  # the layers written before the disk filled are kept
        with pytest.raises(OutputError, match=r"hidden\.pt\.tmp: cannot write \(.*MB free"):  # torch.save
            from vllm_moe_lowrank.converters.pipeline import _State

            _State(disk / "out.moe-convert-tmp").save_hidden([torch.zeros(1 << 21)], 1)
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        assert run(capsys, FIXTURE, disk / "out", "--resume")[0] == 0
        assert weights(disk / "out") == weights(reference)
    finally:
        _umount(disk)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_expert_weight_names_the_tensor(tmp_path, capsys, value):
    src = shutil.copytree(FIXTURE, tmp_path / "m")
    tensors = load_file(src / "model.safetensors")
    name = "model.layers.2.mlp.experts.7.down_proj.weight"
    tensors[name][3, 5] = value
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    err = fails(capsys, src, tmp_path / "out")
    assert repr(name) in err and "NaN/Inf" in err
    progress = json.loads((tmp_path / "out.moe-convert-tmp" / ".state" / "progress.json").read_text())
    assert sorted(progress["layers"]) == ["0", "1"]  # refused before layer 2 is fitted; the rest is resumable


@pytest.mark.parametrize("experts,message", [(8, "has weights for expert 15 but config.json says 8 experts"),
                                             (20, "lacks 12 routed-expert tensor(s)")])
def test_expert_count_disagreeing_with_the_weights(tmp_path, capsys, experts, message):
    src = shutil.copytree(FIXTURE, tmp_path / "m")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update({k: experts for k in ("num_experts", "num_local_experts") if k in cfg})
    (src / "config.json").write_text(json.dumps(cfg))
    err = fails(capsys, src, tmp_path / "out")
    assert message in err
    assert not (tmp_path / "out.moe-convert-tmp").exists()  # found from the headers, before any work


def test_unknown_device(tmp_path, capsys):
    err = fails(capsys, FIXTURE, tmp_path / "out", "--device", "banana")
    assert "--device" in err and "banana" in err


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_index_entries_outside_the_checkpoint_are_refused(tmp_path, capsys, target):
    src = split_into_shards(FIXTURE, tmp_path / "m")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name, shard = next(iter(index["weight_map"].items()))
    shutil.copy(src / shard, tmp_path / "outside.safetensors")  # a valid shard: read, it would be accepted
    index["weight_map"] = {n: (target if f == shard else f) for n, f in index["weight_map"].items()}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    err = fails(capsys, src, tmp_path / "out")
    assert "not a file in the checkpoint folder" in err and repr(target) in err


@pytest.mark.parametrize("method,option", [("svd", "damp=-5"), ("svd", "shrink=-1"), ("moe-svd", "p_threshold=2"),
                                           ("moe-svd", "k_u=0"), ("mobe", "damp=2"), ("rs-moe", "gamma=-1"),
                                           ("rs-moe", "w_mean=-1"), ("rfid-moe", "shrink=-1")])
def test_method_options_are_range_checked(tmp_path, capsys, method, option):
    err = fails(capsys, FIXTURE, tmp_path / "out", "-o", option, method=["--method", method, "--ratio", "0.3"])
    assert option.split("=")[0] in err and f"--method {method}" in err


# ----- moe-eval ----------------------------------------------------------------------------------------------
def eval_fails(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        eval_cli.main(list(map(str, args)))
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_moe_eval_missing_checkpoint_is_an_error_not_a_hub_id(tmp_path, capsys):
    t0 = time.time()
    err = eval_fails(capsys, "ppl", tmp_path / "no-such-model", "--text", FIXTURE / "eval.txt")
    assert "no-such-model" in err and "does not exist" in err and "Traceback" not in err
    err = eval_fails(capsys, "layer-error", FIXTURE, "--reference", "Qwen/Qwen3-30B-A3B", "--text",
                     FIXTURE / "eval.txt")
    assert "--reference Qwen/Qwen3-30B-A3B" in err
    assert time.time() - t0 < 5


@pytest.mark.parametrize("flag", ["--window", "--max-tokens"])
def test_moe_eval_non_positive_window(capsys, flag):
    err = eval_fails(capsys, "ppl", FIXTURE, "--text", FIXTURE / "eval.txt", flag, "0")
    assert flag in err and "positive" in err
