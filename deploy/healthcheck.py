"""Startup and liveness probe for a `vllm serve` container (standard library only; baked into both images).

    healthcheck.py [--base-url URL] [--state-file PATH]          one probe, for a Docker/Compose healthcheck
    healthcheck.py [--base-url URL] --wait SECONDS [--pid PID]   poll until ready (scripts/demo.sh)

Until the server has once listed a model on /v1/models (the startup probe: the weights are loaded and the API is
up), a probe checks /v1/models; once it has, the state file records that and later probes check /health only
(the liveness probe). Exit codes: 0 healthy, 1 not (yet) healthy, 3 the watched --pid exited, 4 --wait timed out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_STATE = "/tmp/moe-lowrank-serve-started"


# The probed server is our own: never route the request through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc).encode()


def models_ready(base_url: str, timeout: float = 5.0) -> tuple[bool, str]:
    """True once /v1/models answers 200 with at least one model."""
    status, body = _get(f"{base_url}/v1/models", timeout)
    if status != 200:
        return False, f"/v1/models: {'no answer (' + body.decode(errors='replace') + ')' if status == 0 else status}"
    try:
        ids = [m["id"] for m in json.loads(body)["data"]]
    except (ValueError, KeyError, TypeError):
        return False, "/v1/models: answer is not an OpenAI model list"
    return (True, f"/v1/models lists {', '.join(ids)}") if ids else (False, "/v1/models: no model loaded yet")


def healthy(base_url: str, timeout: float = 5.0) -> tuple[bool, str]:
    status, body = _get(f"{base_url}/health", timeout)
    if status == 200:
        return True, "/health: 200"
    return False, f"/health: {'no answer (' + body.decode(errors='replace') + ')' if status == 0 else status}"


def probe(base_url: str, state_file: Path | None, timeout: float = 5.0) -> tuple[bool, str]:
    """One startup-then-liveness probe; see the module docstring."""
    if state_file is not None and state_file.exists():
        return healthy(base_url, timeout)
    ok, msg = models_ready(base_url, timeout)
    if ok and state_file is not None:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(msg + "\n", encoding="utf-8")
    return ok, msg


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) still answers kill(0)
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def wait(base_url: str, seconds: float, pid: int | None, interval: float = 2.0) -> int:
    """Poll until /v1/models lists a model and /health is 200; 3 if ``pid`` exits first, 4 on timeout."""
    deadline = time.monotonic() + seconds
    msg = "not probed yet"
    while time.monotonic() < deadline:
        if pid is not None and not pid_alive(pid):
            print(f"healthcheck: server process {pid} exited before it became ready", file=sys.stderr)
            return 3
        ok, msg = models_ready(base_url)
        if ok:
            ok, msg = healthy(base_url)
        if ok:
            print(f"healthcheck: ready ({msg})")
            return 0
        time.sleep(interval)
    print(f"healthcheck: not ready after {seconds:.0f} s (last: {msg})", file=sys.stderr)
    return 4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default=os.environ.get("MOE_LOWRANK_BASE_URL", DEFAULT_URL))
    parser.add_argument("--state-file", default=DEFAULT_STATE, help="'' to always run the startup probe")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per HTTP request")
    parser.add_argument("--wait", type=float, metavar="SECONDS", help="poll until ready instead of probing once")
    parser.add_argument("--pid", type=int, help="with --wait: give up when this process exits")
    args = parser.parse_args(argv)
    base_url = args.base_url.rstrip("/")
    if args.wait is not None:
        return wait(base_url, args.wait, args.pid)
    ok, msg = probe(base_url, Path(args.state_file) if args.state_file else None, args.timeout)
    print(f"healthcheck: {'ok' if ok else 'not ready'} ({msg})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
