"""FP8 in: block-FP8 and per-tensor FP8 checkpoints convert and serve like the float model they stand for.

The reference for an FP8 checkpoint is its *dequantized copy* (tests/fp8_factory.py): the same model with every FP8
weight replaced by ``weight · scale`` computed in float32, which is exactly what the FP8 model computes. So:
converting the FP8 checkpoint must give the same expert tensors as converting the copy (FP8 read and calibration on
dequantized weights), every non-expert tensor and scale must be copied byte for byte, and vLLM serving the result must
match transformers on the dense export (whose FP8 layers ``--export-dense`` writes dequantized).

Two tiny checkpoints with hidden size 256, so that 128×128 blocks are real (partial ones too: MLA's kv_a is 576 rows):
- DeepSeek-V3 block FP8 [128, 128] (FP8 MLA attention, shared expert, dense first layer): every method converts it;
  it is served at the MoE-layer level, like tests/test_vllm_deepseek.py, because vLLM's CPU MLA attention is not
  deterministic across runs (token-exact comparison is impossible there).
- Qwen3-MoE per-tensor FP8 with static activation scales (``input_scale``): served end to end, greedy tokens equal
  transformers on the dense export.
Each is also converted with FP8 factors by moe-svd restricted to one MoE layer, so the other MoE layer is kept dense:
its FP8 experts and scales (input scales too) are copied byte for byte (``dense_quantization``) and served by vLLM's
FP8 MoE method — on this CPU (no AMX) the plugin's Fp8DequantMoEMethod. Likewise vLLM has no FP8 linear kernel here,
so every FP8 linear layer must get the plugin's Fp8DequantLinearMethod and every float one (router gates)
UnquantizedLinearMethod; the served tests assert the method of every linear and every MoE layer.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from model_factory import FIXTURE, make_tiny_model
from safetensors.torch import load_file, save_file

from fp8_factory import make_fp8
from vllm_moe_lowrank.converters import cli
from vllm_moe_lowrank.converters.arch import detect
from vllm_moe_lowrank.converters.checkpoint import Checkpoint, SourceQuant
from vllm_moe_lowrank.converters.experts import load_expert_weights
from vllm_moe_lowrank.converters.verify import verify_checkpoint

CALIB = ["--calib-data", str(FIXTURE / "calib.txt"), "--num-samples", "8", "--seq-len", "64", "--dtype", "float32"]
# MLA on vLLM's CPU backend needs kv_lora_rank + qk_rope_head_dim = 576 (see test_vllm_deepseek.py); fused
# q_a/kv_a and gate/up shards must start on a 128-block boundary (q_lora_rank, intermediate sizes: multiples of 128)
DEEPSEEK = dict(hidden_size=256, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=16, v_head_dim=16,
                q_lora_rank=128, intermediate_size=256, moe_intermediate_size=128, n_routed_experts=8,
                max_position_embeddings=512, topk_method="noaux_tc", scoring_func="sigmoid")
QWEN = dict(hidden_size=256, head_dim=64, intermediate_size=256, moe_intermediate_size=128)
METHODS = {"svd": [], "moe-svd": [], "mobe": ["-o", "steps=20"], "rs-moe": [], "rfid-moe": []}


def convert(src, out, method: str, *extra: str) -> None:
    cli.main(["--method", method, "--ratio", "0.4", str(src), str(out), *METHODS.get(method, []), *CALIB, *extra])


def convert_keeping_dense(root, layer: int) -> None:
    """``fp8-msvd``: FP8 factors, moe-svd decomposing only MoE layer ``layer`` (the other MoE layer stays dense;
    per-expert factors, ``share=false``: 3 s instead of 30 s), with its dense export ``fp8-msvd-dense``."""
    convert(root / "fp8", root / "fp8-msvd", "moe-svd", "-o", f"layers={layer}", "-o", "share=false",
            "--factor-dtype", "fp8_e4m3", "--export-dense", str(root / "fp8-msvd-dense"))


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """(block-FP8 DeepSeek-V3, its dequantized copy, svd conversion of each, dense export of the FP8 one)."""
    root = tmp_path_factory.mktemp("fp8-deepseek")
    src = make_tiny_model("deepseek_v3", root / "src", **DEEPSEEK)
    make_fp8(src, root / "fp8", root / "deq", block=(128, 128))
    convert(root / "fp8", root / "fp8-svd", "svd", "--export-dense", str(root / "fp8-svd-dense"))
    convert(root / "deq", root / "deq-svd", "svd")
    convert_keeping_dense(root, 2)  # layer 1 kept dense
    return root


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(per-tensor static-activation FP8 Qwen3-MoE, its dequantized copy, data-free svd conversions, dense export)."""
    root = tmp_path_factory.mktemp("fp8-qwen")
    src = make_tiny_model("qwen3_moe", root / "src", **QWEN)
    make_fp8(src, root / "fp8", root / "deq", block=None, static=True)
    for name in ("fp8", "deq"):
        convert(root / name, root / f"{name}-svd", "svd", "-o", "whiten=false",
                *(["--export-dense", str(root / "fp8-svd-dense")] if name == "fp8" else []))
    convert_keeping_dense(root, 1)  # layer 0 kept dense
    return root


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


# ----- reading ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["deepseek", "qwen"])
def test_fp8_reads_as_its_dequantized_copy(which, request):
    root = request.getfixturevalue(which)
    fp8, deq = Checkpoint(root / "fp8"), Checkpoint(root / "deq")
    block = (128, 128) if which == "deepseek" else None
    assert fp8.source_quant == SourceQuant(weight_block_size=block, activation_scheme="dynamic" if block else "static",
                                           ignored=fp8.source_quant.ignored)
    assert "lm_head" in fp8.source_quant.ignored and deq.source_quant is None
    assert fp8.scale_tensors == set(fp8.tensors) - set(deq.tensors)
    quantized = [n for n in deq.tensors if fp8.is_fp8(n)]
    assert any("self_attn" in n for n in quantized) and any("shared_expert" in n or "mlp.up_proj" in n
                                                            for n in quantized)
    for name, t in fp8.iter_dequantized(deq.tensors):
        assert torch.equal(t, deq.get(name)), name
    arch = detect(fp8.config)
    for layer in arch.moe_layers:
        a, b = load_expert_weights(fp8, arch, layer), load_expert_weights(deq, arch, layer)
        assert all(torch.equal(a.proj(p), b.proj(p)) for p in ("gate", "up", "down"))


def test_dequantized_to_the_dtype_of_the_float_tensors(tmp_path):
    """A bf16 FP8 checkpoint has more float32 scales than bf16 tensors; FP8 weights still come back as bf16."""
    q = torch.randn(5, 200, 300).to(torch.float8_e4m3fn)
    scales = torch.rand(5, 2, 3) + 0.5  # [⌈200/128⌉, ⌈300/128⌉] per weight
    tensors = {"model.embed_tokens.weight": torch.randn(8, 300).bfloat16(),
               "model.norm.weight": torch.ones(300).bfloat16()}
    for i in range(5):
        tensors[f"model.layers.0.p{i}.weight"] = q[i]
        tensors[f"model.layers.0.p{i}.weight_scale_inv"] = scales[i]
    save_file(tensors, tmp_path / "model.safetensors")
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qc}))
    ckpt = Checkpoint(tmp_path)
    assert ckpt.dequant_dtype == torch.bfloat16 and len(ckpt.scale_tensors) == 5
    w = ckpt.get_dequantized(["model.layers.0.p3.weight"])["model.layers.0.p3.weight"]
    expect = q[3].float()
    expect[:128, :128] *= scales[3, 0, 0]
    expect[:128, 128:256] *= scales[3, 0, 1]
    expect[128:, 256:] *= scales[3, 1, 2]
    assert w.dtype == torch.bfloat16
    assert torch.equal(w[:128, :256], expect[:128, :256].bfloat16()) and torch.equal(w[128:, 256:],
                                                                                    expect[128:, 256:].bfloat16())


@pytest.mark.parametrize("which", ["deepseek", "qwen"])
def test_conversion_equals_converting_the_dequantized_copy(which, request):
    """Expert tensors identical to those converted from the float copy (deepseek: calibrated, so the layers ran on
    dequantized FP8 attention); non-expert tensors and scales byte for byte from the source; no expert scale kept."""
    root = request.getfixturevalue(which)
    src, out, ref = Checkpoint(root / "fp8"), Checkpoint(root / "fp8-svd"), Checkpoint(root / "deq-svd")
    cfg, _ = verify_checkpoint(out.path)
    q = src.config["quantization_config"]
    assert cfg.linear_quantization == {"quant_method": "fp8", "activation_scheme": q["activation_scheme"],
                                       "weight_block_size": q.get("weight_block_size"),
                                       "ignored_layers": q["modules_to_not_convert"]}
    experts = set(cfg.all_expert_tensor_specs())
    assert experts <= set(out.tensors) and experts <= set(ref.tensors)
    for n in experts:
        assert torch.equal(out.get(n), ref.get(n)), n
    prefixes = tuple(cfg.prefix(l) + "." for l in cfg.moe_layers)
    kept = [n for n in src.tensors if not n.startswith(prefixes)]
    assert set(out.tensors) == experts | set(kept)
    assert any(n.endswith("weight_scale_inv" if which == "deepseek" else "weight_scale") for n in kept)
    for n in kept:
        a, b = src.get(n), out.get(n)
        assert a.dtype == b.dtype and torch.equal(_bytes(a), _bytes(b)), n
    # the dense export is the exact float model: its non-expert weights are the copy's (dequantized) ones
    dense, deq = Checkpoint(root / "fp8-svd-dense"), Checkpoint(root / "deq")
    assert not dense.scale_tensors and "quantization_config" not in dense.config
    assert set(dense.tensors) == set(deq.tensors)
    for n, t in dense.iter_tensors(n for n in dense.tensors if not n.startswith(prefixes)):
        assert torch.equal(t, deq.get(n)), n


@pytest.mark.parametrize("which", ["deepseek", "qwen"])
def test_dense_kept_layer_stays_fp8(which, request):
    """FP8 factors: the MoE layer the method leaves dense keeps the source's FP8 experts, their scales and (static
    activations) input scales byte for byte; the compressed layer's expert input scales are dropped; the dense
    export holds the exact dequantized weights of the float copy."""
    from vllm_moe_lowrank.format import DenseQuant

    root = request.getfixturevalue(which)
    src, out, deq = Checkpoint(root / "fp8"), Checkpoint(root / "fp8-msvd"), Checkpoint(root / "deq")
    cfg, counts = verify_checkpoint(out.path)
    q = src.config["quantization_config"]
    assert cfg.factor_dtype == "fp8_e4m3" and len(cfg.layers) == 1
    block = q.get("weight_block_size")
    assert cfg.dense_quantization == DenseQuant(activation_scheme=q["activation_scheme"],
                                                weight_block_size=tuple(block) if block else None)
    (dense,) = cfg.dense_layers()
    specs = cfg.dense_tensor_specs(dense)
    static = q["activation_scheme"] == "static"
    assert len(specs) == 3 * cfg.num_experts * (3 if static else 2)
    for n in specs:
        a, b = src.get(n), out.get(n)
        assert a.dtype == b.dtype and torch.equal(_bytes(a), _bytes(b)), n
    (comp,) = cfg.layers
    assert not [n for n in out.tensors if n.startswith(cfg.prefix(comp) + ".") and n.endswith("input_scale")]
    assert static == any(n.endswith("input_scale") for n in src.tensors if n.startswith(cfg.prefix(comp) + "."))
    assert counts.expert_bytes == sum(s.nbytes(4) for s in cfg.all_expert_tensor_specs().values())
    export = Checkpoint(root / "fp8-msvd-dense")
    assert not export.scale_tensors
    for n, t in export.iter_tensors(n for n in specs if n.endswith(".weight")):
        assert torch.equal(t, deq.get(n)), n


def test_dense_kept_layer_of_a_float_source_in_fp8(qwen, tmp_path):
    """A float source with --factor-dtype fp8_e4m3: the dense-kept layer is quantized in 128×128 blocks
    (format.DENSE_FP8; here [1, 2] blocks per gate/up [128, 256]), within e4m3 rounding of the float weights (the
    conversion propagates through the layer with these FP8 experts: layer_fit.dense_fp8)."""
    from vllm_moe_lowrank.format import DENSE_FP8
    from vllm_moe_lowrank.materialize import dense_weight

    out = tmp_path / "out"
    convert(qwen / "src", out, "moe-svd", "-o", "layers=1", "-o", "share=false", "--factor-dtype", "fp8_e4m3")
    cfg, _ = verify_checkpoint(out)
    assert cfg.dense_quantization == DENSE_FP8 and cfg.dense_layers() == [0] and cfg.linear_quantization is None
    ck, src = Checkpoint(out), Checkpoint(qwen / "src")
    stored = ck.get_many(cfg.dense_tensor_specs(0))
    name = cfg.tensor_name(0, "gate", "weight", 1)
    assert stored[name].dtype == torch.float8_e4m3fn and stored[name + "_scale_inv"].shape == (1, 2)
    w = src.get(name).float()
    torch.testing.assert_close(dense_weight(cfg, 0, "gate", 1, stored.__getitem__), w, rtol=2 ** -4,
                               atol=float(w.abs().max()) * 2 ** -9)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "svd"])
def test_every_method_converts_block_fp8(method, deepseek, tmp_path):
    out = tmp_path / "out"
    convert(deepseek / "fp8", out, method, "--num-samples", "4", "--seq-len", "32")  # (later flags win)
    cfg, counts = verify_checkpoint(out)
    assert cfg.linear_quantization["weight_block_size"] == [128, 128] and cfg.layers
    assert abs(counts.achieved_ratio - 0.4) < 0.05
    src, dst = Checkpoint(deepseek / "fp8"), Checkpoint(out)
    for n in src.scale_tensors:
        if ".mlp.experts." not in n:
            assert torch.equal(src.get(n), dst.get(n)), n


# ----- errors -----------------------------------------------------------------------------------------------------
def _broken(deepseek, tmp_path, edit_tensors=None, edit_config=None):
    dst = tmp_path / "broken"
    shutil.copytree(deepseek / "fp8", dst)
    if edit_tensors:
        tensors = load_file(dst / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _fails(capsys, src, tmp_path) -> str:
    capsys.readouterr()  # what building the checkpoint printed
    with pytest.raises(SystemExit) as exc:
        convert(src, tmp_path / "out", "svd")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (transformers may warn before)
    assert err.startswith("moe-convert: error: ")
    assert not (tmp_path / "out").exists()
    return err


SCALE = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"


def test_block_size_the_scales_do_not_match(deepseek, tmp_path, capsys):
    src = _broken(deepseek, tmp_path, edit_config=lambda q: q.update(weight_block_size=[64, 128]))
    err = _fails(capsys, src, tmp_path)
    assert "weight_block_size [64, 128]" in err and "model.safetensors" in err and "weight_scale_inv" in err


def test_scale_tensor_missing(deepseek, tmp_path, capsys):
    src = _broken(deepseek, tmp_path, edit_tensors=lambda t: t.pop(SCALE))
    err = _fails(capsys, src, tmp_path)
    assert SCALE in err and "no scale tensor" in err and "broken" in err


def test_scale_tensor_misshaped(deepseek, tmp_path, capsys):
    src = _broken(deepseek, tmp_path, edit_tensors=lambda t: t.update({SCALE: torch.ones(4, 2)}))
    err = _fails(capsys, src, tmp_path)
    assert SCALE in err and "[4, 2]" in err and "[5, 2]" in err and "model.safetensors" in err  # 576 rows: 5 blocks


def test_fp8_weights_without_fp8_config(deepseek, tmp_path, capsys):
    src = _broken(deepseek, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["quantization_config"]
    (src / "config.json").write_text(json.dumps(cfg))
    err = _fails(capsys, src, tmp_path)
    assert "float8" in err and "no fp8 quantization_config" in err


def test_kimi_k2_fp8_with_its_own_code(tmp_path, capsys):
    """Kimi-K2 is the DeepSeek-V3 layout in block FP8 whose config and tokenizer are code shipped in the checkpoint
    (transformers has no ``kimi_k2``): refused with a pointer to --trust-remote-code, converted with it."""
    src = make_tiny_model("deepseek_v3", tmp_path / "src")
    kimi = make_fp8(src, tmp_path / "kimi", tmp_path / "kimi-deq", block=(128, 128))
    cfg = json.loads((kimi / "config.json").read_text())
    cfg.update(model_type="kimi_k2", auto_map={"AutoConfig": "configuration_kimi.KimiK2Config",
                                               "AutoModelForCausalLM": "modeling_kimi.KimiK2ForCausalLM"})
    (kimi / "config.json").write_text(json.dumps(cfg))
    (kimi / "configuration_kimi.py").write_text(
        "from transformers import DeepseekV3Config\n\n\nclass KimiK2Config(DeepseekV3Config):\n"
        "    model_type = 'kimi_k2'\n")
    (kimi / "modeling_kimi.py").write_text(
        "from transformers import DeepseekV3ForCausalLM\n\nfrom .configuration_kimi import KimiK2Config\n\n\n"
        "class KimiK2ForCausalLM(DeepseekV3ForCausalLM):\n    config_class = KimiK2Config\n")
    (kimi / "tokenization_kimi.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\nclass KimiTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n")
    tok = json.loads((kimi / "tokenizer_config.json").read_text())
    tok.pop("tokenizer_class", None)
    tok["auto_map"] = {"AutoTokenizer": [None, "tokenization_kimi.KimiTokenizer"]}
    (kimi / "tokenizer_config.json").write_text(json.dumps(tok))

    arch = detect(cfg)
    assert arch.model_type == "kimi_k2"
    assert dataclasses.replace(arch, model_type="deepseek_v3") == detect(dict(cfg, model_type="deepseek_v3"))
    err = _fails(capsys, kimi, tmp_path)
    assert "tokenizer" in err and "--trust-remote-code" in err
    convert(kimi, tmp_path / "out", "svd", "--trust-remote-code")
    out_cfg, _ = verify_checkpoint(tmp_path / "out")
    assert out_cfg.linear_quantization["weight_block_size"] == [128, 128]
    assert (tmp_path / "out" / "modeling_kimi.py").is_file()  # the code travels with the checkpoint


# ----- serving (vLLM, CPU) ----------------------------------------------------------------------------------------
@pytest.mark.vllm
def test_plugin_refuses_linear_quantization_vllm_cannot_serve(deepseek):
    from vllm_moe_lowrank.format import FormatError
    from vllm_moe_lowrank.plugin.config import MoELowRankQuantConfig

    qc = json.loads((deepseek / "fp8-svd" / "config.json").read_text())["quantization_config"]
    assert MoELowRankQuantConfig.from_config(qc).fp8.weight_block_size == [128, 128]
    qc["linear_quantization"]["activation_scheme"] = "static"  # vLLM: block FP8 needs dynamic activations
    with pytest.raises(FormatError, match="linear_quantization.*dynamic"):
        MoELowRankQuantConfig.from_config(qc)


@pytest.mark.vllm
def test_deepseek_v3_block_fp8_served(deepseek):
    """Every FP8 linear layer (MLA projections, dense first MLP, shared experts) gets the load-time dequantizing
    method, the router gates stay unquantized, the dense-kept block-FP8 MoE layer the dequantizing FP8 MoE method;
    each MoE block (shared expert in FP8 + FP8 routed experts, compressed or dense-kept) equals transformers'
    float64 block on the dense export for the inputs vLLM gave it."""
    from transformers import AutoModelForCausalLM

    import vllm_probe
    from test_vllm_deepseek import _greedy
    from test_vllm_offline import make_llm, shutdown

    comp = deepseek / "fp8-msvd"
    moe_layers = json.loads((comp / "config.json").read_text())["quantization_config"]["moe_layers"]
    llm = make_llm(comp, enforce_eager=True)
    try:
        methods = llm.apply_model(vllm_probe.linear_methods)[0]
        _check_moe_methods(llm.apply_model(vllm_probe.expert_memory)[0], comp)
        assert llm.apply_model(vllm_probe.install_moe_hooks)[0] == len(moe_layers)
        outs = llm.generate(["def f(x):", "import numpy as np\n"], _greedy(8))
        records = llm.apply_model(vllm_probe.captured)[0]
    finally:
        shutdown(llm)
    _check_linear_methods(methods, Checkpoint(deepseek / "fp8"))
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
    assert {layer for layer, _, _ in records} == set(moe_layers)
    hf = AutoModelForCausalLM.from_pretrained(deepseek / "fp8-msvd-dense", dtype=torch.float64,
                                              experts_implementation="eager")
    worst = 0.0
    with torch.no_grad():
        for layer, x, y in records:
            x, y = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)  # [T, n]
            out = hf.model.layers[layer].mlp(x[None])
            ref = (out[0] if isinstance(out, tuple) else out)[0]
            worst = max(worst, float((y - ref).abs().max() / ref.abs().max()))
    assert worst < 1e-4, f"MoE block output differs from the float64 reference by {worst:.2e} (relative)"


@pytest.mark.vllm
def test_qwen3_per_tensor_fp8_served_token_exact(qwen):
    """Greedy tokens equal transformers (float32) on the dense export, whose FP8 layers hold weight · scale: the
    static input scales are loaded (strict loading) and, with the weights dequantized on this CPU, not applied."""
    import vllm_probe
    from test_vllm_offline import greedy, make_llm, shutdown
    from vllm_cases import hf_greedy, prompt_ids

    dense = qwen / "fp8-msvd-dense"
    plain, _ = prompt_ids(dense)
    ref = hf_greedy(dense, plain)
    llm = make_llm(qwen / "fp8-msvd", enforce_eager=True)
    try:
        methods = llm.apply_model(vllm_probe.linear_methods)[0]
        _check_moe_methods(llm.apply_model(vllm_probe.expert_memory)[0], qwen / "fp8-msvd")
        got = greedy(llm, plain)
    finally:
        shutdown(llm)
    _check_linear_methods(methods, Checkpoint(qwen / "fp8"))
    assert got == ref, f"vLLM {got} != transformers {ref}"


def _check_linear_methods(methods: dict[str, str], src: Checkpoint) -> None:
    """Each vLLM linear layer's method: dequantizing FP8 iff the source stored (all of) its weights in FP8.
    vLLM fuses q/k/v, gate/up and MLA's q_a/kv_a, so a layer is matched to the source weights it loads from."""
    fused = {"qkv_proj": ("q_proj",), "gate_up_proj": ("gate_proj",), "fused_qkv_a_proj": ("q_a_proj",)}
    assert methods
    for name, method in methods.items():
        stem, _, last = name.rpartition(".")
        source = f"{stem}.{fused.get(last, (last,))[0]}.weight"
        assert source in src.tensors, f"{name}: no source weight {source}"
        want = "Fp8DequantLinearMethod" if src.is_fp8(source) else "UnquantizedLinearMethod"
        assert method == want, f"{name}: {method}, expected {want}"
    assert {"Fp8DequantLinearMethod", "UnquantizedLinearMethod"} <= set(methods.values())


def _check_moe_methods(memory: dict, comp) -> None:
    """Each MoE layer's method: the plugin's for a compressed layer; for one kept dense in FP8, vLLM's FP8 MoE
    method, which this CPU (no AMX) replaces by the dequantizing one, holding the dequantized weights."""
    from vllm_moe_lowrank.format import MoELowRankConfig

    cfg = MoELowRankConfig.from_hf_config(json.loads((comp / "config.json").read_text()))
    assert cfg.dense_quantization is not None and cfg.dense_layers() and cfg.layers
    got = {int(name.split(".layers.")[1].split(".")[0]): m for name, m in memory.items()}
    assert set(got) == set(cfg.moe_layers)
    for layer, m in got.items():
        want = "MoELowRankMoEMethod" if layer in cfg.layers else "Fp8DequantMoEMethod"
        assert m["method"] == want, f"layer {layer}: {m['method']}, expected {want}"
        if layer not in cfg.layers:  # w13/w2 in the model dtype (float32), no FP8 scale left
            assert {"w13_weight", "w2_weight"} <= set(m["params"]) and not [n for n in m["params"] if "scale" in n]
            assert m["params"]["w13_weight"][1] == 4 * 2 * cfg.num_experts * cfg.intermediate_size * cfg.hidden_size
