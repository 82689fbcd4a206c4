"""Quality sweep on the shared fixture: convert at several ratios, measure held-out perplexity, record JSON.

    python benchmarks/quality.py --method mobe --ratios 0.2 0.3 0.4 [--variant NAME -o key=value ...]

Every run uses the same calibration (fixtures/.../calib.txt, 128 × 256 tokens, seed 42, float32 factors) and the
same evaluation (first 16,384 tokens of eval.txt in 256-token windows), so rows compare across methods. Results
are upserted into benchmarks/results/quality_<method>.json, keyed by (variant, ratio); a markdown table of the
file (with the svd baseline and the dense model beside it) is printed.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "qwen3-moe-pydocs"
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache"
CALIB = ["--calib-data", str(FIXTURE / "calib.txt"), "--num-samples", "128", "--seq-len", "256", "--seed", "42",
         "--dtype", "float32"]
DENSE_PPL_KEY = "dense"


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_implementation()} " \
           f"{platform.python_version()}"


def run_one(method: str, ratio: float, variant: str, options: list[str]) -> dict:
    from vllm_moe_lowrank.evaluation.perplexity import perplexity

    out = CACHE / f"{method}-{variant}-{ratio}"
    cmd = [sys.executable, "-m", "vllm_moe_lowrank.converters.cli", "--method", method, "--ratio", str(ratio),
           str(FIXTURE), str(out), "--overwrite", *CALIB]
    for o in options:
        cmd += ["-o", o]
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    convert_s = time.time() - t0
    report = json.loads((out / "moe_lowrank_report.json").read_text())
    t0 = time.time()
    ppl = perplexity(out, FIXTURE / "eval.txt")["ppl"]
    row = {"method": method, "variant": variant, "options": options, "ratio": ratio,
           "achieved_ratio": round(report["achieved_ratio"], 5), "ppl": round(ppl, 4),
           "convert_s": round(convert_s, 1), "eval_s": round(time.time() - t0, 1)}
    shutil.rmtree(out)
    return row


def load(method: str) -> dict:
    f = RESULTS / f"quality_{method}.json"
    return json.loads(f.read_text()) if f.is_file() else {"method": method, "rows": []}


def dense_ppl() -> float:
    f = RESULTS / "quality_dense.json"
    if not f.is_file():
        from vllm_moe_lowrank.evaluation.perplexity import perplexity

        f.write_text(json.dumps({"ppl": round(perplexity(FIXTURE, FIXTURE / "eval.txt")["ppl"], 4),
                                 "machine": machine()}, indent=2) + "\n")
    return json.loads(f.read_text())["ppl"]


def table(method: str) -> str:
    rows = load(method)["rows"]
    base = {r["ratio"]: r["ppl"] for r in load("svd")["rows"] if r["variant"] == "default"}
    lines = [f"dense fixture ppl: {dense_ppl():.2f}", "",
             "| method | variant | ratio | achieved | ppl | svd ppl | convert s |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["variant"] != "default", r["variant"], r["ratio"])):
        b = base.get(r["ratio"])
        lines.append(f"| {r['method']} | {r['variant']} | {r['ratio']} | {r['achieved_ratio']:.4f} | {r['ppl']:.2f} "
                     f"| {'-' if b is None else f'{b:.2f}'} | {r['convert_s']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8])
    ap.add_argument("--variant", default="default", help="name of this configuration (ablation) in the table")
    ap.add_argument("-o", "--option", dest="options", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--table-only", action="store_true")
    a = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not a.table_only:
        data = load(a.method)
        for ratio in a.ratios:
            row = run_one(a.method, ratio, a.variant, a.options)
            data["rows"] = [r for r in data["rows"] if (r["variant"], r["ratio"]) != (a.variant, ratio)] + [row]
            data["machine"] = machine()
            (RESULTS / f"quality_{a.method}.json").write_text(json.dumps(data, indent=2) + "\n")
            print(json.dumps(row), flush=True)
    print(table(a.method))


if __name__ == "__main__":
    main()
