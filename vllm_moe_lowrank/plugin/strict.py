"""Strict loading: a ``moe_lowrank`` model is served only if every parameter came from the checkpoint.

vLLM checks that all parameters were loaded only for unquantized models: ``DefaultModelLoader.load_weights``
(vllm/model_executor/model_loader/default_loader.py) runs ``track_weights_loading`` when
``model_config.quantization is None``, or when ``--model-loader-extra-config '{"enable_weights_track": true}'`` asks
for it. A converted checkpoint missing a non-expert tensor (an attention projection, a norm) would otherwise load
with that parameter left uninitialized and serve garbage. ``install()`` wraps ``DefaultModelLoader.load_weights``:
for ``moe_lowrank`` models it records the parameter names the model reports as loaded and runs vLLM's own check
in its strict (quantized) form, which exempts only what a checkpoint cannot carry (KV-cache scales, online
quantization, empty placeholders). The routed-expert tensors are checked tensor by tensor as well, in
``MoELowRankMoEMethod.process_weights_after_loading``.
"""

from __future__ import annotations

import functools

from vllm_moe_lowrank.format import QUANT_METHOD, FormatError

_MARK = "_moe_lowrank_strict"


def install() -> None:
    """Wrap ``DefaultModelLoader.load_weights`` (idempotent; every vLLM process calls the plugin's register)."""
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    original = DefaultModelLoader.load_weights
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def load_weights(self, model, model_config):
        if model_config.quantization != QUANT_METHOD:
            return original(self, model, model_config)
        loaded: dict[str, set[str] | None] = {}
        inner = model.load_weights

        def recording(weights):
            names = inner(weights)
            loaded["names"] = None if names is None else set(names)
            return names

        model.load_weights = recording  # an instance attribute: shadows the method for this one call
        try:
            out = original(self, model, model_config)
        finally:
            del model.load_weights
        check_all_loaded(self, model, loaded.get("names"), model_config.model)
        return out

    setattr(load_weights, _MARK, True)
    DefaultModelLoader.load_weights = load_weights


def check_all_loaded(loader, model, names: set[str] | None, source: str) -> None:
    """Raise FormatError naming the parameters the checkpoint did not provide."""
    if names is None:  # the model does not report what it loaded; the expert check still applies
        return
    try:
        loader.track_weights_loading(model, set(names), quantized=True)
        return
    except ValueError as err:
        vllm_message = str(err)
    missing = sorted({n for n, p in model.named_parameters() if p.numel() > 0} - names - _exempt(model))
    if not missing:  # vLLM exempts differently than _exempt: keep its own list
        raise FormatError(f"moe_lowrank: {source}: the checkpoint is incomplete: {vllm_message}")
    shown = ", ".join(repr(n) for n in missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
    raise FormatError(f"moe_lowrank: {source}: {len(missing)} model parameter(s) were not loaded from the "
                      f"checkpoint: {shown}; the checkpoint is incomplete (re-run moe-convert, or restore the "
                      "tensor from the source model)")


def _exempt(model) -> set[str]:
    """Parameters a checkpoint may lack (vLLM's own exemptions on quantized models): KV-cache scales and online
    quantization parameters."""
    from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod

    out = set()
    for name, module in model.named_modules():
        qm = getattr(module, "quant_method", None)
        for p, _ in module.named_parameters():
            if (isinstance(qm, BaseKVCacheMethod) or getattr(qm, "uses_meta_device", False)
                    or p.rsplit(".", 1)[-1] == "input_scale_ub"):  # built from the quantization config
                out.add(f"{name}.{p}" if name else p)
    return out
