"""Quality sweep on the shared fixture: convert at several ratios, measure held-out perplexity, record JSON.

    python benchmarks/quality.py --method mobe --ratios 0.2 0.3 0.4 [--variant NAME -o key=value ...]
        [--fixture qwen3-moe-perldocs]

Every run uses the same calibration (fixtures/.../calib.txt, 128 × 256 tokens, seed 42, float32 factors) and the
same evaluation (first 16,384 tokens of eval.txt in 256-token windows), so rows compare across methods. Results
are upserted into benchmarks/results/quality_<method>.json (another ``--fixture``: results/<fixture>/), keyed by
(variant, ratio), under a file lock (parallel
sweeps of one method keep each other's rows); a markdown table of the file (with the svd baseline and the dense
model beside it) is printed. A ratio the method refuses is recorded as ``"status": "infeasible"`` with its reason.
Each row also records the conversion's CPU time and peak RSS. ``--backend vllm`` scores through vLLM prompt
logprobs (``moe-eval ppl``'s default) instead of transformers on the dense export (tests/test_eval.py: the two
agree within 0.5%; on the dense fixture and an svd checkpoint they gave identical values to 5 decimals).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "qwen3-moe-pydocs"
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache"
CALIB = ["--calib-data", str(FIXTURE / "calib.txt"), "--num-samples", "128", "--seq-len", "256", "--seed", "42",
         "--dtype", "float32"]
DENSE_PPL_KEY = "dense"
DEFAULT_FIXTURE = FIXTURE


def set_fixture(name: str | Path) -> Path:
    """Point every step of this module at another bundled fixture (a folder name under fixtures/ or a path): its
    calib.txt and eval.txt, and results in benchmarks/results/<fixture name>/ (the first fixture's stay where they
    were)."""
    global FIXTURE, RESULTS, CACHE, CALIB
    path = Path(name) if Path(name).is_dir() else ROOT / "fixtures" / str(name)
    if not (path / "config.json").is_file():
        raise SystemExit(f"quality.py: error: --fixture {name}: no fixture there ({path}/config.json missing)")
    FIXTURE = path.resolve()
    sub = "" if FIXTURE == DEFAULT_FIXTURE else FIXTURE.name
    RESULTS = ROOT / "benchmarks" / "results" / sub if sub else ROOT / "benchmarks" / "results"
    CACHE = ROOT / "benchmarks" / ".cache" / sub if sub else ROOT / "benchmarks" / ".cache"
    CALIB = ["--calib-data", str(FIXTURE / "calib.txt"), *CALIB[2:]]
    return FIXTURE


def machine() -> str:
    """The machine in words: CPU model, cores, RAM, OS, Python and torch versions."""
    cpu = platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu += " " + line.split(":", 1)[1].strip()
                break
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        import torch

        tv = f", torch {torch.__version__}"
    except ImportError:
        tv = ""
    return (f"{cpu}, {os.cpu_count()} CPU cores, {ram:.0f} GiB RAM, {platform.system()} {platform.release()}, "
            f"{platform.python_implementation()} {platform.python_version()}{tv}")


def measured_run(cmd: list[str], log: Path | None = None) -> dict:
    """Run ``[sys.executable, -m|-c, ...]``; {returncode, stderr, wall_s, cpu_s (user+sys), peak_rss_bytes} of that
    process alone (peak RSS from its own VmHWM: rusage would include this parent's, see peak_rss.py)."""
    if cmd[0] != sys.executable or cmd[1] not in ("-m", "-c"):
        raise ValueError(f"measured_run runs Python modules or code (python -m/-c), got {cmd[:2]}")
    t0 = time.time()
    with tempfile.NamedTemporaryFile(suffix=".peak") as peak, open(log or os.devnull, "w") as err:
        proc = subprocess.Popen([cmd[0], str(ROOT / "benchmarks" / "peak_rss.py"), peak.name, *cmd[1:]],
                                stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        peak_bytes = int(Path(peak.name).read_text() or 0)
    return {"returncode": os.waitstatus_to_exitcode(status), "stderr": log.read_text() if log else "",
            "wall_s": time.time() - t0, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_bytes": peak_bytes}


def convert_cmd(method: str, ratio: float, out: Path, options: list[str], src: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "vllm_moe_lowrank.converters.cli", "--method", method, "--ratio", str(ratio),
           str(src or FIXTURE), str(out), "--overwrite", *CALIB]
    for o in options:
        cmd += ["-o", o]
    return cmd


def refusal(stderr: str) -> str | None:
    """The converter's own message when it refused the ratio as infeasible (exit 2), else None."""
    for line in stderr.splitlines()[::-1]:
        if line.startswith("moe-convert: error:") and "infeasible" in line:
            return line.removeprefix("moe-convert: error:").strip()
    return None


def score(ckpt: Path, backend: str = "transformers") -> float:
    """Held-out perplexity of a checkpoint with the fixed protocol (vLLM: in its own process)."""
    from vllm_moe_lowrank.evaluation.perplexity import perplexity

    if backend != "vllm":
        return perplexity(ckpt, FIXTURE / "eval.txt", backend=backend)["ppl"]
    CACHE.mkdir(parents=True, exist_ok=True)
    tag = f"{ckpt.name}-{os.getpid()}"
    res, log = CACHE / f"{tag}.ppl.json", CACHE / f"{tag}.ppl.log"
    with open(log, "w") as f:  # one vLLM engine per process is what vLLM supports well
        rc = subprocess.run([sys.executable, "-m", "vllm_moe_lowrank.evaluation.cli", "ppl", str(ckpt), "--text",
                             str(FIXTURE / "eval.txt"), "--backend", "vllm", "--out", str(res)],
                            stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        raise RuntimeError(f"moe-eval ppl {ckpt} --backend vllm failed (exit {rc}):\n{log.read_text()[-3000:]}")
    ppl = json.loads(res.read_text())["ppl"]
    res.unlink()
    log.unlink()
    return ppl


def convert(method: str, ratio: float, out: Path, options: list[str] = ()) -> dict:
    """Convert the fixture into ``out`` in its own process, measured: {achieved_ratio, convert_s, convert_cpu_s,
    peak_rss_mb}, or {status: infeasible, reason} when the method refuses the ratio (its own stated limit)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_name(out.name + ".log")
    run = measured_run(convert_cmd(method, ratio, out, list(options)), log)
    log.unlink()
    if run["returncode"]:
        reason = refusal(run["stderr"])
        if reason is None:
            raise RuntimeError(f"moe-convert {method} --ratio {ratio} failed (exit {run['returncode']}):\n"
                               f"{run['stderr'][-3000:]}")
        return {"status": "infeasible", "reason": reason}
    report = json.loads((out / "moe_lowrank_report.json").read_text())
    return {"achieved_ratio": round(report["achieved_ratio"], 5), "convert_s": round(run["wall_s"], 1),
            "convert_cpu_s": round(run["cpu_s"], 1), "peak_rss_mb": round(run["peak_rss_bytes"] / 2**20)}


def run_one(method: str, ratio: float, variant: str, options: list[str], backend: str = "transformers",
            work: Path | None = None) -> dict:
    """Convert the fixture and measure held-out perplexity; an infeasible ratio gives a row saying so."""
    out = (work or CACHE) / f"{method}-{variant}-{ratio}"
    row = {"method": method, "variant": variant, "options": options, "ratio": ratio,
           **convert(method, ratio, out, options)}
    if CALIB[3] != "128":
        row["calib_samples"] = int(CALIB[3])
    if row.get("status") == "infeasible":
        return row
    t0 = time.time()
    row["ppl"] = round(score(out, backend), 4)
    row["eval_s"] = round(time.time() - t0, 1)
    row["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if backend != "transformers":
        row["backend"] = backend
    shutil.rmtree(out)
    return row


@contextlib.contextmanager
def locked(results: Path | None = None):
    """Exclusive lock over the result files' read-modify-write (parallel sweeps)."""
    results = results or RESULTS
    results.mkdir(parents=True, exist_ok=True)
    with open(results / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def upsert(method: str, row: dict, results: Path | None = None) -> None:
    """Insert or replace the row of (variant, ratio) in quality_<method>.json, re-reading the file under the lock."""
    results = results or RESULTS
    with locked(results):
        data = load(method, results)
        data["rows"] = [r for r in data["rows"] if (r["variant"], r["ratio"]) != (row["variant"], row["ratio"])]
        data["rows"].append(row)
        data["machine"] = machine()
        data["fixture"] = FIXTURE.name
        f = results / f"quality_{method}.json"
        tmp = f.with_name(f.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, f)


def load(method: str, results: Path | None = None) -> dict:
    f = (results or RESULTS) / f"quality_{method}.json"
    return json.loads(f.read_text()) if f.is_file() else {"method": method, "rows": []}


def dense_ppl() -> float:
    f = RESULTS / "quality_dense.json"
    if not f.is_file():
        from vllm_moe_lowrank.evaluation.perplexity import perplexity

        ppl = perplexity(FIXTURE, FIXTURE / "eval.txt", backend="transformers")["ppl"]
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"ppl": round(ppl, 4), "machine": machine(), "fixture": FIXTURE.name}, indent=2)
                     + "\n")
    return json.loads(f.read_text())["ppl"]


def table(method: str) -> str:
    rows = load(method)["rows"]
    base = {r["ratio"]: r["ppl"] for r in load("svd")["rows"] if r["variant"] == "default" and "ppl" in r}
    lines = [f"dense fixture ppl: {dense_ppl():.2f}", "",
             "| method | variant | ratio | achieved | ppl | svd ppl | convert s |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["variant"] != "default", r["variant"], r["ratio"])):
        b = base.get(r["ratio"])
        if r.get("status") == "infeasible":
            lines.append(f"| {r['method']} | {r['variant']} | {r['ratio']} | infeasible | - | - | - |")
            continue
        lines.append(f"| {r['method']} | {r['variant']} | {r['ratio']} | {r['achieved_ratio']:.4f} | {r['ppl']:.2f} "
                     f"| {'-' if b is None else f'{b:.2f}'} | {r['convert_s']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8])
    ap.add_argument("--variant", default="default", help="name of this configuration (ablation) in the table")
    ap.add_argument("-o", "--option", dest="options", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--fixture", default=DEFAULT_FIXTURE.name,
                    help="bundled fixture (folder under fixtures/ or a path); results of another than the first go "
                         "to benchmarks/results/<fixture>/")
    ap.add_argument("--calib-samples", type=int, default=128,
                    help="calibration sequences of 256 tokens (a smaller protocol is recorded in each row)")
    a = ap.parse_args()
    set_fixture(a.fixture)
    CALIB[3] = str(a.calib_samples)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not a.table_only:
        for ratio in a.ratios:
            row = run_one(a.method, ratio, a.variant, a.options, a.backend)
            upsert(a.method, row)
            print(json.dumps(row), flush=True)
    print(table(a.method))


if __name__ == "__main__":
    main()
