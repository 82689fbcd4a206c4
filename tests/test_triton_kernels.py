"""The Triton path (kernels/triton_*.py) against the torch path, for every term kind, both paths, TP/EP splits.

Without a GPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set here before the kernels are
defined) on small shapes. With a GPU the same tests run on CUDA, plus the ``gpu`` tests: full Qwen3-30B-A3B-shaped
layers and CUDA-graph capture/replay through the custom op.
"""

from __future__ import annotations

import importlib.util
import os
import random

import pytest
import torch

from specs import CASES
from test_kernels import make_cfg, random_tensors, reference
from vllm_moe_lowrank.format import FORMAT_VERSION, MoELowRankConfig
from vllm_moe_lowrank.kernels import LayerLayout, experts_forward, moe_lowrank_experts, register_layout
from vllm_moe_lowrank.materialize import float_getter

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed", allow_module_level=True)
HAVE_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAVE_CUDA else "cpu"

def _set_interpret(value: str | None) -> str | None:
    old = os.environ.get("TRITON_INTERPRET")
    if value is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = value
    return old


# Without a GPU the kernels run under the interpreter: the variable must be set when Triton itself is first
# imported (its tl.* helpers are jit functions too) and while kernels run (Triton reads it lazily); it is restored
# in between so that the rest of the session (vLLM subprocesses) never sees it.
_saved = _set_interpret("1") if not HAVE_CUDA else None
try:
    from vllm_moe_lowrank.kernels import triton_forward
    from vllm_moe_lowrank.kernels.triton_common import interpreter_usable
    from vllm_moe_lowrank.kernels.triton_sort import align_pairs, num_blocks
finally:
    if not HAVE_CUDA:
        _set_interpret(_saved)

if not HAVE_CUDA and not interpreter_usable():
    pytest.skip("Triton was imported (by an earlier module) before TRITON_INTERPRET=1 could be set: run this "
                "module in its own pytest process", allow_module_level=True)


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    """Interpreter on; one torch thread (these ops are tiny: on a busy machine, thread hand-offs cost 10–100×)."""
    if HAVE_CUDA:
        yield
        return
    saved, threads = _set_interpret("1"), torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    _set_interpret(saved)


gpu = pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU")
E, N, M = 6, 32, 24  # small: the interpreter runs every program in numpy
SMALL = dict(bk=32, br=16, bn_units=32, bn_hidden=32, token_bm=16, token_bn=32, combine_bm=16)


def routing(T: int, K: int, E: int = E, n: int = N, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, n, generator=g).to(dtype)
    ids = torch.zeros(T, K, dtype=torch.int32)  # [T, K] distinct experts per token
    for t in range(T):
        ids[t] = torch.randperm(E, generator=g)[:K]
    w = torch.softmax(torch.randn(T, K, generator=g), 1)
    return x.to(DEV), w.to(DEV), ids.to(DEV)


def loaded(cfg, tensors, dtype, tp_rank=0, tp_size=1, experts=None, key=""):
    layout = LayerLayout(cfg, 1, tp_rank=tp_rank, tp_size=tp_size, local_experts=experts, key=key)
    bufs = layout.new_buffers(dtype, DEV)
    for name in layout.blocks:
        layout.store(bufs, name, tensors[name].to(DEV))
    bufs.update(layout.finalize(bufs))
    return layout, bufs


def both(cfg, tensors, x, w, ids, dtype=torch.float32, tp=1, ep=1, path=None, config=SMALL):
    """(triton, torch) outputs summed over the simulated TP × EP ranks (float64)."""
    got = torch.zeros(x.shape[0], cfg.hidden_size, dtype=torch.float64, device=DEV)
    ref = torch.zeros_like(got)
    En = cfg.num_experts
    for rank in range(tp * ep):
        experts = list(range(rank * En // ep, (rank + 1) * En // ep)) if ep > 1 else None
        layout, bufs = loaded(cfg, tensors, dtype, rank % tp, tp, experts)
        got += triton_forward.experts_forward_triton(layout, bufs, x.to(dtype), w, ids, path=path,
                                                     config=config).double()
        ref += experts_forward(layout, bufs, x.to(dtype), w, ids).double()
    return got, ref


# ----- sorting ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("T,K,F,E_,bm", [(1, 8, 128, 128, 16), (9, 3, 4, 6, 16), (70, 3, 5, 8, 16), (41, 2, 3, 3, 32)])
def test_sort_is_block_aligned_and_invertible(parallel, T, K, F, E_, bm):
    g = torch.Generator().manual_seed(T)
    foe = torch.randint(0, F, (E_,), generator=g)
    foe[torch.randperm(E_, generator=g)[:E_ // 4]] = -1  # experts on other EP ranks
    ids = torch.randint(0, E_, (T, K), generator=g, dtype=torch.int32)
    srt = align_pairs(ids.to(DEV), foe.to(DEV), F, bm, parallel=parallel)
    fid = foe[ids.reshape(-1).long()]
    pos = srt.pos_of_pair.cpu().long()
    bf, br, sp = srt.block_func.cpu().long(), srt.block_rows.cpu().long(), srt.sorted_pair.cpu().long()
    assert srt.num_blocks == num_blocks(T * K, F, bm)
    keep = fid >= 0
    assert (pos[~keep] == -1).all()
    p = keep.nonzero().squeeze(1)
    assert (sp[pos[p]] == p).all()  # inverse permutation
    assert (bf[pos[p] // bm] == fid[p]).all()  # each pair sits in a block of its function
    assert (pos[p] % bm < br[pos[p] // bm]).all()  # ... within the block's valid rows
    counts = torch.bincount(fid[keep], minlength=F)
    for f in range(F):  # each function: cdiv(count, bm) blocks, rows adding up to its count
        blocks = (bf == f).nonzero().squeeze(1)
        assert blocks.numel() == -(-int(counts[f]) // bm) and int(br[blocks].sum()) == int(counts[f])
    assert (br[bf < 0] == 0).all()


# ----- every term kind, both paths ------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["lowrank", "dense_tile"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch_path(case, path):
    cfg = make_cfg(case, E=E, n=N, m=M)
    tensors = random_tensors(cfg)
    x, w, ids = routing(9, 3)
    got, ref = both(cfg, tensors, x, w, ids, path=path)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def _ranks_sum_to_the_materialized_layer(cfg, tensors, tp: int, ep: int, path: str) -> None:
    """The TP/EP ranks' outputs sum to the torch path's and to the dense reference (float64)."""
    x, w, ids = routing(7, 3, seed=3)
    got, ref = both(cfg, tensors, x, w, ids, tp=tp, ep=ep, path=path)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    dense = reference(cfg, tensors, x.cpu().double(), w.cpu(), ids.cpu()).to(DEV)
    torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case,tp,ep,path", [("rs_moe", 2, 1, "lowrank"), ("mixed", 3, 1, "lowrank"),
                                             ("mobe", 2, 1, "dense_tile"), ("moe_svd", 1, 2, "lowrank"),
                                             ("rfid", 1, 3, "dense_tile"), ("mobe_identity", 1, 2, "lowrank"),
                                             ("rs_moe", 3, 1, "dense_tile")])
def test_tp_ep_ranks_sum_to_the_materialized_layer(case, tp, ep, path):
    """TP-narrowed and EP-selected layouts: the ranks' outputs sum to the dense reference (float64)."""
    cfg = make_cfg(case, seed=2, E=E, n=N, m=M)
    tensors = random_tensors(cfg, seed=2)
    _ranks_sum_to_the_materialized_layer(cfg, tensors, tp, ep, path)


@pytest.mark.parametrize("case", ["moe_svd", "rfid"])
def test_group_factor_per_pair_when_more_groups_than_topk(case):
    """top-1 routing: group-shared right factors go through the pair shrink instead of the token GEMM."""
    cfg = make_cfg(case, E=E, n=N, m=M)
    tensors = random_tensors(cfg)
    x, w, ids = routing(11, 1)
    layout, bufs = loaded(cfg, tensors, torch.float32)
    assert triton_forward.get_plan(layout, bufs, 1, torch.device(DEV)).proj["gate"].lowrank.mode == "pair"
    got, ref = both(cfg, tensors, x, w, ids)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_parallel_sort_and_chunks_in_the_forward(monkeypatch):
    monkeypatch.setattr(triton_forward, "CHUNK_TOKENS", 13)  # 3 chunks, the last one ragged
    cfg = make_cfg("rs_moe", E=E, n=N, m=M)
    tensors = random_tensors(cfg)
    x, w, ids = routing(30, 3)
    got, ref = both(cfg, tensors, x, w, ids, config=dict(SMALL, parallel_sort=True, bm=32))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["mixed", "rs_moe", "mobe"])
def test_bfloat16(case):
    cfg = make_cfg(case, seed=3, E=E, n=N, m=M)
    tensors = random_tensors(cfg, seed=3)
    x, w, ids = routing(9, 3, seed=4)
    dense = reference(cfg, tensors, x.cpu().double(), w.cpu(), ids.cpu()).to(DEV)
    for path in ("lowrank", "dense_tile"):
        got, ref = both(cfg, tensors, x, w, ids, dtype=torch.bfloat16, path=path)
        scale = dense.abs().max()
        assert (got - dense).abs().max() < 0.05 * scale, path
        assert (got - ref).abs().max() < 0.05 * scale, path


def test_zero_tokens_and_unsupported_dtype():
    cfg = make_cfg("svd", E=E, n=N, m=M)
    layout, bufs = loaded(cfg, random_tensors(cfg), torch.float32)
    x, w, ids = routing(0, 2)
    assert triton_forward.experts_forward_triton(layout, bufs, x, w, ids).shape == (0, N)
    with pytest.raises(TypeError, match="unsupported dtype"):
        triton_forward.experts_forward_triton(layout, bufs, x.double(), w, ids)


def test_registered_as_the_cuda_implementation():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("moe_lowrank::experts", "CUDA")


# ----- GPU: full shapes, CUDA graphs -------------------------------------------------------------------------------
def full_cfg(case: str, E: int = 128, n: int = 2048, m: int = 768, r: int = 128) -> MoELowRankConfig:
    spec = CASES[case](E, m, random.Random(0), r)
    return MoELowRankConfig(format_version=FORMAT_VERSION, method=spec.method, num_experts=E, hidden_size=n,
                            intermediate_size=m, moe_prefix="model.layers.{layer}.mlp.experts", moe_layers=[0, 1],
                            layers={1: spec})


def _both_paths_match_torch_at_full_shape(layout, bufs) -> None:
    """Both Triton paths against the torch path on a Qwen3-30B-shaped layer, decode and prefill token counts."""
    for T in (1, 64, 2048):
        x, w, ids = routing(T, 8, E=128, n=2048, seed=T, dtype=torch.bfloat16)
        ref = experts_forward(layout, bufs, x, w, ids).double()
        scale = ref.abs().max()
        for path in ("lowrank", "dense_tile"):
            got = triton_forward.experts_forward_triton(layout, bufs, x, w, ids, path=path).double()
            assert (got - ref).abs().max() < 0.02 * scale, (T, path)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", sorted(CASES))
def test_full_shape_bf16(case):
    """Qwen3-30B-A3B-shaped layer (E=128, n=2048, m=768, top-8), both paths, decode and prefill token counts."""
    cfg = full_cfg(case)
    tensors = random_tensors(cfg)
    layout, bufs = loaded(cfg, tensors, torch.bfloat16)
    _both_paths_match_torch_at_full_shape(layout, bufs)


def _captured(x, w, ids, layout, tlist):
    """(CUDA graph, its output buffer) of one op call on x / w / ids, after a warm-up call on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        moe_lowrank_experts(x, w, ids, layout, tlist)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_lowrank_experts(x, w, ids, layout, tlist)
    return graph, out


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T", [4, 300])  # one-program sort / parallel sort
@pytest.mark.parametrize("case", ["mixed", "rs_moe", "mobe"])
def test_cuda_graph_capture_and_replay(case, T):
    cfg = full_cfg(case, E=32, n=512, m=256, r=32)
    tensors = random_tensors(cfg)
    layout, bufs = loaded(cfg, tensors, torch.bfloat16, key=f"test.graph.{case}.{T}")
    register_layout(layout)
    tlist = [bufs[n] for n in layout.tensor_names]
    x, w, ids = routing(T, 4, E=32, n=512, seed=1, dtype=torch.bfloat16)
    eager = moe_lowrank_experts(x, w, ids, layout, tlist)  # warm-up: builds the plan, compiles the kernels
    torch.testing.assert_close(eager, triton_forward.experts_forward_triton(layout, bufs, x, w, ids))
    graph, out = _captured(x, w, ids, layout, tlist)
    for seed in (2, 3):  # new tokens and routing, written in place
        x2, w2, ids2 = routing(T, 4, E=32, n=512, seed=seed, dtype=torch.bfloat16)
        x.copy_(x2)
        w.copy_(w2)
        ids.copy_(ids2)
        graph.replay()
        torch.cuda.synchronize()
        ref = experts_forward(layout, bufs, x2, w2, ids2)
        scale = ref.double().abs().max()
        assert (out.double() - ref.double()).abs().max() < 0.02 * scale


# ----- FP8 factors (format version >= 2) ---------------------------------------------------------------------------
def fp8_layer(case: str, seed: int = 0, refit: bool = True, device: str | None = None,
              version: int = FORMAT_VERSION, **dims):
    """(float cfg, FP8 cfg, FP8 tensors with scales); ``dims`` with r: a full-shape layer (``full_cfg``);
    ``device``: drawn and quantized there (fast full shapes on a GPU); ``version``: the format version (its scale
    axes)."""
    from vllm_moe_lowrank.converters.quantize import quantize_layer

    dims = dims or dict(E=E, n=N, m=M)
    plain = make_cfg(case, seed=seed, **dims) if "r" not in dims else full_cfg(case, **dims)
    cfg = plain.model_copy(update={"factor_dtype": "fp8_e4m3", "format_version": version})
    tensors, _ = quantize_layer(cfg, 1, random_tensors(plain, seed=seed, device=device), None, None, refit=refit)
    return plain, cfg, tensors


def dequantized(plain, cfg, tensors) -> dict[str, torch.Tensor]:
    """The FP8 layer's tensors dequantized (float32), named as the float layer ``plain`` has them."""
    get = float_getter(cfg, tensors.__getitem__)
    return {name: get(name) for name in plain.tensor_specs(1)}


def assert_reads_fp8(layout, bufs) -> None:
    """The Triton plan points the kernels at the stored FP8 buffers (no float copy of any factor)."""
    plan = triton_forward.get_plan(layout, bufs, 3, torch.device(DEV))
    assert plan.q
    fp8 = {n for n, (_, d) in layout.buffers.items() if d == "fp8"}
    assert fp8 and all(bufs[n].dtype == torch.float8_e4m3fn for n in fp8)
    read = [t for pp in plan.proj.values() for t in (pp.dense, pp.lowrank and pp.lowrank.u,
                                                     pp.lowrank and pp.lowrank.v, pp.residual and pp.residual.eta)
            if isinstance(t, torch.Tensor) and t.numel() > 1]
    assert read and all(t.dtype == torch.float8_e4m3fn for t in read)


@pytest.mark.parametrize("path", ["lowrank", "dense_tile"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fp8_factors(case, path):
    """FP8 factors with their scales, every term kind (ragged ranks included): the kernels dequantize in their
    loads and equal the torch path on the same FP8 factors, the Triton path on the dequantized float factors, and
    the dense reference."""
    plain, cfg, tensors = fp8_layer(case)
    x, w, ids = routing(9, 3)
    assert_reads_fp8(*loaded(cfg, tensors, torch.float32))
    got, ref = both(cfg, tensors, x, w, ids, path=path)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    got_float, _ = both(plain, dequantized(plain, cfg, tensors), x, w, ids, path=path)
    torch.testing.assert_close(got, got_float, rtol=1e-4, atol=1e-5)
    dense = reference(cfg, tensors, x.cpu().double(), w.cpu(), ids.cpu()).to(DEV)
    torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", ["lowrank", "dense_tile"])
def test_fp8_version_2_row_scaled_down_weight(path):
    """A format-v2 FP8 layer (down's kept-unit weight scaled per hidden row; v3 scales it per unit) still computes
    its materialized layer on both paths, TP-split too (the kernels take the dense weight's axis from the layout)."""
    _, cfg, tensors = fp8_layer("rs_moe", seed=5, version=2)
    assert cfg.tensor_specs(1)[cfg.tensor_name(1, "down", "weight", 0)].scale_axis == 0
    x, w, ids = routing(9, 3)
    got, ref = both(cfg, tensors, x, w, ids, path=path)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    _ranks_sum_to_the_materialized_layer(cfg, tensors, 2, 1, path)


@pytest.mark.parametrize("case,tp,ep,path", [("rs_moe", 2, 1, "lowrank"), ("mixed", 3, 1, "dense_tile"),
                                             ("rfid", 2, 1, "lowrank"), ("moe_svd", 1, 2, "dense_tile")])
def test_fp8_tp_ep_ranks_sum_to_the_materialized_layer(case, tp, ep, path):
    """FP8 scales narrowed with their data (or replicated) under TP and selected under EP."""
    _, cfg, tensors = fp8_layer(case, seed=2)
    _ranks_sum_to_the_materialized_layer(cfg, tensors, tp, ep, path)


@pytest.mark.parametrize("case", ["mixed", "rfid"])
def test_fp8_factors_bfloat16(case):
    """bf16 activations on FP8 factors (the tiles are dequantized in float32, then cast to bf16 for the product)."""
    _, cfg, tensors = fp8_layer(case, seed=3)
    x, w, ids = routing(9, 3, seed=4)
    dense = reference(cfg, tensors, x.cpu().double(), w.cpu(), ids.cpu()).to(DEV)
    for path in ("lowrank", "dense_tile"):
        got, ref = both(cfg, tensors, x, w, ids, dtype=torch.bfloat16, path=path)
        scale = dense.abs().max()
        assert (got - dense).abs().max() < 0.05 * scale, path
        assert (got - ref).abs().max() < 0.05 * scale, path


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", ["mixed", "rs_moe", "rfid", "mobe_identity"])  # every term kind and mode
def test_full_shape_fp8(case):
    """Qwen3-30B-A3B-shaped layer with FP8 factors: the FP8 buffers stay FP8 on the GPU (half the bf16 factor
    bytes) and both paths match the torch path on the same factors, decode and prefill token counts."""
    _, cfg, tensors = fp8_layer(case, refit=False, device=DEV, E=128, n=2048, m=768, r=128)
    layout, bufs = loaded(cfg, tensors, torch.bfloat16)
    assert_reads_fp8(layout, bufs)
    _both_paths_match_torch_at_full_shape(layout, bufs)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", ["mixed", "rs_moe", "mobe"])
def test_cuda_graph_capture_and_replay_fp8(case):
    _, cfg, tensors = fp8_layer(case, refit=False, device=DEV, E=32, n=512, m=256, r=32)
    layout, bufs = loaded(cfg, tensors, torch.bfloat16, key=f"test.graph.fp8.{case}")
    register_layout(layout)
    tlist = [bufs[n] for n in layout.tensor_names]
    x, w, ids = routing(64, 4, E=32, n=512, seed=1, dtype=torch.bfloat16)
    moe_lowrank_experts(x, w, ids, layout, tlist)  # warm-up: builds the plan, compiles the kernels
    graph, out = _captured(x, w, ids, layout, tlist)
    x2, w2, ids2 = routing(64, 4, E=32, n=512, seed=2, dtype=torch.bfloat16)
    x.copy_(x2)
    w.copy_(w2)
    ids.copy_(ids2)
    graph.replay()
    torch.cuda.synchronize()
    ref = experts_forward(layout, bufs, x2, w2, ids2)
    assert (out.double() - ref.double()).abs().max() < 0.02 * ref.double().abs().max()
