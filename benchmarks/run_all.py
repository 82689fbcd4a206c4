"""Regenerate the whole benchmark suite on the fixture: quality table, conversion cost, CPU serving throughput.

    python benchmarks/run_all.py                    # everything; quality rows already recorded are kept
    python benchmarks/run_all.py --rerun            # recompute every quality row of the grid
    python benchmarks/run_all.py --check            # recompute the grid's rows aside, compare with the recorded
                                                    # perplexities (fails above 0.5%), write reproducibility.json
    python benchmarks/run_all.py --only table       # just rebuild the table, plot and README section
    python benchmarks/run_all.py --fixture qwen3-moe-perldocs   # the grid on the second fixture (quality + table)

Steps (``--only`` picks some): ``quality`` (the svd baseline and the four methods × ``--ratios``, default
0.2 / 0.3 / 0.4 / 0.6 / 0.8, through benchmarks/quality.py: same calibration and windows for every row; a ratio a
method refuses is recorded as infeasible with its stated limit), ``cost`` (benchmarks/convert_cost.py), ``serve``
(benchmarks/serve_throughput.py), ``table`` (``moe-eval compare`` over the result files ->
results/quality_table.{md,json,png}, the tables in benchmarks/README.md and README.md). ``--check`` is an extra
step (alone, only it and the table run; first fixture only). ``--fixture``: another bundled fixture; only the
quality and table steps run, into benchmarks/results/<fixture>/ (the READMEs keep the first fixture's table).
Perplexity backend: transformers on the dense export (``--backend vllm`` scores through vLLM prompt logprobs;
tests/test_eval.py shows the two agree).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402
from convert_cost import CKPTS, METHODS  # noqa: E402  (its conversions use the quality rows' settings)
from quality import ROOT, load, machine, run_one, score, upsert  # noqa: E402

RATIOS = [0.2, 0.3, 0.4, 0.6, 0.8]
TOLERANCE = 0.005  # a rerun must reproduce every perplexity within 0.5%
README = ROOT / "benchmarks" / "README.md"
BEGIN, END = "<!-- results:begin (benchmarks/run_all.py) -->", "<!-- results:end -->"


def recorded(method: str, ratio: float) -> dict | None:
    return next((r for r in load(method)["rows"] if r["variant"] == "default" and r["ratio"] == ratio), None)


def step_quality(methods: list[str], ratios: list[float], rerun: bool, backend: str) -> None:
    quality.dense_ppl()  # computes results/quality_dense.json if missing
    for m in methods:
        for x in ratios:
            if recorded(m, x) is not None and not rerun:
                continue
            t0 = time.time()
            row = run_one(m, x, "default", [], backend)
            upsert(m, row)
            print(f"quality {m} {x}: {row.get('ppl', row.get('status'))} ({time.time() - t0:.0f} s)", flush=True)


def step_check(methods: list[str], ratios: list[float], backend: str) -> bool:
    """Recompute recorded rows from scratch, aside (nothing recorded is touched); compare perplexities.

    A conversion the cost step already made with the same settings (benchmarks/.cache/ckpt/<method>-<ratio>) is
    scored as it is; every other row is reconverted in benchmarks/.cache/check/.
    """
    from vllm_moe_lowrank.evaluation.perplexity import perplexity

    rows = []
    dense_rec = json.loads((quality.RESULTS / "quality_dense.json").read_text())["ppl"]
    dense_new = perplexity(quality.FIXTURE, quality.FIXTURE / "eval.txt", backend="transformers")["ppl"]
    rows.append({"method": "dense", "ratio": 0.0, "recorded": dense_rec, "rerun": round(dense_new, 4)})
    for m in methods:
        for x in ratios:
            rec = recorded(m, x)
            if rec is None or "ppl" not in rec:
                continue
            ckpt = CKPTS / f"{m}-{x}"
            if (ckpt / "moe_lowrank_report.json").is_file():
                achieved = json.loads((ckpt / "moe_lowrank_report.json").read_text())["achieved_ratio"]
                new = {"ppl": round(score(ckpt, backend), 4), "achieved_ratio": round(achieved, 5)}
            else:
                new = run_one(m, x, "default", [], backend, work=quality.CACHE / "check")
            rows.append({"method": m, "ratio": x, "recorded": rec["ppl"], "rerun": new["ppl"],
                         "achieved_recorded": rec["achieved_ratio"], "achieved_rerun": new["achieved_ratio"]})
            print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        r["rel_diff"] = abs(r["rerun"] / r["recorded"] - 1)
    f = quality.RESULTS / "reproducibility.json"
    if f.is_file():  # rows of earlier checks (other methods / ratios) are kept unless recomputed now
        now = {(r["method"], r["ratio"]) for r in rows}
        rows += [r for r in json.loads(f.read_text())["rows"] if (r["method"], r["ratio"]) not in now]
    worst = max(r["rel_diff"] for r in rows)
    out = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "backend": backend,
           "tolerance": TOLERANCE, "max_rel_diff": worst, "ok": worst <= TOLERANCE, "rows": rows}
    f.write_text(json.dumps(out, indent=2) + "\n")
    print(f"reproducibility: {len(rows)} perplexities recomputed, max relative difference {100 * worst:.4f}% "
          f"(tolerance {100 * TOLERANCE}%): {'OK' if out['ok'] else 'FAILED'}")
    return out["ok"]


def step_table() -> str:
    from vllm_moe_lowrank.evaluation.compare import compare

    RESULTS = quality.RESULTS
    files = [RESULTS / "quality_dense.json"] + [RESULTS / f"quality_{m}.json" for m in METHODS
                                                if (RESULTS / f"quality_{m}.json").is_file()]
    if quality.FIXTURE != quality.DEFAULT_FIXTURE:  # a second fixture: its own tables, the READMEs untouched
        cfg = json.loads((quality.FIXTURE / "config.json").read_text())
        experts = cfg.get("num_experts", cfg.get("num_local_experts"))
        res = compare(files, RESULTS, "quality_table", title=f"Fixture {quality.FIXTURE.name} (Qwen3-MoE, {experts} "
                      f"experts top-{cfg['num_experts_per_tok']}): held-out perplexity")
        compare(files, RESULTS, "quality_table_all", variants="all",
                title=f"Fixture {quality.FIXTURE.name}: every recorded variant (ablations dashed)")
        print(res["markdown"])
        return res["markdown"]
    res = compare(files, RESULTS, "quality_table", title="Fixture (Qwen3-MoE, 16 experts): held-out perplexity")
    compare(files, RESULTS, "quality_table_all", variants="all",
            title="Fixture: held-out perplexity, every recorded variant (ablations dashed)")
    parts = ["### Quality (held-out perplexity)", "", res["markdown"], "",
             "![perplexity vs ratio](results/quality_table.png)", "",
             f"Machine: {load('svd').get('machine', '?')}. Every variant, ablations included: "
             "[quality_table_all.md](results/quality_table_all.md), [plot](results/quality_table_all.png)."]
    missing = [f"{r['method']} {r['ratio']:g}" for r in _grid_gaps()]
    if missing:
        parts += ["", f"Not measured yet: {', '.join(missing)}."]
    old = [f"{m} {x:g}" for m in METHODS for x in RATIOS if (r := recorded(m, x)) is not None and "date" not in r]
    if old:  # rows carry the date they were measured from issue 15 on (new calibration defaults)
        parts += ["", f"Measured before the current calibration defaults (not rerun): {', '.join(old)}."]
    for name, script in (("convert_cost.json", "convert_cost"), ("serve_throughput.json", "serve_throughput")):
        f = RESULTS / name
        if f.is_file():
            mod = __import__(script)
            title = "Conversion cost" if script == "convert_cost" else "CPU serving throughput"
            data = json.loads(f.read_text())
            parts += ["", f"### {title}", "", mod.table(data)]
            done = {r["method"] for r in data.get("rows", data.get("runs", [])) if "error" not in r}
            if [m for m in METHODS if m not in done]:
                parts += ["", f"Not measured yet: {', '.join(m for m in METHODS if m not in done)}."]
    mem = RESULTS / "convert_memory.json"
    if mem.is_file():  # written by convert_memory.py (not run here: ~30 min and a 5 GB synthetic checkpoint)
        m = json.loads(mem.read_text())
        parts += ["", "### Streaming memory", "", f"`convert_memory.py`: a synthetic {m['checkpoint']['layers']}-layer "
                  f"Qwen3-MoE checkpoint of {m['checkpoint']['bytes'] / 1e9:.2f} GB converted with `svd` at 0.3 peaks "
                  f"at {m['peak_rss_bytes'] / 1e9:.2f} GB RSS = **{m['peak_rss_over_checkpoint']:.3f}×** the "
                  f"checkpoint (target < {m['target']}×), {m['convert_s']:.0f} s ({m['machine']})."]
    repro = RESULTS / "reproducibility.json"
    if repro.is_file():
        r = json.loads(repro.read_text())
        checked = ", ".join(f"{x['method']}" + (f" {x['ratio']:g}" if x["ratio"] else "") for x in r["rows"])
        parts += ["", "### Reproducibility", "", f"`run_all.py --check` ({r['date']}): {len(r['rows'])} perplexities "
                  f"recomputed from fresh conversions ({checked}), max relative difference "
                  f"{100 * r['max_rel_diff']:.4f}% (tolerance {100 * r['tolerance']:g}%): "
                  f"{'OK' if r['ok'] else 'FAILED'}. Rows not listed were not rechecked."]
    section = "\n".join(parts)
    _fill(README, section)
    plot = "![perplexity vs ratio](benchmarks/results/quality_table.png)"
    note = f"\n\nMeasured before the current calibration defaults (not rerun): {', '.join(old)}." if old else ""
    _fill(ROOT / "README.md", f"{res['markdown']}\n\n{plot}{note}")
    print(section)
    return section


def _fill(doc: Path, section: str) -> None:
    """Replace what is between the BEGIN / END markers of ``doc`` (left alone if it has none)."""
    text = doc.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        doc.write_text(head + BEGIN + "\n" + section + "\n" + END + rest.split(END, 1)[1])


def _grid_gaps() -> list[dict]:
    return [{"method": m, "ratio": x} for m in METHODS for x in RATIOS if recorded(m, x) is None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=["quality", "cost", "serve", "table"],
                    help="run only these steps (repeatable); default: all four")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--ratios", nargs="+", type=float, default=RATIOS)
    ap.add_argument("--rerun", action="store_true", help="recompute quality rows that are already recorded")
    ap.add_argument("--check", action="store_true", help="recompute recorded rows aside and compare (0.5%%)")
    ap.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    ap.add_argument("--cost-ratio", type=float, default=0.4)
    ap.add_argument("--fixture", default=quality.DEFAULT_FIXTURE.name,
                    help="bundled fixture (quality and table steps only; results in benchmarks/results/<fixture>/)")
    ap.add_argument("--serve-args", default="", help="extra arguments for serve_throughput.py, e.g. '--requests 2'")
    a = ap.parse_args()
    steps = a.only or ([] if a.check else ["quality", "cost", "serve", "table"])
    if quality.set_fixture(a.fixture) != quality.DEFAULT_FIXTURE:
        steps = [s for s in steps if s in ("quality", "table")]  # cost and serving stay on the first fixture
    ok = True
    py = [sys.executable]
    here = Path(__file__).resolve().parent
    if "quality" in steps:
        step_quality(a.methods, a.ratios, a.rerun, a.backend)
    if "cost" in steps:
        subprocess.run(py + [str(here / "convert_cost.py"), "--methods", *a.methods, "--ratio", str(a.cost_ratio)],
                       check=True)
    if "serve" in steps:
        subprocess.run(py + [str(here / "serve_throughput.py"), "--methods", *a.methods, "--ratio",
                             str(a.cost_ratio), *a.serve_args.split()], check=True)
    if a.check and quality.FIXTURE == quality.DEFAULT_FIXTURE:
        ok = step_check(a.methods, a.ratios, a.backend)
    if "table" in steps or a.check:
        step_table()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
