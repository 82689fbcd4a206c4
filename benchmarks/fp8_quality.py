"""FP8 factors vs bf16 factors on the fixture: held-out perplexity and written bytes, every method × ratio.

    python benchmarks/fp8_quality.py [--methods svd mobe ...] [--ratios 0.3 0.5] [--backend transformers|vllm]
                                     [--quick]

Each (method, ratio) is converted twice with the quality sweep's calibration protocol (benchmarks/quality.py:
128 × 256 tokens, seed 42), once with ``--factor-dtype bfloat16`` and once with ``--factor-dtype fp8_e4m3``, and
scored with the same held-out protocol. ``--quick`` (for a loaded machine) halves the calibration (64 × 256) and
scores the first 4,096 held-out tokens; both dtypes of a pair always share one protocol (recorded per row).
Bytes are the converter report's (counted from the written safetensors
headers: factors, FP8 scales and index tensors). Results: benchmarks/results/fp8_quality.json and .md (rows are
upserted, so methods can be run separately).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import (CACHE, FIXTURE, RESULTS, convert_cmd, dense_ppl, locked, machine, measured_run,  # noqa: E402
                     refusal, score)

DTYPES = ("bfloat16", "fp8_e4m3")
OUT = RESULTS / "fp8_quality.json"


QUICK_TOKENS = 4096


def run(method: str, ratio: float, dtype: str, backend: str, quick: bool = False) -> dict:
    out = CACHE / f"fp8q-{method}-{dtype}-{ratio}"
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_name(out.name + ".log")
    cmd = convert_cmd(method, ratio, out, []) + ["--factor-dtype", dtype]  # overrides quality.py's --dtype float32
    if quick:
        cmd += ["--num-samples", "64"]
    r = measured_run(cmd, log)
    log.unlink()
    row = {"method": method, "ratio": ratio, "factor_dtype": dtype, "protocol": "quick" if quick else "full"}
    if r["returncode"]:
        reason = refusal(r["stderr"])
        if reason is None:
            raise RuntimeError(f"{method} {ratio} {dtype}: moe-convert failed:\n{r['stderr'][-3000:]}")
        return {**row, "status": "infeasible", "reason": reason}
    rep = json.loads((out / "moe_lowrank_report.json").read_text())
    t0 = time.time()
    if quick:
        from vllm_moe_lowrank.evaluation.perplexity import perplexity

        ppl = perplexity(out, FIXTURE / "eval.txt", max_tokens=QUICK_TOKENS, backend=backend)["ppl"]
    else:
        ppl = score(out, backend)
    row.update(achieved_ratio=round(rep["achieved_ratio"], 5), ppl=round(ppl, 4),
               eval_s=round(time.time() - t0, 1), convert_s=round(r["wall_s"], 1), backend=backend, **rep["bytes"])
    shutil.rmtree(out)
    return row


def upsert(row: dict) -> None:
    with locked():
        data = json.loads(OUT.read_text()) if OUT.is_file() else {"rows": []}
        def key(r):
            return r["method"], r["ratio"], r["factor_dtype"], r.get("protocol", "full")

        data["rows"] = [r for r in data["rows"] if key(r) != key(row)] + [row]
        data["machine"] = machine()
        tmp = OUT.with_name(OUT.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, OUT)


def dense_quick_ppl() -> float:
    """The dense fixture's perplexity under the quick protocol (first 4,096 held-out tokens), cached in the JSON."""
    data = json.loads(OUT.read_text())
    if "dense_quick_ppl" not in data:
        from vllm_moe_lowrank.evaluation.perplexity import perplexity

        ppl = round(perplexity(FIXTURE, FIXTURE / "eval.txt", max_tokens=QUICK_TOKENS)["ppl"], 4)
        with locked():
            data = json.loads(OUT.read_text())
            data["dense_quick_ppl"] = ppl
            OUT.write_text(json.dumps(data, indent=2) + "\n")
    return data["dense_quick_ppl"]


def fp8_checkpoint_expert_bytes() -> int:
    """Routed-expert bytes of the fixture as a block-FP8 checkpoint would store them (what an FP8 deployment serves):
    1 byte per weight plus a float32 scale per 128×128 block (format.DENSE_FP8, DeepSeek-V3 / Qwen3-*-FP8 layout)."""
    from vllm_moe_lowrank.converters.arch import detect

    arch = detect(json.loads((FIXTURE / "config.json").read_text()))
    n, m = arch.hidden_size, arch.intermediate_size
    blocks = -(-n // 128) * -(-m // 128)
    return len(arch.moe_layers) * 3 * arch.num_experts * (n * m + 4 * blocks)


def table() -> str:
    rows = json.loads(OUT.read_text())["rows"]
    fp8_ckpt = fp8_checkpoint_expert_bytes()
    by = {(r["method"], r["ratio"], r["factor_dtype"], r.get("protocol", "full")): r for r in rows}
    quick = f", {dense_quick_ppl():.2f} (quick)" if any(r.get("protocol") == "quick" for r in rows) else ""
    lines = [f"Dense bf16 fixture: perplexity {dense_ppl():.2f} (full){quick}. Expert bytes are relative to the dense bf16 experts "
             "(= the source here); FP8 scales and index tensors included.", "",
             "Protocol full: 128 × 256 calibration tokens, 16,384 held-out tokens; quick: 64 × 256 and 4,096.", "",
             f"vs FP8 ckpt: written expert bytes against the same experts in block FP8 ({fp8_ckpt:,} bytes: 1 byte "
             "per weight + a float32 scale per 128×128 block), what a user serving an FP8 checkpoint saves.", "",
             "| method | ratio | protocol | ppl bf16 factors | ppl FP8 factors | FP8 vs bf16 | expert bytes bf16 | "
             "expert bytes FP8 | FP8 factors vs FP8 ckpt | bf16 factors vs FP8 ckpt | checkpoint bytes FP8 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, ratio, proto in sorted({(r["method"], r["ratio"], r.get("protocol", "full")) for r in rows}):
        b, f = by.get((m, ratio, "bfloat16", proto)), by.get((m, ratio, "fp8_e4m3", proto))
        if not b or not f:
            continue
        if "ppl" not in b or "ppl" not in f:
            lines.append(f"| {m} | {ratio} | {proto} | infeasible | infeasible | - | - | - | - | - | - |")
            continue
        change = 100 * (f["ppl"] / b["ppl"] - 1)
        lines.append(f"| {m} | {ratio} | {proto} | {b['ppl']:.2f} | {f['ppl']:.2f} | {change:+.2f}% | "
                     f"{b['expert_bytes_vs_bf16']:.3f}x | {f['expert_bytes_vs_bf16']:.3f}x | "
                     f"{f['expert_bytes'] / fp8_ckpt:.3f}x | {b['expert_bytes'] / fp8_ckpt:.3f}x | "
                     f"{f['checkpoint_bytes_ratio']:.3f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["svd", "moe-svd", "mobe", "rs-moe", "rfid-moe"])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    ap.add_argument("--quick", action="store_true", help="64 × 256 calibration, 4,096 held-out tokens")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES,
                    help="rerun only these factor dtypes (the other rows of a pair are kept)")
    ap.add_argument("--table-only", action="store_true")
    a = ap.parse_args()
    if not a.table_only:
        for m in a.methods:
            for ratio in a.ratios:
                for dtype in a.dtypes:
                    row = run(m, ratio, dtype, a.backend, a.quick)
                    upsert(row)
                    print(json.dumps(row), flush=True)
    text = table()
    (RESULTS / "fp8_quality.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
