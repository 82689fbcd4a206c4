"""A stand-in for `vllm serve` used by tests/test_demo.py: a tiny OpenAI-compatible server on loopback.

Records its argv (FAKE_RECORD_DIR/vllm.argv), answers /health, /v1/models and /v1/chat/completions, and writes
FAKE_RECORD_DIR/vllm.stopped when stopped with SIGINT/SIGTERM. FAKE_VLLM_MODE=die: print an error and exit 1.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

RECORD = Path(os.environ["FAKE_RECORD_DIR"])
ANSWER = "len() returns the number of items in a container."


def option(argv: list[str], name: str, default: str) -> str:
    return argv[argv.index(name) + 1] if name in argv else default


def make_handler(model: str):
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            if self.path == "/health":
                self._send(200, {})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "vllm"}]})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            (RECORD / "chat.request.json").write_text(json.dumps(body))
            self._send(200, {
                "id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": ANSWER}}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14},
            })

        def log_message(self, *args):
            pass

    return Handler


def main() -> int:
    argv = sys.argv[1:]
    RECORD.mkdir(parents=True, exist_ok=True)
    (RECORD / "vllm.argv").write_text(json.dumps(argv))
    (RECORD / "vllm.env").write_text(json.dumps({"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE")}))
    if os.environ.get("FAKE_VLLM_MODE") == "die":
        print("fake vllm: RuntimeError: engine core failed to start", flush=True)
        return 1
    if not argv or argv[0] != "serve":
        print(f"fake vllm: only 'serve' is faked, got {argv}", file=sys.stderr)
        return 2

    def stop(signum, frame):
        (RECORD / "vllm.stopped").write_text(str(signum))
        raise SystemExit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    time.sleep(float(os.environ.get("FAKE_VLLM_STARTUP_S", "1")))  # nothing listens while "loading"
    server = ThreadingHTTPServer((option(argv, "--host", "127.0.0.1"), int(option(argv, "--port", "8000"))),
                                 make_handler(argv[1]))
    print("fake vllm: Application startup complete.", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
