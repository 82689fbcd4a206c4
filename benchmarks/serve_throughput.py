"""CPU serving throughput, dense vs compressed: `vllm serve` under 8 concurrent streaming clients (openai client).

    python benchmarks/serve_throughput.py [--methods svd rs-moe ...] [--ratio 0.4] [--streams 8] [--requests 4]
                                          [--max-tokens 128] [--compile]

For the dense fixture and for the fixture converted by each method at ``--ratio`` (benchmarks/.cache/ckpt/, made
if missing), one server at a time: start ``vllm serve`` (float32, max-model-len 512, enforce-eager unless
--compile), warm up with one short request per stream, then ``--streams`` client threads each send ``--requests``
completions one after another (distinct ~48-word prompts from eval.txt, ``max_tokens`` generated with
``ignore_eos``, temperature 0, streamed). Throughput = generated tokens / wall time of the whole load; also the mean
time to first token, and the mean per-request decode rate. Results: benchmarks/results/serve_throughput.json
(runs of models not served now are kept when the settings are the same).

On a shared machine the numbers move with the other jobs: the 1-minute load average around each run is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_cost import METHODS, checkpoint  # noqa: E402
from quality import CACHE, FIXTURE, RESULTS, machine  # noqa: E402

START_TIMEOUT = 600


def prompts(n: int, words: int = 48) -> list[str]:
    """``n`` distinct prompts of ``words`` words from the held-out text."""
    text = (FIXTURE / "eval.txt").read_text(encoding="utf-8").split()
    step = max(words, (len(text) - words) // max(n, 1))
    return [" ".join(text[i * step:i * step + words]) for i in range(n)]


def run_load(client, model: str, prompt_list: list[str], streams: int, requests: int, max_tokens: int) -> dict:
    """``streams`` threads × ``requests`` sequential streamed completions; aggregate throughput and latencies."""

    def one(prompt: str) -> dict:
        t0 = time.perf_counter()
        first, tokens = None, 0
        for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                               stream=True, stream_options={"include_usage": True},
                                               extra_body={"ignore_eos": True}):
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - t0
            if getattr(chunk, "usage", None):
                tokens = chunk.usage.completion_tokens
        return {"s": time.perf_counter() - t0, "ttft_s": first or 0.0, "tokens": tokens}

    def stream(i: int) -> list[dict]:
        return [one(prompt_list[(i * requests + j) % len(prompt_list)]) for j in range(requests)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        recs = [r for rs in pool.map(stream, range(streams)) for r in rs]
    elapsed = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in recs)
    return {"streams": streams, "requests": len(recs), "output_tokens": tokens, "elapsed_s": round(elapsed, 2),
            "tokens_per_s": round(tokens / elapsed, 2),
            "mean_ttft_s": round(sum(r["ttft_s"] for r in recs) / len(recs), 3),
            "mean_request_tokens_per_s": round(sum(r["tokens"] / r["s"] for r in recs) / len(recs), 2)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`vllm serve` in its own process group (so stopping it stops its engine and workers too)."""

    def __init__(self, model: Path, name: str, log: Path, compile_: bool = False, dtype: str = "float32"):
        self.port, self.name, self.log = free_port(), name, log
        vllm_bin = Path(sys.executable).with_name("vllm")
        cmd = [str(vllm_bin), "serve", str(model), "--dtype", dtype, "--max-model-len", "512", "--seed", "0",
               "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", name,
               *([] if compile_ else ["--enforce-eager"])]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        self.t0 = time.time()
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self) -> float:
        """Seconds from launch until deploy/healthcheck.py --wait (the images' startup probe) reports it ready."""
        probe = Path(__file__).resolve().parents[1] / "deploy" / "healthcheck.py"
        r = subprocess.run([sys.executable, str(probe), "--base-url", f"http://127.0.0.1:{self.port}", "--wait",
                            str(START_TIMEOUT), "--pid", str(self.proc.pid)], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"vllm serve not ready (healthcheck exit {r.returncode}: {r.stdout}{r.stderr}):\n"
                               f"{self.log.read_text()[-4000:]}")
        return time.time() - self.t0

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def measure(model: Path, name: str, a) -> dict:
    from openai import OpenAI

    log = CACHE / "serve" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    server = Server(model, name, log, a.compile)
    try:
        startup = server.wait_ready()
        client = OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", timeout=600)
        plist = prompts(a.streams * a.requests)
        run_load(client, name, plist[::-1], a.streams, 1, 8)  # warm-up: every stream once, short
        load_before = os.getloadavg()[0]
        result = run_load(client, name, plist, a.streams, a.requests, a.max_tokens)
        result.update(startup_s=round(startup, 1), loadavg_1m_before=round(load_before, 2),
                      loadavg_1m_after=round(os.getloadavg()[0], 2))
        return result
    finally:
        server.stop()


def table(data: dict) -> str:
    s = data["settings"]
    lines = [f"vLLM {data['vllm']} CPU serving, {s['streams']} concurrent streams × {s['requests']} requests × "
             f"{s['max_tokens']} tokens, {'compiled' if s['compile'] else 'enforce-eager'}, float32 "
             f"({data['machine']})", "",
             "| model | achieved ratio | tokens/s | vs dense | mean TTFT s | per-request tok/s | startup s "
             "| load avg |",
             "|---|---|---|---|---|---|---|---|"]
    dense = next((r["tokens_per_s"] for r in data["runs"] if r["model"] == "dense"), None)
    for r in data["runs"]:
        rel = f"{r['tokens_per_s'] / dense:.2f}×" if dense else "-"
        lines.append(f"| {r['model']} | {r.get('achieved_ratio', 0)} | {r['tokens_per_s']:.1f} | {rel} | "
                     f"{r['mean_ttft_s']:.2f} | {r['mean_request_tokens_per_s']:.1f} | {r['startup_s']} | "
                     f"{r['loadavg_1m_before']}–{r['loadavg_1m_after']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="*", default=METHODS, help="compressed models to serve beside the dense one")
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="sequential requests per stream")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--compile", action="store_true", help="serve in compiled mode (default: --enforce-eager)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense model (keep its previous run)")
    ap.add_argument("--out", type=Path, default=RESULTS / "serve_throughput.json")
    a = ap.parse_args()
    import vllm

    settings = {"streams": a.streams, "requests": a.requests, "max_tokens": a.max_tokens, "prompt_words": 48,
                "compile": a.compile, "dtype": "float32", "max_model_len": 512}
    old = json.loads(a.out.read_text()) if a.out.is_file() else {}
    kept = old.get("runs", []) if old.get("settings") == settings else []  # earlier runs with the same settings
    runs = []
    if not a.no_dense:
        runs.append({"model": "dense", "method": "dense", "achieved_ratio": 0.0, **measure(FIXTURE, "dense", a)})
        print(json.dumps(runs[-1]), flush=True)
    for m in a.methods:
        ckpt, _ = checkpoint(m, a.ratio)
        report = json.loads((ckpt / "moe_lowrank_report.json").read_text())
        runs.append({"model": f"{m} {a.ratio}", "method": m, "ratio": a.ratio,
                     "achieved_ratio": round(report["achieved_ratio"], 4), **measure(ckpt, m, a)})
        print(json.dumps(runs[-1]), flush=True)
    now = {r["model"] for r in runs}
    order = ["dense", *METHODS]
    runs = sorted(runs + [r for r in kept if r["model"] not in now], key=lambda r: order.index(r["method"]))
    data = {"machine": machine(), "vllm": vllm.__version__, "settings": settings, "runs": runs}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(data, indent=2) + "\n")
    print(table(data))


if __name__ == "__main__":
    main()
