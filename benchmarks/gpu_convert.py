"""One-layer conversions at Qwen3-30B-A3B shape on the GPU, timed, with errors checked against the CPU (issue 20).

Builds a synthetic one-decoder-layer Qwen3-MoE checkpoint with Qwen3-30B-A3B's expert shapes (128 experts,
hidden 2048, expert intermediate 768, top-8; random bf16 weights, seed 0, so every machine builds the same bytes)
and converts it with every method at ratio 0.3 with ``--device cuda``, one after the other, timing each. Meanwhile
the same conversions run with ``--device cpu`` in a background process on the machine's idle CPU cores (within
``--cpu-budget-s``): where both finished, the report's relative errors are compared. The same algorithm on another
device must land on the same errors up to rounding, except MoBE, whose GPU fit runs longer (GPU-length defaults)
and so may only be better.

Targets (issue 20): svd-family methods ≤ 20 s, MoBE ≤ 2 min per layer on an H100/H200.

    python benchmarks/gpu_convert.py --out results/gpu_convert.json           # GPU machine (see gpu_check.sh)
    python benchmarks/gpu_convert.py --smoke --out /tmp/gpu_convert.json      # CPU, tiny layer: does it still run?

``--smoke`` builds a tiny layer and runs both columns on the CPU; its times mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from convert_memory import build
from quality import FIXTURE, machine, measured_run

METHODS = ("svd", "moe-svd", "rfid-moe", "rs-moe", "mobe")
QWEN3_30B = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                 moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8)
SMOKE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
             num_experts=8, num_experts_per_tok=2)
TARGET_S = {"mobe": 120.0}  # every other method: 20 s
CALIB = ["--calib-data", str(FIXTURE / "calib.txt"), "--num-samples", "16", "--seq-len", "256", "--seed", "42"]
REL_TOL = 0.02  # |err_gpu - err_cpu| / err_cpu allowed for the same algorithm on another device


def _cmd(method: str, src: Path, out: Path, device: str) -> list[str]:
    return [sys.executable, "-m", "vllm_moe_lowrank.converters.cli", "--method", method, "--ratio", "0.3",
            str(src), str(out), "--device", device, "--overwrite", *CALIB]


def _errors(out: Path) -> dict:
    """The report's errors of the one MoE layer: weight errors per projection (None for unit splits) and output."""
    layer = json.loads((out / "moe_lowrank_report.json").read_text())["layers"]["0"]
    return {"weight_rel_err": layer.get("weight_rel_err"), "output_rel_err": layer.get("output_rel_err"),
            "achieved_layer_ratio": layer.get("layer_ratio")}


def _convert(method: str, src: Path, work: Path, device: str, timeout: float | None = None) -> dict:
    """One conversion; ``timeout`` set: the background CPU reference (its own output folder and thread budget)."""
    out = work / f"{method}-{'reference' if timeout is not None else 'main'}"
    if timeout is not None:  # background CPU reference: a plain subprocess that can be stopped
        t0 = time.time()
        try:
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) - 4))}  # cores left to the GPU run
            proc = subprocess.run(_cmd(method, src, out, device), capture_output=True, text=True, timeout=timeout,
                                  env=env)
        except subprocess.TimeoutExpired:
            return {"status": "cpu budget exhausted"}
        run = {"returncode": proc.returncode, "stderr": proc.stderr, "wall_s": time.time() - t0}
    else:
        run = measured_run(_cmd(method, src, out, device), work / f"{method}-main.log")
    res = {"status": "ok" if run["returncode"] == 0 else "failed", "seconds": round(run["wall_s"], 1)}
    if run["returncode"]:
        res["error"] = run["stderr"].strip().splitlines()[-1:] if run["stderr"].strip() else ["(no stderr)"]
    else:
        res.update(_errors(out))
        if "peak_rss_bytes" in run:
            res["peak_rss_gb"] = round(run["peak_rss_bytes"] / 1e9, 2)
    shutil.rmtree(out, ignore_errors=True)
    return res


def _compare(method: str, gpu: dict, cpu: dict) -> dict:
    """Relative difference of each error; ``ok``: equal within REL_TOL (MoBE: GPU not worse)."""
    if gpu.get("status") != "ok" or cpu.get("status") != "ok":
        return {"ok": None, "why": "one of the two runs did not finish"}
    pairs = [("output", gpu["output_rel_err"], cpu["output_rel_err"])]
    for p, v in (gpu["weight_rel_err"] or {}).items():
        pairs.append((p, v, (cpu["weight_rel_err"] or {}).get(p)))
    diffs = {k: (g - c) / max(c, 1e-12) for k, g, c in pairs if g is not None and c is not None}
    ok = all(d <= REL_TOL for d in diffs.values()) if method == "mobe" else \
        all(abs(d) <= REL_TOL for d in diffs.values())
    return {"ok": ok, "rel_diff": {k: round(d, 5) for k, d in diffs.items()}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="results JSON")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--cpu-budget-s", type=float, default=240.0, help="wall time for all CPU reference runs")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    ap.add_argument("--smoke", action="store_true", help="tiny layer, both columns on the CPU")
    args = ap.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_convert.py needs a CUDA GPU (or --smoke)")
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-convert-"))
    src = work / "ckpt"
    t0 = time.time()
    size = build(src, 1, **(SMOKE if args.smoke else QWEN3_30B))
    build_s = time.time() - t0

    cpu: dict[str, dict] = {}
    deadline = time.time() + args.cpu_budget_s

    def cpu_refs() -> None:
        for m in args.methods:
            left = deadline - time.time()
            cpu[m] = _convert(m, src, work, "cpu", timeout=max(left, 1.0)) if left > 0 else \
                {"status": "cpu budget exhausted"}

    ref = threading.Thread(target=cpu_refs, daemon=True)
    ref.start()
    gpu = {m: _convert(m, src, work, device) for m in args.methods}
    ref.join(max(deadline - time.time(), 0) + 5)

    rows = []
    for m in args.methods:
        g, c = gpu[m], cpu.get(m, {"status": "cpu budget exhausted"})
        target = TARGET_S.get(m, 20.0)
        rows.append({"method": m, "gpu": g, "cpu": c, "target_s": target,
                     "target_met": None if args.smoke or g["status"] != "ok" else g["seconds"] <= target,
                     "errors_vs_cpu": _compare(m, g, c)})
        print(f"{m:9} {device}: {g['status']:6} {g.get('seconds', '-'):>7} s (target {target:.0f})   "
              f"cpu: {c['status']:6} {c.get('seconds', '-'):>7} s   errors vs cpu: {rows[-1]['errors_vs_cpu']}")
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)", "machine": machine(),
           "smoke": args.smoke, "torch": torch.__version__,
           "layer": {**(SMOKE if args.smoke else QWEN3_30B), "checkpoint_bytes": size, "build_s": round(build_s, 1)},
           "calibration": CALIB[2:], "ratio": 0.3, "rows": rows,
           "note": "smoke run: times are meaningless" if args.smoke else
           "wall seconds of the whole moe-convert process (start-up, calibration, fit, write) per method"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    bad = [r["method"] for r in rows if r["gpu"]["status"] != "ok" or r["errors_vs_cpu"]["ok"] is False]
    if bad:
        sys.exit(f"gpu_convert: failed or off the CPU's errors: {', '.join(bad)}")


if __name__ == "__main__":
    main()
