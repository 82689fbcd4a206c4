"""Calibration switches, one at a time: in-sample MoE-output error and held-out perplexity on the fixture.

    python benchmarks/calibration_ablation.py --method svd --ratios 0.6 0.8 [--variants all-off default ...]
        [--no-ppl] [-o key=value ...]

Each variant is a set of ``moe-convert`` calibration flags (issue 15): ``all-off`` is the old pipeline (dense
propagation, unweighted Grams, cliff shrinkage, down fitted on dense intermediates); ``+propagate`` etc. turn one
switch on over ``all-off``; ``-propagate`` etc. turn one off from the new ``default``. Recorded per row: the mean
over layers of the report's ``output_rel_err`` (in-sample: calibration tokens; with propagation those are the
compressed model's own inputs) and, unless ``--no-ppl``, the held-out perplexity of eval.txt (reporting only —
nothing here chooses a default from it). Rows are upserted into benchmarks/results/calibration_ablation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import CACHE, RESULTS, convert_cmd, locked, machine, measured_run, score  # noqa: E402

OFF = {"propagate": "dense", "gram-weight": "none", "shrink": "cliff", "down-fit": "dense"}
ON = {"propagate": "compressed", "gram-weight": "routing", "shrink": "smooth", "down-fit": "compressed"}


def variant_flags(name: str) -> list[str]:
    """all-off, default, +SWITCH (one on over all-off), -SWITCH (one off from default)."""
    if name in ("all-off", "default"):
        flags = dict(OFF if name == "all-off" else ON)
    elif name[0] in "+-" and name[1:] in OFF:
        flags = dict(OFF if name[0] == "+" else ON)
        flags[name[1:]] = (ON if name[0] == "+" else OFF)[name[1:]]
    else:
        raise SystemExit(f"unknown variant {name!r}")
    return [a for k, v in flags.items() for a in (f"--{k}", v)]


def run(method: str, ratio: float, variant: str, options: list[str], ppl: bool) -> dict:
    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / f"ablation-{method}-{variant}-{ratio}-{os.getpid()}"
    cmd = convert_cmd(method, ratio, out, options) + variant_flags(variant)
    res = measured_run(cmd, out.with_name(out.name + ".log"))
    if res["returncode"]:
        raise SystemExit(f"{method} {variant} {ratio} failed:\n{res['stderr'][-2000:]}")
    rep = json.loads((out / "moe_lowrank_report.json").read_text())
    errs = [l["output_rel_err"] for l in rep["layers"].values() if l.get("output_rel_err") is not None]
    row = {"method": method, "variant": variant, "options": options, "ratio": ratio,
           "achieved_ratio": round(rep["achieved_ratio"], 5),
           "output_rel_err_mean": round(statistics.fmean(errs), 5) if errs else None,
           "output_rel_err": [round(e, 5) for e in errs], "convert_s": round(res["wall_s"], 1), "convert_cpu_s": round(res["cpu_s"], 1),
           "peak_rss_mb": round(res["peak_rss_bytes"] / 2**20)}
    if ppl:
        row["ppl"] = round(score(out), 4)
    shutil.rmtree(out)
    out.with_name(out.name + ".log").unlink(missing_ok=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", required=True)
    ap.add_argument("--ratios", type=float, nargs="+", required=True)
    ap.add_argument("--variants", nargs="+", default=["all-off", "+propagate", "+gram-weight", "+shrink",
                                                       "+down-fit", "default"])
    ap.add_argument("-o", dest="options", action="append", default=[])
    ap.add_argument("--no-ppl", action="store_true")
    args = ap.parse_args()
    f = RESULTS / "calibration_ablation.json"
    for ratio in args.ratios:
        for v in args.variants:
            row = run(args.method, ratio, v, args.options, not args.no_ppl)
            print(json.dumps(row), flush=True)
            with locked():
                data = json.loads(f.read_text()) if f.is_file() else {"rows": []}
                key = (row["method"], row["variant"], row["ratio"], row["options"])
                data["rows"] = [r for r in data["rows"] if (r["method"], r["variant"], r["ratio"], r["options"]) != key]
                data["rows"].append(row)
                data["machine"] = machine()
                data["protocol"] = ("fixture calib.txt 128 x 256 tokens seed 42, float32 factors; output_rel_err: "
                                    "report's in-sample MoE-output error per layer; ppl: eval.txt (held-out, reporting)")
                f.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
