"""scripts/demo.sh, chat_query.py, show_report.py and deploy/healthcheck.py against fake moe-convert and vllm.

The fakes (tests/fakes/) stand in for the converter and `vllm serve`, so these tests check the script's
orchestration (arguments, readiness wait, the openai query, stopping the server) in seconds, without vLLM.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKES = ROOT / "tests" / "fakes"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_demo(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    record = tmp_path / "record"
    record.mkdir(exist_ok=True)
    full_env = {
        **os.environ,
        "PATH": f"{FAKES / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "FAKE_PYTHON": sys.executable,
        "FAKE_RECORD_DIR": str(record),
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "out" / "fixture-svd"),
        "SERVE_TIMEOUT": "30",
        **env,
    }
    full_env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    return subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], env=full_env, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)


def test_demo_converts_serves_asks_and_stops(tmp_path):
    pytest.importorskip("openai", reason="scripts/chat_query.py needs the openai client (the dev extra)")
    port = free_port()
    proc = run_demo(tmp_path, PORT=str(port), METHOD="mobe", RATIO="0.25")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    record = tmp_path / "record"

    convert = json.loads((record / "convert.argv").read_text())
    src = "fixtures/qwen3-moe-pydocs"
    assert convert == ["--method", "mobe", "--ratio", "0.25", src, str(tmp_path / "out" / "fixture-svd"),
                       "--calib-data", f"{src}/calib.txt", "--overwrite"]
    assert "achieved_ratio: 0.30125" in out and "target_ratio: 0.25" in out

    serve = json.loads((record / "vllm.argv").read_text())
    assert serve == ["serve", str(tmp_path / "out" / "fixture-svd"), "--quantization", "moe_lowrank",
                     "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
                     "--host", "127.0.0.1", "--port", str(port)]
    assert json.loads((record / "vllm.env").read_text()) == {"VLLM_CPU_KVCACHE_SPACE": "1"}

    assert "answer:   len() returns the number of items" in out
    request = json.loads((record / "chat.request.json").read_text())
    assert request["model"] == serve[1] and request["temperature"] == 0.0
    assert (record / "vllm.stopped").read_text() == "2"  # SIGINT from the EXIT trap
    assert not port_open(port)


def test_demo_dies_clearly_when_the_server_dies(tmp_path):
    start = time.monotonic()
    proc = run_demo(tmp_path, FAKE_VLLM_MODE="die")
    assert proc.returncode != 0
    assert time.monotonic() - start < 60  # noticed the death, did not wait for the timeout
    assert "exited before it became ready" in proc.stderr
    assert "engine core failed to start" in proc.stderr  # the log tail is shown
    assert "did not become ready" in proc.stderr


def test_demo_explains_missing_tools(tmp_path):
    env = {**os.environ, "PATH": "/usr/bin:/bin", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 1
    assert "'moe-convert' not found on PATH: run 'make demo'" in proc.stderr


def test_healthcheck_startup_then_liveness(tmp_path):
    sys.path.insert(0, str(ROOT / "deploy"))
    try:
        import healthcheck
    finally:
        sys.path.pop(0)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    state = tmp_path / "started"
    ok, msg = healthcheck.probe(base, state, timeout=1)
    assert not ok and "/v1/models: no answer" in msg and not state.exists()

    record = tmp_path / "record"
    env = {**os.environ, "FAKE_RECORD_DIR": str(record), "FAKE_VLLM_STARTUP_S": "0"}
    server = subprocess.Popen([sys.executable, str(FAKES / "fake_vllm.py"), "serve", "m1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL)
    try:
        assert healthcheck.wait(base, 20, server.pid, interval=0.2) == 0
        ok, msg = healthcheck.probe(base, state)
        assert ok and "lists m1" in msg and state.exists()  # startup probe passed, recorded
        ok, msg = healthcheck.probe(base, state)
        assert ok and msg == "/health: 200"  # later probes are liveness probes
    finally:
        server.terminate()
        server.wait(10)
    assert healthcheck.wait(base, 5, server.pid, interval=0.2) == 3
    ok, msg = healthcheck.probe(base, state, timeout=1)
    assert not ok and "/health: no answer" in msg


def test_show_report_prints_headline_numbers(tmp_path):
    (tmp_path / "moe_lowrank_report.json").write_text(json.dumps(
        {"zeta": "z", "achieved_ratio": 0.2999999, "method": "svd", "layers": [1, 2, 3]}))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "show_report.py"), str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()[1:]
    assert lines == ["  method: svd", "  achieved_ratio: 0.3", "  zeta: z", "  also: layers (3 entries)"]
    missing = subprocess.run([sys.executable, str(ROOT / "scripts" / "show_report.py"), str(tmp_path / "nope")],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "cannot read" in missing.stderr
