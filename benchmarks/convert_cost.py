"""Conversion cost per method on the fixture: wall time, CPU time and peak RSS of one `moe-convert` run each.

    python benchmarks/convert_cost.py [--methods svd mobe ...] [--ratio 0.4]

Every method converts the fixture at the same ratio with the quality sweep's calibration (128 × 256 tokens, seed 42,
float32 factors). Each conversion is its own process: peak RSS is that process's own VmHWM (``peak_rss.py``), CPU
time its user + system time (``os.wait4``); both times move with other jobs sharing the machine (the 1-minute load average before
each run is recorded), peak RSS does not. The first row is the bare import of the converter stack (torch,
transformers), the floor under every method's RSS. The converted checkpoints stay in benchmarks/.cache/ckpt/ for the
serving benchmark and ``run_all.py --check``. Results: benchmarks/results/convert_cost.json (rows of methods not
measured in a run are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import CACHE, FIXTURE, RESULTS, convert, machine, measured_run  # noqa: E402

METHODS = ["svd", "moe-svd", "mobe", "rs-moe", "rfid-moe"]
CKPTS = CACHE / "ckpt"


def checkpoint(method: str, ratio: float, measure: bool = False) -> tuple[Path, dict]:
    """The fixture converted with ``method`` at ``ratio`` in benchmarks/.cache/ckpt/ (reused if there, unless
    ``measure``: then always reconverted) and the conversion's cost row (empty when reused)."""
    out = CKPTS / f"{method}-{ratio}"
    if (out / "moe_lowrank_report.json").is_file() and not measure:
        return out, {}
    load = os.getloadavg()[0]
    row = {"method": method, "ratio": ratio, **convert(method, ratio, out), "loadavg_1m_before": round(load, 2)}
    if row.get("status") == "infeasible":
        raise RuntimeError(f"moe-convert {method} --ratio {ratio}: {row['reason']}")
    return out, row


def import_floor() -> dict:
    """Peak RSS and CPU time of importing what every conversion imports (and nothing else)."""
    run = measured_run([sys.executable, "-c", "import vllm_moe_lowrank.converters.pipeline, transformers.models"])
    return {"method": "(import only)", "convert_s": round(run["wall_s"], 1), "convert_cpu_s": round(run["cpu_s"], 1),
            "peak_rss_mb": round(run["peak_rss_bytes"] / 2**20)}


def table(data: dict) -> str:
    lines = [f"Conversion of the fixture at ratio {data['ratio']} ({data['machine']})", "",
             "| method | achieved ratio | wall s | CPU s | peak RSS MiB | load avg before |",
             "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'].splitlines()[-1][:80]} | | | | |")
            continue
        lines.append(f"| {r['method']} | {r.get('achieved_ratio', '-')} | {r['convert_s']} | {r['convert_cpu_s']} | "
                     f"{r['peak_rss_mb']} | {r.get('loadavg_1m_before', '-')} |")
    return "\n".join(lines)


def save(out: Path, ratio: float, rows: list[dict]) -> dict:
    """Write the rows measured now; rows of other methods at the same ratio recorded earlier are kept."""
    old = json.loads(out.read_text()) if out.is_file() else {}
    now = {r["method"] for r in rows}
    kept = [r for r in old.get("rows", []) if r["method"] not in now] if old.get("ratio") == ratio else []
    order = ["(import only)", *METHODS]
    rows = sorted(rows + kept, key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))
    data = {"machine": machine(), "fixture": str(FIXTURE.relative_to(FIXTURE.parents[1])),
            "fixture_bytes": sum(f.stat().st_size for f in FIXTURE.glob("*.safetensors")), "ratio": ratio,
            "calibration": "128 x 256 tokens of calib.txt, seed 42, float32 factors", "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--out", type=Path, default=RESULTS / "convert_cost.json")
    a = ap.parse_args()
    rows = [import_floor()]
    for m in a.methods:
        try:
            _, row = checkpoint(m, a.ratio, measure=True)
        except RuntimeError as err:  # recorded, the other methods still run
            row = {"method": m, "ratio": a.ratio, "error": str(err)[-1500:]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        data = save(a.out, a.ratio, rows)  # after every conversion: an interrupted run keeps what it measured
    print(table(data))


if __name__ == "__main__":
    main()
