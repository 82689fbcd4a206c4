"""Run a checkpoint one decoder layer at a time through transformers' own modules.

The model skeleton lives on the meta device; only the embedding, rotary tables and the one layer being processed
hold real memory. Between layers only the calibration hidden states are kept. Routed experts are replaced by an
``ExpertsProbe`` that records the MoE inputs and routing (transformers ≥ 5 gives every supported architecture an
``Experts(hidden_states, top_k_index, top_k_weights)`` module), so routing, shared experts and attention are
exactly the reference implementation's. The model is in eval mode and every forward runs under
``torch.inference_mode``: a router or dropout that behaves differently in training (PhiMoE's sparsemixer samples
with jitter) takes its inference path, as when the model is served.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .arch import MoEArch
from .calibration import LayerCalibration, dense_expert_fn, moe_output
from .checkpoint import Checkpoint
from .errors import CheckpointError, UnsupportedModelError
from .experts import ExpertWeights, expert_tensor_names


class _Caught(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for decoder layer ``index`` to capture what the model passes it (masks can differ per layer:
    Qwen3-Next's linear-attention layers get another mask than its attention layers); the last one stops the
    forward."""

    def __init__(self, index: int, last: bool, caught: dict[int, tuple]):
        super().__init__()
        self.index, self.last, self.caught = index, last, caught

    def forward(self, hidden_states, *args, **kwargs):
        self.caught[self.index] = (hidden_states, args, kwargs)
        if self.last:
            raise _Caught
        return hidden_states


class ExpertsProbe(nn.Module):
    """Replaces a layer's routed experts: records inputs and routing, returns the original experts' output."""

    def __init__(self, weights: ExpertWeights):
        super().__init__()
        self.fn = dense_expert_fn(weights.gate, weights.up, weights.down)
        self.record = True  # False: only compute (a re-run with another expert fn must not add calibration rows)
        self.x: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] = []
        self.w: list[torch.Tensor] = []

    def forward(self, hidden_states, top_k_index, top_k_weights):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, n]
        ids, w = top_k_index.reshape(x.shape[0], -1), top_k_weights.reshape(x.shape[0], -1)  # [T, k]
        if self.record:
            self.x.append(x.detach())
            self.ids.append(ids.detach().long())
            self.w.append(w.detach().float())
        return moe_output(x, ids, w, self.fn).to(hidden_states.dtype).reshape(hidden_states.shape)

    def calibration(self, num_experts: int) -> LayerCalibration:
        return LayerCalibration(x=torch.cat(self.x), topk_ids=torch.cat(self.ids), topk_weights=torch.cat(self.w),
                                num_experts=num_experts)


class LayerRunner:
    """Streams calibration hidden states through a checkpoint layer by layer."""

    def __init__(self, ckpt: Checkpoint, arch: MoEArch, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 trust_remote_code: bool = False):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.ckpt, self.arch, self.device, self.dtype = ckpt, arch, torch.device(device), dtype
        try:
            config = AutoConfig.from_pretrained(ckpt.path, trust_remote_code=trust_remote_code)
        except Exception as err:
            hint = "" if trust_remote_code else "; if it needs its own code, pass --trust-remote-code"
            raise UnsupportedModelError(f"{ckpt.path}/config.json: transformers cannot read it ({err}){hint}") \
                from None
        config.quantization_config = None  # an FP8 source: the layers run on dequantized weights (_materialize)
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
        self.model = model.model.eval()  # from_config builds in training mode
        self.config = config
        self._materialize(self.model.embed_tokens, "model.embed_tokens.")
        with torch.device(self.device):  # its inverse frequencies are computed at construction, not loaded
            self.model.rotary_emb = type(self.model.rotary_emb)(config=config).eval()
        self.layers = self.model.layers
        self._kwargs: dict[tuple[int, ...], list[tuple]] = {}  # batch shape -> (args, kwargs) of every layer

    def _materialize(self, module: nn.Module, ckpt_prefix: str, skip: set[str] = frozenset()) -> None:
        """Allocate a meta module on the device and fill it from the checkpoint, strictly. FP8 weights are
        dequantized (in the runner's dtype) and their scale tensors skipped."""
        skip = set(skip) | self.ckpt.scale_tensors
        names = [n for n in self.ckpt.tensors if n.startswith(ckpt_prefix) and n not in skip]
        state = {}
        for n, t in self.ckpt.iter_dequantized(names, self.dtype):
            key = n[len(ckpt_prefix):]
            for old, new in self.arch.module_renames:
                key = ("." + key).replace(old, new)[1:]
            state[key] = t
        module.to_empty(device=self.device)
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{self.ckpt.path}: tensors under {ckpt_prefix!r} do not match the "
                                  f"{self.arch.model_type} layout: missing {missing[:3]}, unexpected "
                                  f"{unexpected[:3]}")
        module.to(self.dtype)

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S, n] hidden states entering layer 0; remembers every layer's arguments for this batch shape."""
        layers = list(self.layers)
        caught: dict[int, tuple] = {}
        for i in range(len(layers)):
            self.layers[i] = _Catcher(i, i == len(layers) - 1, caught)
        try:
            self.model(input_ids=input_ids.to(self.device), use_cache=False)
        except _Caught:
            pass
        finally:
            for i, module in enumerate(layers):
                self.layers[i] = module
        self._kwargs[tuple(input_ids.shape)] = [caught[i][1:] for i in range(len(layers))]
        return caught[0][0].to(self.dtype)

    def set_experts(self, module: nn.Module, experts: nn.Module) -> None:
        """Put ``experts`` where the decoder layer keeps its routed experts (arch.experts_module)."""
        parent, _, name = self.arch.experts_module.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, name, experts)

    def load_layer(self, layer: int, experts: ExpertWeights | None) -> tuple[nn.Module, ExpertsProbe | None]:
        """Materialize decoder layer ``layer``; its routed experts become a probe over ``experts``."""
        module = self.layers[layer]
        probe = None
        skip: set[str] = set()
        if layer in self.arch.moe_layers:
            assert experts is not None
            probe = ExpertsProbe(experts).eval()
            self.set_experts(module, probe)
            skip = set(expert_tensor_names(self.ckpt, self.arch, layer))
        self._materialize(module, f"model.layers.{layer}.", skip)
        return module, probe

    def rerun_layer(self, module: nn.Module, probe: ExpertsProbe, expert_fn,
                    hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run a loaded layer again with its routed experts computed by ``expert_fn(e, x_e)`` (e.g. the compressed
        experts as written) instead of the original weights; records nothing (sequential propagation)."""
        probe.fn, probe.record = expert_fn, False
        return self.forward_layer(module, hidden)

    def release_layer(self, layer: int) -> None:
        """Free the layer: parameters back to meta, and drop the probe (it holds the layer's expert weights and
        recorded inputs; kept, it would grow memory by one layer of experts per layer)."""
        module = self.layers[layer]
        if layer in self.arch.moe_layers:
            self.set_experts(module, nn.Identity())  # load_layer puts a new probe here before any use
        module.to("meta")

    @torch.inference_mode()
    def forward_layer(self, module: nn.Module, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run every calibration batch through one materialized layer (inference tensors: read-only outside)."""
        index = next(i for i, m in enumerate(self.layers) if m is module)
        out = []
        for h in hidden:
            args, kwargs = self._kwargs[tuple(h.shape[:2])][index]
            y = module(h.to(self.device), *args, **kwargs)
            out.append((y[0] if isinstance(y, tuple) else y).to(self.dtype))
        return out
