"""``moe-eval compare``: perplexity vs compression ratio per method, as a markdown table, JSON and a PNG plot.

Runs can be

* result files: ``benchmarks/results/quality_<method>.json`` (``{"rows": [...]}``, rows with method, variant,
  ratio, achieved_ratio, ppl, or ``status: "infeasible"`` with a ``reason``), a bare list of such rows,
  ``quality_dense.json`` (``{"ppl": ...}``: the dense model), or the JSON written by ``moe-eval ppl --out``;
* checkpoint folders (dense or compressed): method and ratio come from config.json's quantization_config; their
  perplexity is measured with ``--text`` (``moe-eval ppl``'s protocol), or read from ``moe_eval_ppl.json`` in the
  folder if ``moe-eval ppl --out`` put it there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

PPL_FILE = "moe_eval_ppl.json"  # what `moe-eval ppl CKPT --out CKPT/moe_eval_ppl.json` leaves in a checkpoint


def _row(d: dict, source: str) -> dict:
    """Normalize one result (a quality row, a moe-eval ppl result, the dense file) to the compare schema."""
    method = d.get("method") or "dense"
    ratio = float(d.get("ratio") or 0.0)
    status = d.get("status", "ok" if d.get("ppl") is not None else "missing")
    return {"method": method, "variant": d.get("variant", "default"), "ratio": round(ratio, 4),
            "achieved_ratio": d.get("achieved_ratio", ratio if method == "dense" else None),
            "ppl": d.get("ppl"), "status": status, "reason": d.get("reason"), "options": d.get("options", []),
            "source": source}


def load_run(run: str | Path, text: str | Path | None = None, backend: str = "auto") -> list[dict]:
    """Rows of one run (file or checkpoint folder)."""
    path = Path(run)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: neither a result file nor a checkpoint folder (no config.json)")
        if (path / PPL_FILE).is_file():
            return [_row(json.loads((path / PPL_FILE).read_text()), str(path))]
        if text is None:
            raise ValueError(f"{path}: no perplexity recorded for this checkpoint; pass --text FILE to measure it "
                             f"(or run `moe-eval ppl {path} --text FILE --out {path / PPL_FILE}`)")
        from .perplexity import perplexity

        return [_row(perplexity(path, text, backend=backend), str(path))]
    if not path.is_file():
        raise ValueError(f"{path}: no such result file or checkpoint folder")
    data = json.loads(path.read_text())
    if isinstance(data, list):
        return [_row(r, str(path)) for r in data]
    if isinstance(data.get("rows"), list):
        return [_row({"method": data.get("method"), **r}, str(path)) for r in data["rows"]]
    if "ppl" in data:
        return [_row(data, str(path))]
    raise ValueError(f"{path}: not a result file (expected 'rows', a list of rows, or a 'ppl' entry)")


def collect(runs: list[str | Path], text=None, backend: str = "auto", variants: str = "default") -> dict:
    """{"dense_ppl", "rows"}: the runs' rows (later runs replace earlier ones with the same key), dense apart."""
    by_key: dict[tuple, dict] = {}
    for run in runs:
        for r in load_run(run, text, backend):
            by_key[(r["method"], r["variant"], r["ratio"])] = r
    rows = list(by_key.values())
    dense = [r for r in rows if r["method"] == "dense" and r["ppl"] is not None]
    rows = [r for r in rows if r["method"] != "dense" and (variants == "all" or r["variant"] == "default")]
    order = {"svd": 0}
    rows.sort(key=lambda r: (order.get(r["method"], 1), r["method"], r["variant"] != "default", r["variant"],
                             r["ratio"]))
    return {"dense_ppl": dense[0]["ppl"] if dense else None, "rows": rows}


def _series(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        name = r["method"] if r["variant"] == "default" else f"{r['method']} ({r['variant']})"
        out.setdefault(name, []).append(r)
    return out


def markdown(result: dict) -> str:
    """Pivot table: one line per method (and variant), one column per target ratio; cells ppl (Δ vs dense)."""
    rows, dense = result["rows"], result["dense_ppl"]
    ratios = sorted({r["ratio"] for r in rows})
    notes: list[str] = []
    lines = []
    if dense is not None:
        lines += [f"Dense model: perplexity **{dense:.2f}**. Cells: perplexity (change vs dense); ratio = fraction "
                  "of routed-expert parameters removed.", ""]
    lines += ["| method | " + " | ".join(f"{x:g}" for x in ratios) + " |", "|---" * (len(ratios) + 1) + "|"]
    for name, series in _series(rows).items():
        cells = {r["ratio"]: r for r in series}
        out = []
        for x in ratios:
            r = cells.get(x)
            if r is None or r["status"] == "missing":
                out.append("–")
            elif r["status"] == "infeasible":
                notes.append(f"{name} at {x:g}: {r['reason'] or 'infeasible'}")
                out.append(f"infeasible[^{len(notes)}]")
            else:
                delta = f" ({100 * (r['ppl'] / dense - 1):+.1f}%)" if dense else ""
                out.append(f"{r['ppl']:.2f}{delta}")
        lines.append(f"| {name} | " + " | ".join(out) + " |")
    if notes:
        lines += [""] + [f"[^{i}]: {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines)


def plot(result: dict, png: str | Path, title: str = "Held-out perplexity vs compression ratio",
         clip: float = 3.0) -> Path:
    """Perplexity (log scale) vs achieved ratio, one line per method; ablation variants dashed.

    The y axis stops at ``clip`` × the dense perplexity; points above it are drawn on the top edge with their value,
    so one collapsed configuration does not flatten the others.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=150)
    markers = "osD^vP*Xh<>"
    dense = result["dense_ppl"]
    series = {}
    for name, rows in _series(result["rows"]).items():
        pts = sorted((r["achieved_ratio"] if r["achieved_ratio"] is not None else r["ratio"], r["ppl"])
                     for r in rows if r["status"] == "ok")
        if pts:
            series[name] = pts
    ys = [y for pts in series.values() for _, y in pts] + ([dense] if dense is not None else [])
    lo, hi = (min(ys), max(ys)) if ys else (1.0, 10.0)
    top = min(hi, clip * dense) * 1.08 if dense is not None else hi * 1.08
    stacked: dict[float, int] = {}  # off-scale labels already placed at each x
    for i, (name, pts) in enumerate(series.items()):
        ablation = "(" in name
        line, = ax.plot(*zip(*pts), marker=markers[i % len(markers)], linestyle="--" if ablation else "-",
                        linewidth=1.2 if ablation else 2.0, markersize=4 if ablation else 6, label=name,
                        color="black" if name == "svd" else None)
        for x, y in pts:
            if y > top:
                k = stacked[round(x, 2)] = stacked.get(round(x, 2), -1) + 1
                ax.plot([x], [top], marker="^", color=line.get_color(), markersize=7, clip_on=False)
                ax.annotate(f"{y:.0f}", (x, top), textcoords="offset points", xytext=(6, -10 - 9 * k), fontsize=7,
                            color=line.get_color())
    if dense is not None:
        ax.axhline(dense, color="gray", linestyle=":", linewidth=1.5, label=f"dense ({dense:.2f})")
    ax.set_yscale("log")
    ax.set_ylim(lo / 1.03, top)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if _nice(v) else ""))
    ax.set_xlabel("compression ratio (fraction of routed-expert parameters removed)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if len(series) > 6:  # many variants: legend beside the axes, in columns of at most 20 entries
        cols = math.ceil((len(series) + 1) / 20)
        fig.set_size_inches(7.5 + 2.6 * cols, max(4.8, 0.19 * min(len(series) + 1, 20) + 1.2))
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncols=cols)
    else:
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png)
    plt.close(fig)
    return png


def _nice(v: float) -> bool:
    """Label minor log ticks 20, 30, 50, 200, ... but not every one."""
    if v <= 0:
        return False
    lead = v / 10 ** math.floor(math.log10(v) + 1e-9)
    return round(lead, 6) in (1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.0)


def compare(runs: list[str | Path], out_dir: str | Path = ".", name: str = "comparison", text=None,
            backend: str = "auto", variants: str = "default", title: str | None = None) -> dict:
    """Write ``<name>.md``, ``<name>.json`` and ``<name>.png`` under ``out_dir``; returns the JSON content."""
    result = collect(runs, text, backend, variants)
    if not result["rows"]:
        raise ValueError("nothing to compare: the runs hold no compressed results" +
                         (" (only ablation variants? pass --variants all)" if variants == "default" else ""))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result["markdown"] = markdown(result)
    (out / f"{name}.md").write_text(result["markdown"] + "\n")
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / f"{name}.png", **({"title": title} if title else {}))
    result["files"] = [str(out / f"{name}.{ext}") for ext in ("md", "json", "png")]
    return result
