"""Where a MoE layer is fitted: in the converter's own process (``SerialFitter``) or as a Ray task (``RayFitter``,
``moe-convert --ray [auto|ADDRESS]``).

Both run the same function, ``layer_fit.fit_layer`` (method fit, cast through the format, report errors), on the
same inputs — the layer's original experts and its ``LayerCalibration`` — so the output is byte-identical: methods
seed per layer, and a Ray task uses the driver's intra-op thread count (BLAS reductions depend on it). The driver
keeps the sequential part: the calibration forward pass (hidden states layer by layer), the re-run of a layer with
its compressed experts (``--propagate compressed``), writing shards and the resumable progress.

A task gets only what it needs: the options (small), the plan of a plan-pass method, the layer index, and its
``LayerCalibration`` through Ray's object store; the expert weights it reads itself from ``--checkpoint`` on a
filesystem every node sees (``--ray-transfer path``, default), or receives through the object store
(``--ray-transfer object-store``, no shared filesystem). It returns the layer's cast tensors and report entry.
Ray retries a task whose worker dies (``max_retries``); the retry recomputes the same bytes. See
docs/distributed.md.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .errors import ConvertError

FitResult = dict[str, Any]  # {"spec": layer spec JSON or None (kept dense), "tensors": {name: tensor}, "report": {...}}
_CRASH_ENV = "MOE_CONVERT_RAY_CRASH_ONCE"  # fault injection for tests: "MARKER_FILE:LAYER" kills that task's worker


class SerialFitter:
    """Fit each layer at once, in this process (the default)."""

    capacity = 0  # layers whose fit may be in flight while the driver moves on

    def __init__(self, fit):
        self.fit = fit  # Callable[[layer, ExpertWeights | None, LayerCalibration | None], FitResult]

    def submit(self, layer: int, weights, calib, split: bool = False) -> FitResult:
        return self.fit(layer, weights, calib)

    def result(self, handle: FitResult) -> FitResult:
        return handle

    def wait_any(self, handles: dict[int, Any]) -> int:
        """A layer of ``handles`` (layer -> handle) whose fit is ready."""
        return min(handles)

    def close(self) -> None:
        pass


def _ray():
    try:
        import ray
    except ImportError:
        raise ConvertError("--ray needs Ray: pip install 'vllm-moe-lowrank[ray]'") from None
    return ray


def check_cluster(opts) -> None:
    """Before any work: Ray is installed and a ``--ray HOST:PORT`` answers (ray.init would retry for minutes)."""
    import socket

    if not opts.ray:
        return
    _ray()
    if opts.device.startswith("cuda:"):
        raise ConvertError(f"--device {opts.device} --ray: use --device cuda; Ray gives each task its own GPU")
    host, _, port = opts.ray.removeprefix("ray://").rpartition(":")
    if opts.ray == "auto" or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as err:
        raise ConvertError(f"--ray {opts.ray}: nothing answers there ({err.strerror or err}); start the head with "
                           f"`ray start --head --port={port}` or pass --ray auto for a local cluster") from None


class RayFitter:
    """Fit layers as Ray tasks: one CPU (``--device cpu``) or one GPU (``--device cuda``) each, retried when their
    worker dies. ``capacity`` (the cluster's slots) layers may be in flight."""

    def __init__(self, opts, plan: dict | None, method=None):
        ray = _ray()
        self.ray = ray
        address = None if opts.ray == "auto" else opts.ray
        env = {"OMP_WAIT_POLICY": "PASSIVE"}
        if os.environ.get(_CRASH_ENV):
            env[_CRASH_ENV] = os.environ[_CRASH_ENV]
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False,
                     runtime_env={"env_vars": env})
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise ConvertError(f"--ray {opts.ray}: cannot join a Ray cluster ({str(err).splitlines()[0]}); start "
                               f"one with `ray start --head` or pass --ray auto for a local one") from None
        gpu = opts.device.startswith("cuda")
        resources = ray.cluster_resources()
        slots = int(resources.get("GPU" if gpu else "CPU", 0))
        if slots < 1:
            raise ConvertError(f"--ray {opts.ray} --device {opts.device}: the cluster has no "
                               f"{'GPU' if gpu else 'CPU'} to run tasks on")
        self.capacity = slots
        options = dict(num_cpus=0 if gpu else 1, num_gpus=1 if gpu else 0, max_retries=3)
        self.task = ray.remote(**options)(_fit_task)
        self.part_task = ray.remote(**options)(_part_task)
        self.experts = method.arch.num_experts if method is not None and method.splits_experts else 0
        self.opts_json = opts.model_dump_json()
        self.plan = plan
        self.transfer = opts.ray_transfer
        self.threads = torch.get_num_threads()
        self.ids: dict[Any, int] = {}

    def submit(self, layer: int, weights, calib, split: bool = False):
        """The layer's fit task; with ``split`` (and a method that splits by experts) preceded by one task per
        expert group (as many groups as the cluster has slots), whose results the fit task merges."""
        if self.transfer == "object-store" and weights is None:
            weights = self._load(layer)
        w = self.ray.put(weights) if self.transfer == "object-store" else None
        c = None if calib is None else self.ray.put(calib)
        args = (self.opts_json, self.plan, layer, w, c, self.threads)
        parts = []
        if split and self.experts and self.capacity > 1:
            groups = [g.tolist() for g in torch.arange(self.experts).tensor_split(min(self.capacity, self.experts))]
            parts = [self.part_task.remote(*args, g) for g in groups]
        handle = self.task.remote(*args, *parts)
        self.ids[handle] = layer
        return handle

    def _load(self, layer: int):
        from .experts import load_expert_weights

        ckpt, arch, _, _ = _context(self.opts_json, self.plan)
        return load_expert_weights(ckpt, arch, layer)

    def result(self, handle) -> FitResult:
        layer = self.ids.pop(handle, "?")
        try:
            return self.ray.get(handle)
        except self.ray.exceptions.RayTaskError as err:  # the task raised: the converter's own error, one line
            if isinstance(err.cause, ConvertError):
                raise err.cause from None
            raise ConvertError(f"--ray: the fit of layer {layer} failed on a worker: "
                               f"{type(err.cause).__name__}: {str(err.cause).splitlines()[0]}") from None
        except self.ray.exceptions.RayError as err:  # worker lost beyond max_retries, object lost, node died
            raise ConvertError(f"--ray: the fit of layer {layer} failed after Ray's retries: "
                               f"{str(err).strip().splitlines()[0]}") from None

    def wait_any(self, handles: dict[int, Any]) -> int:
        layers = sorted(handles)
        ready, _ = self.ray.wait([handles[l] for l in layers], num_returns=1)
        return next(l for l in layers if handles[l] == ready[0])

    def close(self) -> None:
        self.ray.shutdown()


_CONTEXT: dict[str, Any] = {}  # per worker process: (checkpoint, adapter, method, output dtype) of the current run


def _context(opts_json: str, plan: dict | None):
    """The run's checkpoint, adapter, method and output dtype, built once per worker process and run."""
    from . import pipeline

    key = opts_json + repr(plan)
    if key not in _CONTEXT:
        _CONTEXT.clear()
        opts = pipeline.ConvertOptions.model_validate_json(opts_json)
        ckpt, arch = pipeline._open_source(opts)
        method = pipeline._make_method(opts, arch, ckpt)
        if plan is not None:
            method.load_plan(plan)
        _CONTEXT[key] = (ckpt, arch, method, pipeline._out_dtype(opts, ckpt))
    return _CONTEXT[key]


def _task_inputs(opts_json: str, plan: dict | None, layer: int, weights, threads: int):
    from .experts import load_expert_weights

    torch.set_num_threads(threads)
    _maybe_crash(layer)
    ckpt, arch, method, out_dtype = _context(opts_json, plan)
    if weights is None:  # --ray-transfer path: read the layer's experts from the (shared) checkpoint folder
        weights = load_expert_weights(ckpt, arch, layer)
    return arch, method, out_dtype, weights


def _fit_task(opts_json: str, plan: dict | None, layer: int, weights, calib, threads: int, *parts) -> FitResult:
    """Ray task: fit one MoE layer exactly as the serial converter does (from expert-group ``parts`` if given)."""
    from .layer_fit import fit_layer

    arch, method, out_dtype, weights = _task_inputs(opts_json, plan, layer, weights, threads)
    return fit_layer(arch, method, layer, weights, calib, out_dtype, list(parts) or None)


def _part_task(opts_json: str, plan: dict | None, layer: int, weights, calib, threads: int, experts: list[int]):
    """Ray task: the per-expert part of one layer's fit for a group of experts (Method.fit_experts)."""
    _, method, _, weights = _task_inputs(opts_json, plan, layer, weights, threads)
    return method.fit_experts(layer, experts, weights, calib)


def _maybe_crash(layer: int) -> None:
    """Fault injection (tests/test_ray.py): the first task of ``LAYER`` kills its worker process, once."""
    spec = os.environ.get(_CRASH_ENV)
    if not spec:
        return
    marker, _, target = spec.rpartition(":")
    if int(target) == layer and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os._exit(1)


def make_fitter(opts, plan: dict | None, fit, method=None):
    """``fit(layer, weights, calib)`` in this process, or Ray tasks running the same (``method``: whether its layers
    split into expert groups)."""
    return RayFitter(opts, plan, method) if opts.ray else SerialFitter(fit)


def _slots(opts) -> tuple[int, str]:
    """(workers a fit can run on, where the number comes from): the cluster's GPUs or CPUs, else this machine's."""
    gpu = opts.device.startswith("cuda")
    try:
        ray = _ray()
        ray.init(address=None if opts.ray == "auto" else opts.ray, ignore_reinit_error=True, log_to_driver=False,
                 include_dashboard=False)
        n = int(ray.cluster_resources().get("GPU" if gpu else "CPU", 0))
        ray.shutdown()
        return n, f"ray cluster {opts.ray}"
    except (ConvertError, ConnectionError, ValueError, RuntimeError):
        return (torch.cuda.device_count() if gpu else os.cpu_count() or 1), "this machine (no Ray cluster reached)"


def task_graph(opts, ckpt, arch, method) -> dict[str, Any]:
    """``--dry-run --ray``: the tasks, their memory, and the wall time on N workers from one measured layer.

    Measures the first MoE layer as the converter runs it (calibration forward through the layers before it,
    then its forward and its fit) and projects: with ``--propagate compressed`` and calibration a layer's fit
    waits for the previous one (1 task in flight; the driver re-runs the layer on the written experts); data-free
    methods and ``--propagate dense`` keep up to N fits in flight while the driver's forward moves on."""
    import math
    import time

    from . import pipeline
    from .experts import load_expert_weights
    from .layer_fit import fit_layer
    from .runner import LayerRunner

    if method.needs_plan_pass:  # its per-layer budgets exist only after a pass over every layer
        raise ConvertError(f"--dry-run --ray: --method {opts.method} plans over all layers first, so one layer "
                           f"cannot be measured alone; run it without --ray to see the plan")
    first = arch.moe_layers[0]
    out_dtype = pipeline._out_dtype(opts, ckpt)
    hidden, runner, fwd_s = [], None, 0.0
    if method.needs_calibration:
        runner = LayerRunner(ckpt, arch, opts.device, trust_remote_code=opts.trust_remote_code)
        hidden = [runner.embed(b) for b in pipeline._calibration_batches(opts, ckpt)]
        for layer in range(first):
            w = load_expert_weights(ckpt, arch, layer) if layer in arch.moe_layers else None
            hidden, _, _ = pipeline._forward_layer(runner, arch, layer, w, hidden)
    weights = load_expert_weights(ckpt, arch, first)
    t0 = time.time()
    _, calib, _ = pipeline._forward_layer(runner, arch, first, weights, hidden, opts.calib_options())
    fwd_s = time.time() - t0 if runner else 0.0
    t0 = time.time()
    parts = [method.fit_experts(first, list(range(arch.num_experts)), weights, calib)] if method.splits_experts \
        else None
    parts_s = time.time() - t0  # the per-expert share of the fit: split over N workers when sequential
    fit_layer(arch, method, first, weights, calib, out_dtype, parts)
    fit_s = time.time() - t0

    n, m, E, L = arch.hidden_size, arch.intermediate_size, arch.num_experts, len(arch.moe_layers)
    tokens = calib.num_tokens if calib is not None else 0
    k = calib.topk_ids.shape[1] if calib is not None else 0
    weight_b = 3 * E * n * m * weights.gate.element_size()
    calib_b = tokens * (n * 4 + k * 12)
    out_b = round((1 - opts.ratio) * 3 * E * n * m * out_dtype.itemsize)
    work_b = (n * n + m * m) * 8 * 3 + 2 * 3 * n * m * 8  # one expert's float64 Grams, factors, SVD work
    task_b = weight_b + calib_b + out_b + work_b + 1.0e9  # + torch in the worker process
    sequential = runner is not None and opts.propagate == "compressed"
    workers, source = _slots(opts)
    dense_layers = arch.num_layers - L

    split = sequential and method.splits_experts

    def wall(w: int) -> float:
        if sequential:  # forward, fit (its per-expert part on w workers), re-run on the written experts
            fit = fit_s - parts_s + math.ceil(arch.num_experts / min(w, arch.num_experts)) / arch.num_experts * \
                parts_s if split else fit_s
            return arch.num_layers * fwd_s + L * (fit + fwd_s)
        return max(arch.num_layers * fwd_s, math.ceil(L / w) * fit_s) + min(fwd_s, fit_s)

    groups = min(workers, arch.num_experts) if split and workers > 1 else 0
    return {"tasks": [{"layer": l, "tasks": groups + 1, "expert_groups": groups,
                       "resources": {"GPU" if opts.device.startswith("cuda") else "CPU": 1},
                       "after": (l - 1 if sequential and l > first else None)} for l in arch.moe_layers],
            "dense_layers_on_driver": dense_layers,
            "schedule": "sequential: each MoE layer's fit waits for the previous layer's compressed output "
                        "(--propagate compressed); the driver re-runs the layer on the written experts"
                        + ("; within a layer one task per expert group, then a merge task" if split else "")
                        if sequential else "parallel: the driver's forward runs ahead; up to N layer fits in flight",
            "memory_per_task_gb": round(task_b / 1e9, 2),
            "memory_per_task_bytes": {"experts": weight_b, "calibration": calib_b, "output": out_b,
                                      "fit_working_set": work_b, "process": int(1.0e9)},
            "measured": {"layer": first, "forward_s": round(fwd_s, 3), "fit_s": round(fit_s, 3),
                         "per_expert_part_s": round(parts_s, 3) if split else None},
            "workers": workers, "workers_from": source,
            "expected_wall_s": {str(w): round(wall(w), 3) for w in sorted({1, 2, 4, 8, workers})}}
