"""The streaming conversion pipeline: checkpoint → calibrated, compressed moe_lowrank checkpoint.

One decoder layer at a time: read its tensors, run the calibration batches through it (original weights; only
hidden states are kept between layers), compress its routed experts (layer_fit.py: the method's fit, the cast
through the format, the report's errors), write the layer's shard, save the hidden states and progress. By
default the hidden states handed to the next layer are the layer's output with its compressed experts as written
(sequential propagation, as GPTQ / SVD-LLM / llm-compressor ``propagate_error``): later layers are calibrated on
what the compressed model feeds them; ``--propagate dense`` keeps the original outputs. Output goes to a locked
temporary folder (``<OUT>.moe-convert-tmp``, or ``OUT/.moe-convert-tmp`` in an existing folder) and is published
at the end (output.py: what may be written or replaced, the lock, the publish); ``--resume`` continues a killed run
from the last completed layer (or an interrupted publish) and produces the same files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from tqdm import tqdm

from vllm_moe_lowrank.format import FACTOR_DTYPES

from .arch import MoEArch, detect
from .calib_data import read_documents, token_windows
from .calibration import CalibOptions
from .checkpoint import Checkpoint, copy_aux_files, save_shard, write_index, write_json
from .distributed import check_cluster, make_fitter, task_graph
from .errors import CalibDataError, CheckpointError, ConvertError
from .experts import expert_tensor_names, load_expert_weights
from .layer_fit import dense_fp8, factor_dtype_name, fit_layer, format_config, written_expert_fn
from .method import Method, MethodContext, build_method
from .output import CONVERT_TMP, Staging, check_paths, open_staging
from .progress import State as _State
from .quantize import dense_quant
from .runner import LayerRunner
from .verify import bytes_summary, source_bytes, verify_checkpoint

REPORT_NAME = "moe_lowrank_report.json"
TMP_SUFFIX = CONVERT_TMP  # beside a new output; inside an existing one: OUT/.moe-convert-tmp (output.py)


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
    factor_dtype: Literal["auto", "bfloat16", "float16", "float32", "fp8_e4m3"] = Field(
        "auto", validation_alias=AliasChoices("factor_dtype", "dtype"))  # dtype: the flag's old name
    device: str = "cpu"
    options: list[str] = []
    export_dense: Path | None = None
    resume: bool = False
    overwrite: bool = False
    trust_remote_code: bool = False
    command: str = ""
    # calibration switches (each measured on its own: docs/methods/, benchmarks/results/calibration_ablation.json)
    propagate: Literal["compressed", "dense"] = "compressed"  # hidden states fed forward after a layer
    gram_weight: Literal["routing", "none"] = "routing"  # Grams Σ g²·x xᵀ (routing) or Σ x xᵀ
    shrink: Literal["smooth", "cliff"] = "smooth"  # Gram shrinkage toward the layer mean (calibration.py)
    down_fit: Literal["compressed", "dense"] = "compressed"  # down fitted on ĥ of the compressed gate/up, or on h
    # where layers are fitted (distributed.py; not part of the fingerprint: the output is the same)
    ray: str | None = None  # None: in this process; "auto" or a cluster address: as Ray tasks
    ray_transfer: Literal["path", "object-store"] = "path"  # how a task gets its layer's experts

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        try:
            kind = torch.device(v).type
        except RuntimeError:
            raise ValueError(f"{v!r} is not a device; use cpu or cuda[:N]") from None
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"{v!r}: calibration and fitting run on cpu or cuda[:N]")
        return v

    def calib_options(self) -> CalibOptions:
        return CalibOptions(weighted=self.gram_weight == "routing", shrink=self.shrink, down_fit=self.down_fit)

    def fingerprint(self, ckpt: Checkpoint) -> dict[str, Any]:
        """What must not change between a run and its --resume."""
        calib = None
        if self.calib_data is not None and self.calib_data.is_file():
            calib = hashlib.sha256(self.calib_data.read_bytes()).hexdigest()
        keep = ("method", "ratio", "text_field", "num_samples", "seq_len", "seed", "batch_size", "factor_dtype",
                "options", "propagate", "gram_weight", "shrink", "down_fit")
        return {**self.model_dump(mode="json", include=set(keep)), "calib_sha256": calib,
                "config_sha256": hashlib.sha256(json.dumps(ckpt.config, sort_keys=True).encode()).hexdigest()}


def _layer_shard(layer: int) -> str:
    return f"model-layer-{layer:05d}.safetensors"


def _check_outputs(opts: ConvertOptions) -> None:
    """Before any work (output.py): the outputs are safe to write, and no live converter holds this one."""
    from .export_dense import EXPORT_MARKER

    outputs = {"output": (opts.output, REPORT_NAME)}
    if opts.export_dense is not None:
        outputs["--export-dense"] = (opts.export_dense, EXPORT_MARKER)
    if not opts.checkpoint.is_dir():
        raise CheckpointError(f"{opts.checkpoint}: checkpoint folder not found")
    Staging(opts.output, CONVERT_TMP).refuse_if_running()
    check_paths(opts.checkpoint, outputs, opts.overwrite)


def _calibration_batches(opts: ConvertOptions, ckpt: Checkpoint) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    if opts.calib_data is None:
        raise CalibDataError(f"--method {opts.method} needs calibration text: pass --calib-data FILE")
    max_pos = ckpt.config.get("max_position_embeddings")
    if max_pos and opts.seq_len > max_pos:
        raise CalibDataError(f"--seq-len {opts.seq_len} exceeds the model's max_position_embeddings={max_pos}")
    docs = read_documents(opts.calib_data, opts.text_field)
    try:
        tok = AutoTokenizer.from_pretrained(ckpt.path, trust_remote_code=opts.trust_remote_code)
    except Exception as err:  # transformers raises ValueError/OSError/ImportError for an unloadable tokenizer
        hint = "" if opts.trust_remote_code else "; if it needs its own code, pass --trust-remote-code"
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{ckpt.path}: transformers cannot load the tokenizer ({msg}){hint}") from None
    ids = token_windows(docs, tok, opts.num_samples, opts.seq_len, opts.seed, f"--calib-data {opts.calib_data}")
    return list(ids.split(opts.batch_size))


def _out_dtype(opts: ConvertOptions, ckpt: Checkpoint) -> torch.dtype:
    """dtype of the written factors: --factor-dtype; auto = float8_e4m3fn for an FP8 source, else its float dtype."""
    if opts.factor_dtype == "auto":
        return torch.float8_e4m3fn if ckpt.source_quant is not None else ckpt.float_dtype()
    return FACTOR_DTYPES[opts.factor_dtype]


def _fit_dtype(out_dtype: torch.dtype, ckpt: Checkpoint) -> torch.dtype:
    """dtype the methods hold their factors in: the written one, or the source float dtype before FP8 rounding."""
    return ckpt.float_dtype() if out_dtype == torch.float8_e4m3fn else out_dtype


def _source_bytes(ckpt: Checkpoint, arch: MoEArch) -> tuple[int, int]:
    """(routed-expert bytes, whole-checkpoint bytes) of the source, FP8 scales included."""
    return source_bytes(ckpt, [n for l in arch.moe_layers for n in expert_tensor_names(ckpt, arch, l)])


def _open_source(opts: ConvertOptions) -> tuple[Checkpoint, MoEArch]:
    """The source checkpoint and its adapter; an FP8 source's scales are all checked here, before any work."""
    ckpt = Checkpoint(opts.checkpoint)
    arch = detect(ckpt.config, str(ckpt.path / "config.json"))
    _ = ckpt.source_quant
    return ckpt, arch


def _make_method(opts: ConvertOptions, arch: MoEArch, ckpt: Checkpoint) -> Method:
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConvertError(f"--device {opts.device}: no CUDA device is available; use --device cpu")
    ctx = MethodContext(arch=arch, ratio=opts.ratio, device=torch.device(opts.device),
                        has_calib_data=opts.calib_data is not None,
                        load_experts=lambda layer: load_expert_weights(ckpt, arch, layer),
                        dtype=_fit_dtype(_out_dtype(opts, ckpt), ckpt))
    method = build_method(opts.method, ctx, opts.options)
    method.check_feasible()
    return method


def dry_run(opts: ConvertOptions) -> dict[str, Any]:
    """Planned ranks and sizes, and a peak-memory estimate; reads only headers and writes nothing."""
    ckpt, arch = _open_source(opts)
    method = _make_method(opts, arch, ckpt)
    n, m, E = arch.hidden_size, arch.intermediate_size, arch.num_experts
    tokens = opts.num_samples * opts.seq_len if method.needs_calibration else 0
    layer_bytes = max(sum(math.prod(ckpt.shape(t)) for t in ckpt.tensors if t.startswith(f"model.layers.{l}."))
                      for l in range(arch.num_layers)) * 4
    per_expert = (n * n + m * m) * 8 * 3  # Grams, Cholesky factors and SVD work in float64
    estimate = 2 * tokens * n * 4 + tokens * n * 4 + 2 * layer_bytes + per_expert + 1.5e9  # + torch/transformers
    out_dtype = _out_dtype(opts, ckpt)
    src_experts, src_total = _source_bytes(ckpt, arch)
    planned = round((1 - opts.ratio) * arch.expert_params() * out_dtype.itemsize)  # FP8 scales not counted
    return {"method": opts.method, "ratio": opts.ratio, "moe_layers": len(arch.moe_layers), "experts": E,
            "expert_params": arch.expert_params(), "factor_dtype": factor_dtype_name(out_dtype),
            "bytes": bytes_summary(arch.expert_params(), src_experts, src_total, planned,
                                   src_total - src_experts + planned),
            "calibration_tokens": tokens, "layers": method.dry_run(),
            "peak_memory_estimate_gb": round(estimate / 1e9, 2),
            **({"ray": task_graph(opts, ckpt, arch, method)} if opts.ray else {})}


def convert(opts: ConvertOptions) -> dict[str, Any]:
    """Run a conversion; returns the report (also written as moe_lowrank_report.json)."""
    t_start = time.time()
    _check_outputs(opts)
    check_cluster(opts)
    ckpt, arch = _open_source(opts)
    for layer in arch.moe_layers:  # every layer's experts present, and no more than config.json says (headers only)
        expert_tensor_names(ckpt, arch, layer)
    method = _make_method(opts, arch, ckpt)
    batches = _calibration_batches(opts, ckpt) if method.needs_calibration else []
    out_dtype = _out_dtype(opts, ckpt)
    staging, state = open_staging(opts.output, CONVERT_TMP, opts.resume, opts.overwrite, opts.fingerprint(ckpt),
                                  _State)
    fresh = not state.data["layers"] and state.data.get("plan") is None
    try:
        if not state.data.get("publishing"):  # else: an interrupted publication, resumed below
            _convert_all(opts, ckpt, arch, method, batches, out_dtype, staging.dir, state, t_start)
            state.data["publishing"] = True
            state.save()
        report_file = staging.dir / REPORT_NAME
        report = json.loads((report_file if report_file.is_file() else opts.output / REPORT_NAME).read_text())
        staging.publish(REPORT_NAME)
    except ConvertError:
        if fresh and not state.data["layers"]:  # nothing worth resuming: leave no temporary folder behind
            staging.discard()
        raise
    finally:
        staging.release()
    return report


def _convert_all(opts: ConvertOptions, ckpt: Checkpoint, arch: MoEArch, method: Method, batches: list[torch.Tensor],
                 out_dtype: torch.dtype, tmp: Path, state: _State, t_start: float) -> None:
    """Every layer not done yet, then the rest of the checkpoint, the report and the dense export, into ``tmp``."""
    runner = LayerRunner(ckpt, arch, opts.device, trust_remote_code=opts.trust_remote_code) if batches else None
    embedded = [runner.embed(b) for b in batches] if runner else []

    if method.needs_plan_pass:
        if state.data.get("plan") is None:
            state.data["plan"] = _plan_pass(ckpt, arch, method, runner, embedded, opts.calib_options())
            state.save()
        method.load_plan(state.data["plan"])

    fitter = make_fitter(opts, state.data.get("plan"),
                         lambda layer, w, c: fit_layer(arch, method, layer, w, c, out_dtype), method)
    try:
        _run_layers(opts, ckpt, arch, runner, embedded, fitter, tmp, state)
    finally:
        fitter.close()

    report = _finish(opts, ckpt, arch, state, tmp, out_dtype)
    report["timings"] = {"total_s": round(time.time() - t_start, 3)}
    write_json(report, tmp / REPORT_NAME)
    if opts.export_dense is not None:  # before publishing, under the lock, from the finished temporary folder
        from .export_dense import export_dense

        export_dense(tmp, opts.export_dense, overwrite=opts.overwrite)


def _forward_layer(runner: LayerRunner | None, arch: MoEArch, layer: int, weights, hidden: list[torch.Tensor],
                   calib_opts: CalibOptions | None = None, keep: bool = False):
    """Run one decoder layer on the calibration hidden states; (new hidden states, its calibration or None, the
    loaded (module, probe) when ``keep`` — the caller then re-runs or releases it — else None)."""
    if runner is None:
        return hidden, None, None
    module, probe = runner.load_layer(layer, weights)
    hidden = runner.forward_layer(module, hidden)
    calib = probe.calibration(arch.num_experts) if probe else None
    if calib is not None and calib_opts is not None:
        calib.opts = calib_opts
    if keep:
        return hidden, calib, (module, probe)
    runner.release_layer(layer)
    return hidden, calib, None


def _plan_pass(ckpt: Checkpoint, arch: MoEArch, method: Method, runner: LayerRunner | None,
               hidden: list[torch.Tensor], calib_opts: CalibOptions | None = None) -> dict[str, Any]:
    """Observe every layer on the original model's hidden states (nothing is compressed yet: no propagation)."""
    for layer in tqdm(range(arch.num_layers), desc=f"plan {method.name}", unit="layer", file=sys.stderr):
        weights = load_expert_weights(ckpt, arch, layer) if layer in arch.moe_layers else None
        hidden, calib, _ = _forward_layer(runner, arch, layer, weights, hidden, calib_opts)
        if runner is not None:
            method.observe_hidden(layer, hidden)
        if weights is not None:
            method.observe_layer(layer, weights, calib)
    return method.make_plan()


def _run_layers(opts: ConvertOptions, ckpt: Checkpoint, arch: MoEArch, runner: LayerRunner | None,
                embedded: list[torch.Tensor], fitter, tmp: Path, state: _State) -> None:
    """Every layer not done yet. The driver runs the calibration forward layer by layer; each MoE layer's fit goes
    to ``fitter`` (distributed.py). With ``--propagate compressed`` the next layer's inputs need this layer's fit,
    so the driver waits for it; data-free methods and ``--propagate dense`` leave up to ``fitter.capacity`` fits
    in flight while the forward moves on. Hidden states are saved (for --resume) only when no fit is pending."""
    done = state.data["layers"]
    hidden, start = state.load_hidden() if runner and done else (None, 0)
    if hidden is None:
        hidden, start = list(embedded), 0
    embedded.clear()  # the caller's list: only ``hidden`` holds calibration states from here (one layer's worth)
    pending: dict[int, tuple[Any, float, list | None]] = {}  # layer -> (fit handle, start, tokens per expert)
    dq = dense_quant(ckpt.source_quant) if _out_dtype(opts, ckpt) == torch.float8_e4m3fn else None
    bar = tqdm(total=arch.num_layers - len(done), desc=f"moe-convert {opts.method}", unit="layer", file=sys.stderr)

    def write(layer: int, fit: dict[str, Any] | None, t0: float, counts: list | None) -> None:
        _write_layer(ckpt, arch, layer, fit and dense_fp8(ckpt, fit, dq), counts, tmp, state, t0)
        bar.update()

    try:
        for layer in range(start, arch.num_layers):
            is_moe, skip = layer in arch.moe_layers, str(layer) in done
            if skip and runner is None:
                continue
            t0 = time.time()
            weights = load_expert_weights(ckpt, arch, layer) if is_moe and (runner or not opts.ray) else None
            propagate = is_moe and runner is not None and opts.propagate == "compressed" and not skip
            hidden_in = hidden
            hidden, calib, loaded = _forward_layer(runner, arch, layer, weights, hidden, opts.calib_options(),
                                                   keep=propagate)
            if skip:  # resumed behind a dense propagation that ran ahead of its fits: forward only
                continue
            counts = calib.counts().tolist() if calib is not None else None
            last = layer == arch.num_layers - 1
            if not is_moe:
                if runner and not last and not pending:  # recorded by write's save, together with this layer
                    state.save_hidden(hidden, layer + 1)
                write(layer, None, t0, None)
            elif loaded is None:
                pending[layer] = (fitter.submit(layer, weights, calib), t0, counts)
            else:  # next layer's inputs: this layer with its experts as written
                fit = dense_fp8(ckpt, fitter.result(fitter.submit(layer, weights, calib, split=True)), dq)
                if fit["spec"] is not None or fit.get("requantized"):  # FP8-rounded dense layers as well
                    del hidden
                    expert_fn = written_expert_fn(arch, opts.method, layer, fit["spec"], fit["tensors"], dq)
                    hidden = runner.rerun_layer(*loaded, expert_fn, hidden_in)
                runner.release_layer(layer)
                if not last and not pending:  # recorded by write's save, together with this layer
                    state.save_hidden(hidden, layer + 1)
                write(layer, fit, t0, counts)
            del hidden_in, weights, calib, loaded
            while pending and (len(pending) > fitter.capacity or last):
                l = fitter.wait_any({l: h for l, (h, _, _) in pending.items()})
                handle, t_l, counts_l = pending.pop(l)
                write(l, fitter.result(handle), t_l, counts_l)
            if runner and not pending and not last and state.data.get("hidden_for") != layer + 1:
                state.save_hidden(hidden, layer + 1)  # fits that ran alongside are all written: a resume point
                state.save()
    finally:  # before any error message: the bar ends its line
        bar.close()


def _write_layer(ckpt: Checkpoint, arch: MoEArch, layer: int, fit: dict[str, Any] | None, counts: list | None,
                 tmp: Path, state: _State, t0: float) -> None:
    """Write layer ``layer``'s shard (its non-expert tensors and the fitted experts) and record it as done."""
    expert_names = set(expert_tensor_names(ckpt, arch, layer)) if layer in arch.moe_layers else set()
    prefix = f"model.layers.{layer}."
    tensors = ckpt.get_many(n for n in ckpt.tensors if n.startswith(prefix) and n not in expert_names)
    report = {"status": "dense"}
    if fit is not None:
        tensors.update(fit["tensors"])
        report = fit["report"]
        if counts is not None:
            report["tokens_per_expert"] = counts
    shard = _layer_shard(layer)
    save_shard(tensors, tmp / shard)
    report["seconds"] = round(time.time() - t0, 3)
    state.data["layers"][str(layer)] = {"spec": fit and fit["spec"], "report": report,
                                        "weight_map": {n: shard for n in tensors}}
    state.save()


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

    layers = {int(l): e["spec"] for l, e in sorted(state.data["layers"].items(), key=lambda kv: int(kv[0]))
              if e["spec"] is not None}  # in layer order, however the fits completed
    config = dict(ckpt.config)
    linear = ckpt.source_quant.linear_quantization() if ckpt.source_quant else None  # FP8 non-expert layers
    config["quantization_config"] = format_config(
        arch, opts.method, opts.ratio, layers, linear_quantization=linear,
        factor_dtype=factor_dtype_name(out_dtype),
        dense_quantization=dense_quant(ckpt.source_quant) if out_dtype == torch.float8_e4m3fn and len(layers) < len(
            arch.moe_layers) else None).model_dump(mode="json")
    write_json(config, tmp / "config.json")
    _, counts = verify_checkpoint(tmp)
    config["quantization_config"]["achieved_ratio"] = round(counts.achieved_ratio, 6)
    write_json(config, tmp / "config.json")

    return {
        "command": opts.command or " ".join(sys.argv),
        "method": opts.method, "options": opts.options, "target_ratio": opts.ratio,
        "achieved_ratio": counts.achieved_ratio,
        "expert_params": {"original": counts.original, "kept": counts.kept, "index_bytes": counts.index_bytes},
        "bytes": bytes_summary(counts.original, *_source_bytes(ckpt, arch), counts.expert_bytes, counts.total_bytes),
        "dtype": str(out_dtype).removeprefix("torch."), "factor_dtype": factor_dtype_name(out_dtype),
        "calibration": None if opts.calib_data is None else {
            "file": str(opts.calib_data), "num_samples": opts.num_samples, "seq_len": opts.seq_len,
            "seed": opts.seed, "plan": state.data.get("plan") is not None, "propagate": opts.propagate,
            "gram_weight": opts.gram_weight, "shrink": opts.shrink, "down_fit": opts.down_fit},
        "layers": {l: e["report"] for l, e in sorted(state.data["layers"].items(), key=lambda kv: int(kv[0]))},
    }
