"""Shared fixtures. vLLM tests (``@pytest.mark.vllm``) are skipped when vLLM is not installed."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
# vLLM's spawned engine/worker processes must find tests/vllm_probe.py (LLM.apply_model) and use little memory
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # LLM.apply_model with an importable function

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def _import_triton_interpreted() -> None:
    """Without CUDA the Triton kernels are tested under Triton's interpreter, which must be on when Triton itself
    is first imported; vLLM imports Triton in-process (test_plugin runs before test_triton_kernels), so import it
    here first. The variable is restored at once: vLLM subprocesses never see it."""
    import torch

    if importlib.util.find_spec("triton") is None or torch.cuda.is_available() or "triton" in sys.modules:
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


_import_triton_interpreted()


def pytest_collection_modifyitems(config, items):
    if HAVE_VLLM:
        return
    skip = pytest.mark.skip(reason="vLLM is not installed")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def case_root(tmp_path_factory) -> Path:
    from vllm_cases import cache_dir

    return cache_dir(tmp_path_factory.mktemp("moe-lowrank-cases"))


@pytest.fixture(scope="session")
def checkpoints(case_root):
    """checkpoints(name) -> (compressed, dense export); built once per session."""
    from vllm_cases import build_case

    return lambda name: build_case(name, case_root)


@pytest.fixture(scope="session")
def hf_refs(case_root):
    """hf_refs(name) -> prompts and transformers' greedy tokens on the dense export; computed once."""
    from vllm_cases import references

    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = references(name, case_root)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """tiny_models(model_type) -> the folder of model_factory's tiny random model, built once per session."""
    from model_factory import make_tiny_model

    built: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            built[model_type] = make_tiny_model(model_type, tmp_path_factory.mktemp(model_type) / "model")
        return built[model_type]

    return get
