"""Broken checkpoints and wrong flags stop vLLM at startup with an error naming the problem.

These fail while vLLM builds its config (the plugin checks the checkpoint's headers against quantization_config),
before any engine starts, so they are fast; a missing non-expert tensor is found when the weights load (one engine
start).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.vllm
LAYER = "model.layers.1.mlp.experts"


def tampered(src: Path, dst: Path, edit) -> Path:
    """Copy checkpoint ``src`` and apply ``edit(tensors of layer 1's shard, config)``; the index is rewritten."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][f"{LAYER}.0.gate_proj.lr_u"]
    tensors = load_file(dst / shard)
    config = json.loads((dst / "config.json").read_text())
    edit(tensors, config)
    save_file(tensors, dst / shard, metadata={"format": "pt"})
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != shard} | {n: shard for n in tensors}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def drop(t, c):
    del t[f"{LAYER}.3.up_proj.lr_v"]


def reshape(t, c):
    t[f"{LAYER}.5.down_proj.lr_u"] = t[f"{LAYER}.5.down_proj.lr_u"][:, :-1].contiguous()


def version(t, c):
    c["quantization_config"]["format_version"] = 99


def extra(t, c):  # expert 16 of 16: vLLM's own loader would silently skip it
    t[f"{LAYER}.16.gate_proj.lr_u"] = torch.zeros(4, 4)


def no_quant_method(t, c):
    del c["quantization_config"]["quant_method"]


def unlisted_layer(t, c):  # layer 1 dropped from the config, its compressed tensors still there
    del c["quantization_config"]["layers"]["1"]
    c["quantization_config"]["moe_layers"].remove(1)


CASES = {
    "missing": (drop, rf"missing tensor '{LAYER}\.3\.up_proj\.lr_v'"),
    "shape": (reshape, rf"'{LAYER}\.5\.down_proj\.lr_u' has shape"),
    "format_version": (version, r"format_version=99 is not supported"),
    "extra": (extra, rf"unexpected tensor '{LAYER}\.16\.gate_proj\.lr_u'"),
    "no_quant_method": (no_quant_method, r"has the moe_lowrank fields .* but quant_method=None"),
    "unlisted_layer": (unlisted_layer, rf"layer 1 has routed-expert tensors \(e\.g\. '{LAYER}\..*'\) but "
                                       r"quantization_config\.moe_layers does not list it"),
}


def start(model, **kw):
    from vllm import LLM

    return LLM(model=str(model), dtype="float32", enforce_eager=True, max_model_len=512, **kw)


@pytest.mark.parametrize("case", list(CASES))
def test_tampered_checkpoint_refuses_to_start(case, checkpoints, tmp_path):
    edit, message = CASES[case]
    model = tampered(checkpoints("svd")[0], tmp_path / case, edit)
    with pytest.raises(Exception, match=message):
        start(model)


def test_missing_non_expert_tensor_stops_the_server(checkpoints, tmp_path, capfd):
    """vLLM checks that every parameter was loaded only for unquantized models; the plugin checks for its own."""
    name = "model.layers.1.self_attn.o_proj.weight"
    model = tampered(checkpoints("svd")[0], tmp_path / "no-o-proj", lambda t, c: t.pop(name))
    with pytest.raises(Exception):
        start(model)
    logs = "".join(capfd.readouterr())
    assert f"1 model parameter(s) were not loaded from the checkpoint: {name!r}" in logs


def test_other_quantization_flag_is_refused(checkpoints):
    with pytest.raises(ValueError, match="does not match the quantization method"):
        start(checkpoints("svd")[0], quantization="fp8")


def test_moe_lowrank_flag_needs_a_converted_checkpoint():
    from vllm_cases import FIXTURE

    with pytest.raises(Exception, match="needs a checkpoint written by moe-convert"):
        start(FIXTURE, quantization="moe_lowrank")
