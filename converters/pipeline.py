"""The streaming conversion pipeline: checkpoint → calibrated, compressed moe_lowrank checkpoint.

One decoder layer at a time: read its tensors, run the calibration batches through it (original weights; only
hidden states are kept between layers), compress its routed experts, write the layer's shard, save the hidden
states and progress. Output goes to ``<OUT>.moe-convert-tmp`` and is renamed to ``OUT`` at the end; ``--resume``
continues a killed run from the last completed layer and produces the same files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from vllm_moe_lowrank.format import FORMAT_VERSION, PROJS, MoELowRankConfig, materialize_projection

from .arch import MoEArch, detect
from .calib_data import read_documents, token_windows
from .calibration import LayerCalibration, moe_output
from .checkpoint import Checkpoint, copy_aux_files, save_shard, write_index, write_json
from .errors import CalibDataError, ConvertError, OutputError
from .experts import ExpertWeights, expert_tensor_names, load_expert_weights
from .method import CompressedLayer, Method, MethodContext, build_method
from .runner import LayerRunner
from .verify import verify_checkpoint

REPORT_NAME = "moe_lowrank_report.json"
TMP_SUFFIX = ".moe-convert-tmp"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_ERR_TOKENS = 4096  # calibration tokens used for the report's output error


class ConvertOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    ratio: float
    checkpoint: Path
    output: Path
    calib_data: Path | None = None
    text_field: str = "text"
    num_samples: int = Field(128, gt=0)
    seq_len: int = Field(512, gt=0)
    seed: int = 42
    batch_size: int = Field(8, gt=0)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: str = "cpu"
    options: list[str] = []
    export_dense: Path | None = None
    resume: bool = False
    overwrite: bool = False
    command: str = ""

    def fingerprint(self, ckpt: Checkpoint) -> dict[str, Any]:
        """What must not change between a run and its --resume."""
        calib = None
        if self.calib_data is not None and self.calib_data.is_file():
            calib = hashlib.sha256(self.calib_data.read_bytes()).hexdigest()
        keep = ("method", "ratio", "text_field", "num_samples", "seq_len", "seed", "batch_size", "dtype", "options")
        return {**self.model_dump(mode="json", include=set(keep)), "calib_sha256": calib,
                "config_sha256": hashlib.sha256(json.dumps(ckpt.config, sort_keys=True).encode()).hexdigest()}


def _layer_shard(layer: int) -> str:
    return f"model-layer-{layer:05d}.safetensors"


class _State:
    """Progress of a conversion in ``<tmp>/.state``: done layers, their specs and reports, the plan, hidden states."""

    def __init__(self, tmp: Path):
        self.dir = tmp / ".state"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file = self.dir / "progress.json"
        self.data: dict[str, Any] = json.loads(self.file.read_text()) if self.file.is_file() else {"layers": {}}

    def save(self) -> None:
        write_json(self.data, self.file)

    def save_hidden(self, hidden: list[torch.Tensor]) -> None:
        tmp = self.dir / "hidden.pt.tmp"
        torch.save(hidden, tmp)
        os.replace(tmp, self.dir / "hidden.pt")

    def load_hidden(self) -> list[torch.Tensor] | None:
        f = self.dir / "hidden.pt"
        return torch.load(f, weights_only=True) if f.is_file() else None


def _prepare_output(opts: ConvertOptions, fingerprint: dict[str, Any]) -> tuple[Path, _State]:
    final = opts.output
    tmp = final.with_name(final.name + TMP_SUFFIX)
    if final.exists() and (not final.is_dir() or any(final.iterdir())) and not opts.overwrite:
        raise OutputError(f"{final}: output folder exists and is not empty; pass --overwrite to replace it")
    if tmp.exists():
        if opts.resume:
            state = _State(tmp)
            old = state.data.get("fingerprint")
            if old != fingerprint:
                diff = sorted(k for k in fingerprint if (old or {}).get(k) != fingerprint[k])
                raise OutputError(f"{tmp}: --resume refused: the interrupted run used different settings "
                                  f"({', '.join(diff)}); rerun with the same ones, or --overwrite to start over")
            return tmp, state
        if not opts.overwrite:
            raise OutputError(f"{tmp}: an interrupted conversion is there; pass --resume to continue it or "
                              "--overwrite to start over")
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = _State(tmp)
    state.data["fingerprint"] = fingerprint
    state.save()
    return tmp, state


def _calibration_batches(opts: ConvertOptions, ckpt: Checkpoint) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    if opts.calib_data is None:
        raise CalibDataError(f"--method {opts.method} needs calibration text: pass --calib-data FILE")
    max_pos = ckpt.config.get("max_position_embeddings")
    if max_pos and opts.seq_len > max_pos:
        raise CalibDataError(f"--seq-len {opts.seq_len} exceeds the model's max_position_embeddings={max_pos}")
    docs = read_documents(opts.calib_data, opts.text_field)
    tok = AutoTokenizer.from_pretrained(ckpt.path)
    ids = token_windows(docs, tok, opts.num_samples, opts.seq_len, opts.seed, f"--calib-data {opts.calib_data}")
    return list(ids.split(opts.batch_size))


def _out_dtype(opts: ConvertOptions, ckpt: Checkpoint) -> torch.dtype:
    return ckpt.float_dtype() if opts.dtype == "auto" else _DTYPES[opts.dtype]


def _format_config(arch: MoEArch, method: str, ratio: float, layers: dict[int, Any],
                   achieved: float | None = None) -> MoELowRankConfig:
    return MoELowRankConfig(
        format_version=FORMAT_VERSION, method=method, target_ratio=ratio, achieved_ratio=achieved,
        num_experts=arch.num_experts, hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        moe_prefix=arch.moe_prefix, expert_names=arch.expert_names, moe_layers=list(arch.moe_layers), layers=layers)


def _cast_layer(arch: MoEArch, method: str, layer: int, comp: CompressedLayer,
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Name and cast a method's tensors through the format, checking each against the format's exact shape."""
    cfg = _format_config(arch, method, 0.5, {layer: comp.spec})
    specs = cfg.tensor_specs(layer)
    out = {}
    for (p, suffix, e), t in comp.tensors.items():
        name = cfg.tensor_name(layer, p, suffix, e)
        spec = specs.get(name)
        if spec is None:
            raise ConvertError(f"method {method} produced tensor {name!r} that its layer spec does not declare")
        if tuple(t.shape) != spec.shape:
            raise ConvertError(f"method {method} produced {name!r} with shape {list(t.shape)}; the format "
                               f"expects {list(spec.shape)}")
        target = {"float": dtype, "float32": torch.float32, "int32": torch.int32}[spec.dtype]
        out[name] = t.detach().to("cpu", target).contiguous()
    missing = sorted(set(specs) - set(out))
    if missing:
        raise ConvertError(f"method {method} did not produce {len(missing)} tensor(s) of layer {layer}, e.g. "
                           f"{missing[0]!r}")
    return out


def _layer_errors(arch: MoEArch, method: str, layer: int, comp: CompressedLayer, tensors: dict[str, torch.Tensor],
                  weights: ExpertWeights, calib: LayerCalibration | None) -> dict[str, Any]:
    """Relative errors of what is written: per projection ‖W − Ŵ‖_F / ‖W‖_F over all experts, and the routed
    MoE output error on (up to 4096) calibration tokens.

    A units split (RS-MoE) stores each expert's units in its own compact order, which changes the expert's weights
    by a permutation but not its function; weight errors are then undefined (None) and the output error is the
    measure."""
    cfg = _format_config(arch, method, 0.5, {layer: comp.spec})
    get = tensors.__getitem__
    out: dict[str, Any] = {"weight_rel_err": None}
    if comp.spec.units is None:
        num = {p: 0.0 for p in PROJS}
        den = {p: 0.0 for p in PROJS}
        for e in range(arch.num_experts):
            for p in PROJS:
                w = weights.get(p, e, torch.float64)
                num[p] += float((w - materialize_projection(cfg, layer, p, e, get)).square().sum())
                den[p] += float(w.square().sum())
        out["weight_rel_err"] = {p: math.sqrt(num[p] / den[p]) if den[p] else 0.0 for p in PROJS}
    if calib is not None:
        step = max(1, calib.num_tokens // _ERR_TOKENS)
        x, ids, w = calib.x[::step].float(), calib.topk_ids[::step], calib.topk_weights[::step]

        def approx(e: int, xe: torch.Tensor) -> torch.Tensor:
            g, u, d = (materialize_projection(cfg, layer, p, e, get).float() for p in PROJS)
            return (torch.nn.functional.silu(xe @ g.T) * (xe @ u.T)) @ d.T

        def exact(e: int, xe: torch.Tensor) -> torch.Tensor:
            h = torch.nn.functional.silu(xe @ weights.get("gate", e).T) * (xe @ weights.get("up", e).T)
            return h @ weights.get("down", e).T

        y = moe_output(x, ids, w, exact)
        out["output_rel_err"] = float((moe_output(x, ids, w, approx) - y).norm() / y.norm().clamp(min=1e-30))
    return out


def _dense_expert_tensors(arch: MoEArch, layer: int, weights: ExpertWeights) -> dict[str, torch.Tensor]:
    names = arch.expert_names
    return {f"{arch.prefix(layer)}.{e}.{getattr(names, p)}.weight": weights.proj(p)[e].contiguous()
            for e in range(arch.num_experts) for p in PROJS}


def _make_method(opts: ConvertOptions, arch: MoEArch, ckpt: Checkpoint) -> Method:
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConvertError(f"--device {opts.device}: no CUDA device is available; use --device cpu")
    ctx = MethodContext(arch=arch, ratio=opts.ratio, device=torch.device(opts.device),
                        load_experts=lambda layer: load_expert_weights(ckpt, arch, layer),
                        dtype=_out_dtype(opts, ckpt))
    method = build_method(opts.method, ctx, opts.options)
    method.check_feasible()
    return method


def dry_run(opts: ConvertOptions) -> dict[str, Any]:
    """Planned ranks and sizes, and a peak-memory estimate; reads only headers and writes nothing."""
    ckpt = Checkpoint(opts.checkpoint)
    arch = detect(ckpt.config, str(ckpt.path / "config.json"))
    method = _make_method(opts, arch, ckpt)
    n, m, E = arch.hidden_size, arch.intermediate_size, arch.num_experts
    tokens = opts.num_samples * opts.seq_len if method.needs_calibration else 0
    layer_bytes = max(sum(math.prod(ckpt.shape(t)) for t in ckpt.tensors if t.startswith(f"model.layers.{l}."))
                      for l in range(arch.num_layers)) * 4
    per_expert = (n * n + m * m) * 8 * 3  # Grams, Cholesky factors and SVD work in float64
    estimate = 2 * tokens * n * 4 + tokens * n * 4 + 2 * layer_bytes + per_expert + 1.5e9  # + torch/transformers
    return {"method": opts.method, "ratio": opts.ratio, "moe_layers": len(arch.moe_layers), "experts": E,
            "expert_params": arch.expert_params(), "calibration_tokens": tokens, "layers": method.dry_run(),
            "peak_memory_estimate_gb": round(estimate / 1e9, 2)}


def convert(opts: ConvertOptions) -> dict[str, Any]:
    """Run a conversion; returns the report (also written as moe_lowrank_report.json)."""
    t_start = time.time()
    ckpt = Checkpoint(opts.checkpoint)
    arch = detect(ckpt.config, str(ckpt.path / "config.json"))
    method = _make_method(opts, arch, ckpt)
    batches = _calibration_batches(opts, ckpt) if method.needs_calibration else []
    out_dtype = _out_dtype(opts, ckpt)
    tmp, state = _prepare_output(opts, opts.fingerprint(ckpt))
    runner = LayerRunner(ckpt, arch, opts.device) if batches else None
    embedded = [runner.embed(b) for b in batches] if runner else []

    if method.needs_plan_pass:
        if state.data.get("plan") is None:
            state.data["plan"] = _plan_pass(ckpt, arch, method, runner, embedded)
            state.save()
        method.load_plan(state.data["plan"])

    hidden = state.load_hidden() if state.data["layers"] else None
    if hidden is None:
        hidden = embedded
    del embedded
    todo = [l for l in range(arch.num_layers) if str(l) not in state.data["layers"]]
    for layer in tqdm(todo, desc=f"moe-convert {opts.method}", unit="layer", file=sys.stderr):
        t0 = time.time()
        entry, hidden = _convert_layer(ckpt, arch, method, runner, layer, hidden, out_dtype, tmp, opts.method)
        entry["report"]["seconds"] = round(time.time() - t0, 3)
        state.data["layers"][str(layer)] = entry
        if runner and layer != arch.num_layers - 1:
            state.save_hidden(hidden)
        state.save()

    report = _finish(opts, ckpt, arch, state, tmp, out_dtype)
    report["timings"] = {"total_s": round(time.time() - t_start, 3)}
    write_json(report, tmp / REPORT_NAME)
    shutil.rmtree(state.dir)
    if opts.output.exists():
        shutil.rmtree(opts.output)
    os.replace(tmp, opts.output)
    if opts.export_dense is not None:
        from .export_dense import export_dense

        export_dense(opts.output, opts.export_dense, overwrite=opts.overwrite)
    return report


def _forward_layer(runner: LayerRunner | None, arch: MoEArch, layer: int, weights, hidden: list[torch.Tensor]):
    """Run one decoder layer on the calibration hidden states; (new hidden states, its calibration or None)."""
    if runner is None:
        return hidden, None
    module, probe = runner.load_layer(layer, weights)
    hidden = runner.forward_layer(module, hidden)
    runner.release_layer(layer)
    return hidden, probe.calibration(arch.num_experts) if probe else None


def _plan_pass(ckpt: Checkpoint, arch: MoEArch, method: Method, runner: LayerRunner | None,
               hidden: list[torch.Tensor]) -> dict[str, Any]:
    for layer in tqdm(range(arch.num_layers), desc=f"plan {method.name}", unit="layer", file=sys.stderr):
        weights = load_expert_weights(ckpt, arch, layer) if layer in arch.moe_layers else None
        hidden, calib = _forward_layer(runner, arch, layer, weights, hidden)
        if runner is not None:
            method.observe_hidden(layer, hidden)
        if weights is not None:
            method.observe_layer(layer, weights, calib)
    return method.make_plan()


def _convert_layer(ckpt: Checkpoint, arch: MoEArch, method: Method, runner: LayerRunner | None, layer: int,
                   hidden: list[torch.Tensor], out_dtype: torch.dtype, tmp: Path, method_name: str):
    is_moe = layer in arch.moe_layers
    weights = load_expert_weights(ckpt, arch, layer) if is_moe else None
    hidden, calib = _forward_layer(runner, arch, layer, weights, hidden)
    expert_names = set(expert_tensor_names(ckpt, arch, layer)) if is_moe else set()
    prefix = f"model.layers.{layer}."
    tensors = ckpt.get_many(n for n in ckpt.tensors if n.startswith(prefix) and n not in expert_names)
    spec, report = None, {"status": "dense"}
    if is_moe:
        comp = method.compress_layer(layer, weights, calib)
        if comp is None:
            tensors.update(_dense_expert_tensors(arch, layer, weights))
        else:
            expert_tensors = _cast_layer(arch, method_name, layer, comp, out_dtype)
            comp.tensors.clear()  # the cast copies are what gets written; free the method's originals
            tensors.update(expert_tensors)
            spec = comp.spec.model_dump(mode="json")
            params = sum(t.numel() for t in expert_tensors.values() if t.is_floating_point())
            report = {"status": "compressed", **comp.info,
                      "ranks": {p: comp.spec.proj(p).lowrank.ranks for p in PROJS if comp.spec.proj(p).lowrank},
                      "params": params,
                      "layer_ratio": 1 - params / (3 * arch.num_experts * arch.hidden_size * arch.intermediate_size),
                      **_layer_errors(arch, method_name, layer, comp, expert_tensors, weights, calib)}
        if calib is not None:
            report["tokens_per_expert"] = calib.counts().tolist()
    shard = _layer_shard(layer)
    save_shard(tensors, tmp / shard)
    return {"spec": spec, "report": report, "weight_map": {n: shard for n in tensors}}, hidden


def _finish(opts: ConvertOptions, ckpt: Checkpoint, arch: MoEArch, state: _State, tmp: Path,
            out_dtype: torch.dtype) -> dict[str, Any]:
    """Write the non-layer tensors, config, index and aux files; verify and count the written checkpoint."""
    weight_map: dict[str, str] = {}
    for entry in state.data["layers"].values():
        weight_map.update(entry["weight_map"])
    layer_prefixes = tuple(f"model.layers.{l}." for l in range(arch.num_layers))
    rest = [n for n in ckpt.tensors if not n.startswith(layer_prefixes)]  # embeddings, final norm, head, MTP
    if rest:
        save_shard(ckpt.get_many(rest), tmp / "model-rest.safetensors")
        weight_map.update({n: "model-rest.safetensors" for n in rest})
    total = sum(os.path.getsize(tmp / f) for f in set(weight_map.values()))
    write_index(weight_map, total, tmp)
    copy_aux_files(ckpt.path, tmp)

    layers = {int(l): e["spec"] for l, e in state.data["layers"].items() if e["spec"] is not None}
    config = dict(ckpt.config)
    config["quantization_config"] = _format_config(arch, opts.method, opts.ratio, layers).model_dump(mode="json")
    write_json(config, tmp / "config.json")
    _, counts = verify_checkpoint(tmp)
    config["quantization_config"]["achieved_ratio"] = round(counts.achieved_ratio, 6)
    write_json(config, tmp / "config.json")

    return {
        "command": opts.command or " ".join(sys.argv),
        "method": opts.method, "options": opts.options, "target_ratio": opts.ratio,
        "achieved_ratio": counts.achieved_ratio,
        "expert_params": {"original": counts.original, "kept": counts.kept, "index_bytes": counts.index_bytes},
        "dtype": str(out_dtype).removeprefix("torch."),
        "calibration": None if opts.calib_data is None else {
            "file": str(opts.calib_data), "num_samples": opts.num_samples, "seq_len": opts.seq_len,
            "seed": opts.seed, "plan": state.data.get("plan") is not None},
        "layers": {l: e["report"] for l, e in sorted(state.data["layers"].items(), key=lambda kv: int(kv[0]))},
    }
