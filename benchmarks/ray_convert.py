"""Wall time of ``moe-convert`` serial vs ``--ray`` with 1 and 2 workers, and a projection to large models.

Builds the synthetic 12-layer Qwen3-MoE checkpoint of convert_memory.py, scaled down so that the six runs fit in
minutes on a shared 2-core machine (default: hidden 512, 8 experts of intermediate 256), converts it with

- data-free ``svd`` (``-o whiten=false``): layer fits independent, up to N in flight while the driver moves on;
- calibrated ``svd`` with the default ``--propagate compressed``: each layer's fit waits for the previous layer's
  compressed output (the driver runs the forward, re-runs the layer on the written experts), so layers cannot run
  side by side; the per-expert part of each fit (whitening, SVDs) runs as one task per expert group, the rest
  (rank top-up, down refit, cast, report errors) in a merge task;

serially and on a local Ray cluster of 1 and 2 CPUs, checks that every output is byte-identical to the serial one,
and writes benchmarks/results/ray_convert.json. ``--dry-run --ray`` then measures one layer's fit at a real expert
shape (8 experts of Qwen3-30B's 2048 × 768), from which the wall time of Qwen3-235B-A22B and DeepSeek-V3 on 8
workers is projected, scaling the per-expert fit cost by its flops (three SVDs, n·m·min(n, m) each, plus n³ + m³ of
whitening when calibrated): data-free, 8 layers at a time; calibrated, one layer at a time with the per-expert
share of its fit divided over 8 expert-group tasks. The per-layer cost is measured here on CPU cores; a
GPU's must be measured on one (benchmarks/gpu_check.sh), so the projection's unit is "this machine's layer".

    nice -n 10 python benchmarks/ray_convert.py [--experts 8] [--hidden 512] [--inter 256] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

from convert_memory import FIXTURE, build
from quality import machine, measured_run

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".cache" / "ray_convert"
CALIBRATED = "calibrated svd, --propagate compressed (sequential layers, expert-group tasks)"
SCHEDULES = {
    "data-free svd (layers in parallel)": ["--method", "svd", "--ratio", "0.3", "-o", "whiten=false"],
    CALIBRATED: [
        "--method", "svd", "--ratio", "0.3", "--calib-data", str(FIXTURE / "calib.txt"), "--num-samples", "8",
        "--seq-len", "128"],
}
TARGETS = {  # routed experts per MoE layer, hidden, expert intermediate, MoE layers (config.json of the release)
    "Qwen3-235B-A22B": dict(experts=128, hidden=4096, inter=1536, moe_layers=94),
    "DeepSeek-V3": dict(experts=256, hidden=7168, inter=2048, moe_layers=58),
}


def _expert_flops(n: int, m: int, calibrated: bool) -> float:
    return 3 * n * m * min(n, m) + ((n ** 3 + m ** 3) if calibrated else 0)


def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.name != "moe_lowrank_report.json"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=256, help="expert intermediate size")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    import ray

    shutil.rmtree(WORK, ignore_errors=True)
    src = WORK / "ckpt"
    n, m = a.hidden, a.inter
    size = build(src, a.layers, num_experts=a.experts, hidden_size=n, moe_intermediate_size=m)
    cli = [sys.executable, "-m", "vllm_moe_lowrank.converters.cli"]
    rows = []
    for name, args in SCHEDULES.items():
        ref = WORK / "serial"
        run = measured_run([*cli, *args, str(src), str(ref), "--overwrite"], WORK / "serial.log")
        if run["returncode"]:
            raise SystemExit(f"serial conversion failed:\n{run['stderr'][-3000:]}")
        report = json.loads((ref / "moe_lowrank_report.json").read_text())
        per_layer = sorted(r["seconds"] for r in report["layers"].values() if r.get("status") == "compressed")
        row = {"schedule": name, "serial_s": round(run["wall_s"], 1), "median_layer_s": per_layer[len(per_layer) // 2]}
        expected = _files(ref)
        for workers in (1, 2):
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            address = ray.get_runtime_context().gcs_address
            out = WORK / f"ray{workers}"
            try:
                run = measured_run([*cli, *args, str(src), str(out), "--overwrite", "--ray", address],
                                   WORK / f"ray{workers}.log")
            finally:
                ray.shutdown()
            if run["returncode"]:
                raise SystemExit(f"--ray conversion failed:\n{run['stderr'][-3000:]}")
            row[f"ray_{workers}_workers_s"] = round(run["wall_s"], 1)
            row[f"ray_{workers}_identical"] = _files(out) == expected
        rows.append(row)
        print(json.dumps(row), flush=True)

    # per-task cost at a real expert shape (Qwen3-30B's 2048 x 768, 8 experts, one layer) from `--dry-run --ray`,
    # which measures one layer's fit and, for svd, the per-expert share split into expert-group tasks
    real = WORK / "real"
    build(real, 1, num_experts=8, hidden_size=2048, moe_intermediate_size=768)
    graphs = {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for name, args in SCHEDULES.items():
            dry = subprocess.run([*cli, *args, str(real), str(WORK / "dry"), "--dry-run", "--ray",
                                  ray.get_runtime_context().gcs_address], capture_output=True, text=True)
            if dry.returncode:
                raise SystemExit(f"--dry-run --ray failed:\n{dry.stderr[-3000:]}")
            graphs[name] = json.loads(dry.stdout)["ray"]
    finally:
        ray.shutdown()
    measured = graphs[CALIBRATED]["measured"]
    share = measured["per_expert_part_s"] / measured["fit_s"]

    projection = {}
    for model, t in TARGETS.items():
        entry = {}
        for name, graph in graphs.items():
            calibrated = name == CALIBRATED
            scale = (t["experts"] * _expert_flops(t["hidden"], t["inter"], calibrated)
                     / (8 * _expert_flops(2048, 768, calibrated)))
            per_layer = graph["measured"]["fit_s"] * scale
            if calibrated:  # one layer at a time; its per-expert share over 8 expert-group tasks
                wall8 = t["moe_layers"] * per_layer * (1 - share + share / 8)
            else:  # 8 layers at a time
                wall8 = math.ceil(t["moe_layers"] / 8) * per_layer
            entry[name] = {"per_layer_fit_s": round(per_layer), "serial_h": round(t["moe_layers"] * per_layer / 3600, 1),
                           "8_workers_h": round(wall8 / 3600, 1)}
        projection[model] = {**t, **entry}
    result = {
        "machine": machine(),
        "checkpoint": {"layers": a.layers, "experts": a.experts, "hidden_size": n, "moe_intermediate_size": m,
                       "bytes": size},
        "note": "wall times include process start and ray join (~10 s); the Ray tasks use the driver's torch thread "
                "count (2 here) so that BLAS reductions match the serial run: 2 workers share 2 cores",
        "rows": rows,
        "per_task_cost_at_2048x768": {name: {k: g[k] for k in ("measured", "memory_per_task_gb", "schedule")}
                                      for name, g in graphs.items()},
        "calibrated_fit_per_expert_share": round(share, 3),
        "projection": {"unit": "layer fit cost on this machine (2 CPU cores) measured at 8 experts of 2048 x 768, "
                               "scaled by experts x flops; the driver's forward is not included; GPU task cost not "
                               "measured", "models": projection},
    }
    (ROOT / "benchmarks" / "results" / "ray_convert.json").write_text(json.dumps(result, indent=2) + "\n")
    if not a.keep:
        shutil.rmtree(WORK)


if __name__ == "__main__":
    main()
