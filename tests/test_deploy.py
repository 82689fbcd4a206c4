"""Deploy files: real linters (hadolint, shellcheck, the compose-spec schema) and consistency between the
Dockerfiles, docker-compose.yml, the Makefile, scripts/demo.sh and the docs. Fast: no Docker engine, no vLLM.

The linters come from the `dev` extra (PyPI wheels that carry their binaries / schema). Missing ones fail under CI
(CI=true) and are skipped elsewhere, with the install command in the message.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile import exec_form, only

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cpu"]
SHELL_SCRIPTS = ["deploy/install-cpu.sh", "scripts/demo.sh", ".ci/run", "tests/fakes/bin/vllm",
                 "tests/fakes/bin/moe-convert"]
HEALTHCHECK_IN_IMAGE = "/opt/moe-lowrank/healthcheck.py"
TOOL_PATH = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def tool(name: str) -> str:
    found = shutil.which(name, path=TOOL_PATH)
    if found is None:
        msg = f"{name} not installed: pip install -e '.[dev]' (or make venv)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return found


def run_tool(*cmd: str) -> subprocess.CompletedProcess:
    # PATH includes the venv's bin: hadolint runs shellcheck on RUN instructions when it finds it there.
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": TOOL_PATH})


def load_compose() -> dict:
    yaml = pytest.importorskip("yaml", reason="pyyaml is in the dev extra")
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def demo_serve_argv() -> list[str]:
    """The `vllm serve ...` command of scripts/demo.sh, continuation lines joined, tokenised."""
    text = (ROOT / "scripts" / "demo.sh").read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if line.strip().startswith("vllm serve")]
    assert len(lines) == 1, "scripts/demo.sh must start the server with exactly one `vllm serve` line"
    return shlex.split(lines[0].split(">")[0])


# ----- linters ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    proc = run_tool(tool("hadolint"), str(dockerfile.relative_to(ROOT)))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_really_lints():
    """Guard against a linter that passes everything: a known-bad Dockerfile must fail."""
    proc = subprocess.run([tool("hadolint"), "-"], input="FROM vllm/vllm-openai:latest\nRUN pip install foo\n",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3007" in proc.stdout and "DL3013" in proc.stdout


def test_shellcheck():
    proc = run_tool(tool("shellcheck"), *SHELL_SCRIPTS)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_file_matches_the_compose_spec_schema():
    proc = run_tool(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "deploy/docker-compose.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_schema_is_vendored_not_downloaded():
    check_jsonschema = pytest.importorskip("check_jsonschema", reason="the dev extra installs check-jsonschema")
    vendored = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(vendored.read_text())
    assert schema["title"] == "Compose Specification"
    remote = re.findall(r'"\$ref":\s*"(https?:[^"]+)"', vendored.read_text())
    assert remote == [], f"the vendored compose schema refers to remote schemas: {remote}"


def test_compose_schema_rejects_a_broken_file(tmp_path):
    bad = tmp_path / "compose.yml"
    bad.write_text((DEPLOY / "docker-compose.yml").read_text().replace("    ipc: host  #", "    ipcc: host  #"))
    proc = run_tool(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(bad))
    assert proc.returncode != 0 and "ipcc" in proc.stdout


# ----- the images ------------------------------------------------------------------------------------------------
def test_every_base_image_is_pinned():
    for dockerfile in DOCKERFILES:
        for image in only(dockerfile, "FROM"):
            name = image.split()[0]
            assert ":" in name and not name.endswith(":latest") and "$" not in name, f"{dockerfile.name}: {name}"


def test_gpu_image_is_vllm_033_with_the_plugin_only():
    dockerfile = DEPLOY / "Dockerfile"
    assert only(dockerfile, "FROM") == ["vllm/vllm-openai:v0.33.0"]
    runs = " ".join(only(dockerfile, "RUN"))
    assert re.search(r"pip install [^&]*--no-deps /tmp/vllm-moe-lowrank", runs)
    # The base image's ENTRYPOINT (`vllm serve`) is kept, so `docker run IMAGE <model> --quantization ...` works.
    assert only(dockerfile, "ENTRYPOINT") == [] and only(dockerfile, "CMD") == []


def test_cpu_image_uses_the_one_install_script_and_vllm_serve():
    dockerfile = DEPLOY / "Dockerfile.cpu"
    runs = only(dockerfile, "RUN")
    assert any(args.startswith("bash deploy/install-cpu.sh") for args in runs)
    assert not any("pip install" in args for args in runs), "installs go through deploy/install-cpu.sh only"
    entrypoint = exec_form(only(dockerfile, "ENTRYPOINT")[0])
    assert entrypoint == ["vllm", "serve"]
    assert only(dockerfile, "CMD") == []
    # What scripts/demo.sh runs is the image's entrypoint plus arguments.
    argv = demo_serve_argv()
    assert argv[:2] == entrypoint
    assert argv[argv.index("--quantization") + 1] == "moe_lowrank"


def test_makefile_venv_runs_the_same_install_script():
    makefile = (ROOT / "Makefile").read_text()
    assert "bash deploy/install-cpu.sh --editable --extras dev" in makefile
    assert "pip install" not in makefile


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_carry_the_healthcheck_the_compose_file_calls(dockerfile):
    runs = " ".join(only(dockerfile, "RUN"))
    assert f"deploy/healthcheck.py {HEALTHCHECK_IN_IMAGE}" in runs
    (health,) = only(dockerfile, "HEALTHCHECK")
    assert exec_form(health.split(" CMD ", 1)[1]) == ["python3", HEALTHCHECK_IN_IMAGE]


def test_dockerignore_keeps_what_the_install_needs():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for needed in ("pyproject.toml", "README.md", "deploy", "vllm_moe_lowrank", "converters", "kernels"):
        assert needed not in ignored
    assert {".venv", ".git", "demo-out"} <= ignored


# ----- docker-compose.yml ----------------------------------------------------------------------------------------
def test_compose_convert_then_serve():
    services = load_compose()["services"]
    convert, serve = services["convert"], services["serve"]

    assert convert["entrypoint"] == ["moe-convert"]
    args = [str(a) for a in convert["command"]]
    for flag in ("--method", "--ratio", "--calib-data", "--overwrite"):
        assert flag in args
    positional = [a for i, a in enumerate(args) if not a.startswith("--") and not args[i - 1].startswith("--")]
    out_dir = positional[1]
    assert any(v.endswith(":/models/out") and not v.endswith(":ro") for v in convert["volumes"])
    assert convert["restart"] == "no"

    cmd = [str(a) for a in serve["command"]]
    assert cmd[0] == out_dir, "serve must load what convert wrote"
    assert "serve" not in cmd, "the image's entrypoint is already `vllm serve`"
    assert cmd[cmd.index("--quantization") + 1] == "moe_lowrank"
    assert serve["depends_on"]["convert"]["condition"] == "service_completed_successfully"
    assert serve.get("ipc") == "host" or "shm_size" in serve


def test_compose_probes_and_gpus():
    compose = load_compose()
    serve = compose["services"]["serve"]
    test = serve["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python3", HEALTHCHECK_IN_IMAGE]
    assert "start_period" in serve["healthcheck"]
    health = (DEPLOY / "healthcheck.py").read_text()
    assert "/v1/models" in health and "/health" in health
    for name in ("convert", "serve"):
        devices = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        assert compose["services"][name]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert "compressed" in compose["volumes"]


# ----- docs and CI -----------------------------------------------------------------------------------------------
def docker_run_commands(text: str) -> list[list[str]]:
    joined = text.replace("\\\n", " ")
    return [shlex.split(line.strip()) for line in joined.splitlines() if line.strip().startswith("docker run ")]


def test_deploy_doc_commands_match_the_images():
    doc = (ROOT / "docs" / "deploy.md").read_text()
    runs = docker_run_commands(doc)
    assert runs, "docs/deploy.md shows no `docker run` command"
    for argv in runs:
        image = next(a for a in argv if a.startswith("vllm-moe-lowrank:"))
        if "--entrypoint" in argv[:argv.index(image)]:
            continue  # moe-convert or ray, not the server
        after = argv[argv.index(image) + 1:]
        assert after and after[0] != "serve", f"`serve` is already the entrypoint: {' '.join(argv)}"
        assert after[after.index("--quantization") + 1] == "moe_lowrank", " ".join(argv)
        assert "--ipc=host" in argv or any(a.startswith("--shm-size") for a in argv), " ".join(argv)
    for needed in ("deploy/Dockerfile.cpu", "docker-compose.yml", "--tensor-parallel-size", "--enable-expert-parallel",
                   "Ray", "--pipeline-parallel-size"):
        assert needed in doc


def test_install_doc_names_the_install_paths():
    doc = (ROOT / "docs" / "install.md").read_text()
    for needed in ("make venv", "deploy/install-cpu.sh", "python -m vllm_moe_lowrank.cpu_install",
                   "pip install vllm-moe-lowrank", "torchvision", "+cpu"):
        assert needed in doc


def test_ci_script_runs_make_test():
    ci = ROOT / ".ci" / "run"
    assert os.access(ci, os.X_OK)
    text = ci.read_text()
    assert "set -euo pipefail" in text and "make test" in text
    for script in SHELL_SCRIPTS:
        assert os.access(ROOT / script, os.X_OK), f"{script} is not executable"
