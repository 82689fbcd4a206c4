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

``--synth qwen3-30b`` serves a model at real expert shapes instead (issue 19): a synthetic Qwen3-30B-A3B-shaped
checkpoint (2 decoder layers, hidden 2048, 128 experts of 768, top-8, 32 heads / 4 KV heads of 128, random bf16
weights, the fixture's 4096-token vocabulary; built by convert_memory.build into benchmarks/.cache/synth-qwen3-30b/)
and, per method, the same checkpoint with its experts in that method's format at ``--ratio`` (the converters'
shapes, random factors: see ``synth_checkpoint``), served in bfloat16 at each of ``--stream-counts`` (default 1
and 8), here with ``--requests`` 2 × ``--max-tokens`` 64:

    python benchmarks/serve_throughput.py --synth qwen3-30b --methods svd rs-moe --ratio 0.3 --requests 2 \
        --max-tokens 64      -> benchmarks/results/serve_qwen3_30b_synth.json

``--synth mixtral-8x7b``: one Mixtral-8x7B-shaped decoder layer (hidden 4096, 8 experts of 14336, top-2, 32 heads /
8 KV heads of 128; 2.8 GB of bf16 experts) in the same Qwen3-MoE container, served the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_cost import METHODS, checkpoint  # noqa: E402
from quality import CACHE, FIXTURE, RESULTS, machine  # noqa: E402

START_TIMEOUT = 600
SYNTH = {"qwen3-30b": dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                           num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144),
         "mixtral-8x7b": dict(hidden_size=4096, moe_intermediate_size=14336, num_experts=8, num_experts_per_tok=2,
                              num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=14336)}
SYNTH_LAYERS = {"qwen3-30b": 2, "mixtral-8x7b": 1}  # decoder layers (one Mixtral layer is 2.8 GB of experts)


def synth_checkpoint(name: str, method: str, ratio: float) -> tuple[Path, float]:
    """(path, achieved ratio) of the synthetic model ``name`` (method "dense") or its compressed version; built if
    missing. Compressed: the layout ``method`` writes at ``ratio`` (benchmarks/kernels.py ``method_spec``: the
    converters' rank/unit/group choices at these shapes) with random factors, the rest of the checkpoint copied;
    serving speed depends on shapes only, and converting 2.5 GB of random experts on a shared 2-core machine
    takes longer than the whole benchmark."""
    from convert_memory import build
    from kernels import achieved_ratio, method_spec
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from vllm_moe_lowrank.converters.arch import detect
    from vllm_moe_lowrank.converters.verify import verify_checkpoint
    from vllm_moe_lowrank.format import FORMAT_VERSION, MoELowRankConfig

    root = CACHE / f"synth-{name}"
    src = root / "dense"
    if not (src / "config.json").is_file():
        build(src, SYNTH_LAYERS[name], **SYNTH[name])
    if method == "dense":
        return src, 0.0
    out = root / f"{method}-{ratio}"
    config = json.loads((src / "config.json").read_text())
    arch = detect(config)
    E, n, m = config["num_experts"], config["hidden_size"], config["moe_intermediate_size"]
    spec = method_spec(method, E, n, m, ratio)
    cfg = MoELowRankConfig(format_version=FORMAT_VERSION, method=method, num_experts=E, hidden_size=n,
                           intermediate_size=m, moe_prefix=arch.moe_prefix, expert_names=arch.expert_names,
                           moe_layers=list(arch.moe_layers), layers={l: spec for l in arch.moe_layers})
    if not (out / "config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(0)
        for f in sorted(src.glob("*.safetensors")):
            tensors = {k: v for k, v in load_file(f).items() if ".experts." not in k}
            for layer in arch.moe_layers:
                if f"model.layers.{layer}.mlp.gate.weight" not in tensors:
                    continue  # the layer lives in another shard
                for tname, ts in cfg.tensor_specs(layer).items():
                    tensors[tname] = _random_factor(cfg, layer, ts, g)
            save_file(tensors, out / f.name, metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {}}
        for f in sorted(out.glob("*.safetensors")):
            with safe_open(f, "pt") as sf:
                index["weight_map"].update({k: f.name for k in sf.keys()})
        (out / "model.safetensors.index.json").write_text(json.dumps(index))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(src / f, out / f)
        (out / "config.json").write_text(json.dumps({**config, "quantization_config": cfg.model_dump(mode="json")},
                                                    indent=2))
        verify_checkpoint(out)
    return out, achieved_ratio(MoELowRankConfig(**{**cfg.model_dump(), "moe_layers": [0], "layers": {0: spec}}))


def _random_factor(cfg, layer: int, ts, g) -> torch.Tensor:
    """A format-valid random tensor (indices in range, mixes on the simplex, factors scaled by 1/sqrt(fan-in))."""
    if ts.suffix == "res_bucket":
        return torch.randint(0, cfg.layers[layer].proj(ts.proj).residual.width, ts.shape, generator=g,
                             dtype=torch.int32)
    if ts.suffix == "base_idx":
        return torch.randperm(cfg.intermediate_size, generator=g)[:ts.shape[0]].int()
    if ts.suffix == "lr_mix":
        return torch.softmax(torch.randn(ts.shape, generator=g), 0)
    return (torch.randn(ts.shape, generator=g) * ts.shape[-1] ** -0.5).to(torch.bfloat16)



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


def measure(model: Path, name: str, a, dtype: str = "float32", stream_counts: list[int] | None = None) -> list[dict]:
    """One server; a load at each of ``stream_counts`` (default [a.streams]) streams, one result each."""
    from openai import OpenAI

    log = CACHE / "serve" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    server = Server(model, name, log, a.compile, dtype)
    try:
        startup = server.wait_ready()
        client = OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", timeout=600)
        results = []
        for streams in stream_counts or [a.streams]:
            plist = prompts(streams * a.requests)
            run_load(client, name, plist[::-1], streams, 1, 8)  # warm-up: every stream once, short
            load_before = os.getloadavg()[0]
            result = run_load(client, name, plist, streams, a.requests, a.max_tokens)
            result.update(startup_s=round(startup, 1), loadavg_1m_before=round(load_before, 2),
                          loadavg_1m_after=round(os.getloadavg()[0], 2))
            results.append(result)
            print(json.dumps({"model": name, **result}), flush=True)
        return results
    finally:
        server.stop()


def synth_main(a) -> None:
    """``--synth``: dense and each method's conversion of a synthetic model at real shapes, bf16, 1 and 8 streams."""
    import vllm

    checkpoints = [("dense", *synth_checkpoint(a.synth, "dense", a.ratio))]
    checkpoints += [(m, *synth_checkpoint(a.synth, m, a.ratio)) for m in a.methods]  # all converted before serving
    runs = []
    for method, path, achieved in checkpoints:
        model = method if method == "dense" else f"{method} {a.ratio}"
        for r in measure(path, method, a, "bfloat16", a.stream_counts):
            runs.append({"model": model, "method": method, "achieved_ratio": round(achieved, 4), **r})
    settings = {"model": f"synthetic {a.synth} ({SYNTH_LAYERS[a.synth]} layers, {SYNTH[a.synth]})",
                "stream_counts": a.stream_counts,
                "requests": a.requests, "max_tokens": a.max_tokens, "prompt_words": 48, "compile": a.compile,
                "dtype": "bfloat16", "max_model_len": 512,
                "env": {k: os.environ[k] for k in ("MOE_LOWRANK_KERNEL", "MOE_LOWRANK_CPU_THREADS") if k in os.environ}}
    data = {"machine": machine(), "vllm": vllm.__version__, "settings": settings, "runs": runs}
    out = a.out or RESULTS / f"serve_{a.synth.replace('-', '_')}_synth.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(synth_table(data))


def synth_table(data: dict) -> str:
    s = data["settings"]
    lines = [f"vLLM {data['vllm']} CPU serving of {s['model']}, {s['requests']} requests × {s['max_tokens']} tokens "
             f"per stream, {'compiled' if s['compile'] else 'enforce-eager'}, bfloat16 ({data['machine']})", "",
             "| model | achieved ratio | streams | tokens/s | vs dense | mean TTFT s | per-request tok/s | load avg |",
             "|---|---|---|---|---|---|---|---|"]
    dense = {r["streams"]: r["tokens_per_s"] for r in data["runs"] if r["method"] == "dense"}
    for r in data["runs"]:
        rel = f"{r['tokens_per_s'] / dense[r['streams']]:.2f}×" if r["streams"] in dense else "-"
        lines.append(f"| {r['model']} | {r['achieved_ratio']} | {r['streams']} | {r['tokens_per_s']:.1f} | {rel} | "
                     f"{r['mean_ttft_s']:.2f} | {r['mean_request_tokens_per_s']:.1f} | "
                     f"{r['loadavg_1m_before']}–{r['loadavg_1m_after']} |")
    return "\n".join(lines)


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
    ap.add_argument("--out", type=Path, default=None, help="default: results/serve_throughput.json "
                    "(--synth: results/serve_<name>_synth.json)")
    ap.add_argument("--synth", choices=sorted(SYNTH), help="serve a synthetic model at real expert shapes (bf16)")
    ap.add_argument("--stream-counts", nargs="+", type=int, default=[1, 8], help="--synth: loads, one per count")
    a = ap.parse_args()
    if a.synth:
        return synth_main(a)
    a.out = a.out or RESULTS / "serve_throughput.json"
    import vllm

    settings = {"streams": a.streams, "requests": a.requests, "max_tokens": a.max_tokens, "prompt_words": 48,
                "compile": a.compile, "dtype": "float32", "max_model_len": 512}
    old = json.loads(a.out.read_text()) if a.out.is_file() else {}
    kept = old.get("runs", []) if old.get("settings") == settings else []  # earlier runs with the same settings
    runs = []
    if not a.no_dense:
        runs.append({"model": "dense", "method": "dense", "achieved_ratio": 0.0, **measure(FIXTURE, "dense", a)[0]})
        print(json.dumps(runs[-1]), flush=True)
    for m in a.methods:
        ckpt, _ = checkpoint(m, a.ratio)
        report = json.loads((ckpt / "moe_lowrank_report.json").read_text())
        runs.append({"model": f"{m} {a.ratio}", "method": m, "ratio": a.ratio,
                     "achieved_ratio": round(report["achieved_ratio"], 4), **measure(ckpt, m, a)[0]})
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
