"""``moe-eval`` (ppl through vLLM / transformers, layer-error, compare) and the benchmark helpers.

The vLLM tests start two engines (the dense fixture through the CLI, a compressed checkpoint in-process); the
compressed checkpoint is the session's ``svd`` case (tests/vllm_cases.py), shared with the plugin tests.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_cases import FIXTURE
from vllm_moe_lowrank.evaluation.cli import main as moe_eval
from vllm_moe_lowrank.evaluation.perplexity import eval_windows, perplexity, resolve_backend

ROOT = Path(__file__).resolve().parents[1]
EVAL = FIXTURE / "eval.txt"
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def hf_fixture():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32).eval()


@torch.no_grad()
def hf_loss_ppl(model, windows: torch.Tensor) -> float:
    """Perplexity from transformers' own shifted-label loss (an independent computation of the protocol)."""
    total = count = 0.0
    for chunk in windows.split(8):
        n = chunk[:, 1:].numel()
        total += float(model(chunk, labels=chunk).loss) * n
        count += n
    return math.exp(total / count)


# ----- ppl ------------------------------------------------------------------------------------------------------
def test_windows_are_fixed():
    w = eval_windows(FIXTURE, EVAL)
    assert w.shape == (64, 256)  # the first 16,384 tokens
    assert torch.equal(w, eval_windows(FIXTURE, EVAL))
    assert eval_windows(FIXTURE, EVAL, 128, 1000).shape == (7, 128)
    with pytest.raises(ValueError, match="fewer than one window"):
        eval_windows(FIXTURE, EVAL, 256, 100)


def test_transformers_backend_matches_hf_loss(hf_fixture):
    r = perplexity(FIXTURE, EVAL, max_tokens=2048, backend="transformers")
    assert (r["windows"], r["tokens"], r["backend"], r["method"]) == (8, 8 * 255, "transformers", "dense")
    assert r["ppl"] == pytest.approx(hf_loss_ppl(hf_fixture, eval_windows(FIXTURE, EVAL, 256, 2048)), rel=1e-5)


def test_backend_choice():
    import importlib.util

    assert resolve_backend("auto") == ("vllm" if importlib.util.find_spec("vllm") else "transformers")
    assert resolve_backend("transformers") == "transformers"
    with pytest.raises(ValueError, match="choose one of"):
        resolve_backend("onnx")


@pytest.mark.vllm
def test_moe_eval_ppl_dense_fixture_matches_transformers(tmp_path, hf_fixture):
    """`moe-eval ppl` (default backend: vLLM prompt logprobs) on the dense fixture, full default windows."""
    out = tmp_path / "ppl.json"
    cmd = [str(Path(sys.executable).with_name("moe-eval")), "ppl", str(FIXTURE), "--text", str(EVAL), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(out.read_text())
    assert (got["backend"], got["windows"], got["tokens"]) == ("vllm", 64, 64 * 255)
    want = hf_loss_ppl(hf_fixture, eval_windows(FIXTURE, EVAL))
    print(f"vLLM {got['ppl']:.5f} vs transformers {want:.5f}: {100 * (got['ppl'] / want - 1):+.4f}%")
    assert abs(got["ppl"] / want - 1) < 0.005
    assert abs(got["ppl"] / 18.21 - 1) < 0.005  # fixtures/README.md


@pytest.mark.vllm
def test_vllm_backend_on_compressed_matches_its_dense_export(checkpoints):
    """What vLLM serves from the factors scores like transformers on the materialized (float32) export."""
    comp, dense = checkpoints("svd")
    served = perplexity(comp, EVAL, max_tokens=4096, backend="vllm")
    ref = perplexity(dense, EVAL, max_tokens=4096, backend="transformers")
    assert (served["method"], served["tokens"]) == ("svd", ref["tokens"])
    print(f"vLLM on {comp.name} {served['ppl']:.5f} vs transformers on the export {ref['ppl']:.5f}")
    assert abs(served["ppl"] / ref["ppl"] - 1) < 0.005


# ----- layer-error ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def svd_case(checkpoints):
    return checkpoints("svd")


@torch.no_grad()
def _hf_layer_outputs(ckpt: Path, windows: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Output hidden states of every decoder layer, and layer 0's routed-expert output, from transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    outs: dict[int, list] = {}
    moe0: list = []
    first = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda m, a, o, i=i: outs.setdefault(i, []).append(first(o)))
    model.model.layers[0].mlp.experts.register_forward_hook(lambda m, a, o: moe0.append(first(o)))
    for chunk in windows.split(8):
        model(chunk)
    flat = lambda ts: torch.cat([t.reshape(-1, t.shape[-1]) for t in ts])  # noqa: E731
    return [flat(outs[i]) for i in sorted(outs)], flat(moe0)


def test_layer_error_matches_transformers(svd_case):
    """Against the fixture: the streamed errors equal full-model transformers runs of the fixture and the export."""
    from vllm_moe_lowrank.evaluation.layer_error import layer_errors

    comp, dense = svd_case
    r = layer_errors(comp, FIXTURE, EVAL, max_tokens=1024)
    windows = eval_windows(FIXTURE, EVAL, 256, 1024)
    h_ref, y_ref = _hf_layer_outputs(FIXTURE, windows)
    h_cmp, y_cmp = _hf_layer_outputs(dense, windows)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    for row, a, b in zip(r["layers"], h_cmp, h_ref):
        assert row["hidden_rel_err"] == pytest.approx(rel(a, b), rel=1e-3, abs=1e-6)
    assert r["layers"][0]["moe_rel_err"] == pytest.approx(rel(y_cmp, y_ref), rel=1e-3)  # same inputs at layer 0
    for row in r["layers"]:
        assert 0.01 < row["moe_rel_err"] < 1
        assert row["calib_rel_err"] == pytest.approx(row["moe_rel_err"], rel=0.5)  # calibration vs held-out


def test_layer_error_cli_against_its_own_export_is_zero(svd_case, tmp_path, capsys):
    """Kernel path on the factors vs the materialized export: only float32 rounding remains."""
    comp, dense = svd_case
    out = tmp_path / "le.json"
    moe_eval(["layer-error", str(comp), "--reference", str(dense), "--text", str(EVAL), "--max-tokens", "512",
              "--out", str(out)])
    assert "| 3 | compressed |" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["tokens"] == 512 and [l["status"] for l in r["layers"]] == ["compressed"] * 4
    assert max(l["moe_rel_err"] for l in r["layers"]) < 1e-5
    assert r["final_hidden_rel_err"] < 1e-5
    with pytest.raises(SystemExit) as e:  # the reference must be the dense source
        moe_eval(["layer-error", str(comp), "--reference", str(comp), "--text", str(EVAL), "--max-tokens", "256"])
    assert e.value.code == 2
    assert "must be the dense checkpoint" in capsys.readouterr().err


# ----- compare --------------------------------------------------------------------------------------------------
def _results(tmp: Path) -> list[Path]:
    def rows(m, pts):
        return [{"method": m, "variant": "default", "ratio": x, "achieved_ratio": x + 1e-4, "ppl": p} for x, p in pts]

    files = {"quality_dense.json": {"ppl": 18.2099, "machine": "test"},
             "quality_svd.json": {"method": "svd", "rows": rows("svd", [(0.2, 18.5), (0.4, 18.9), (0.8, 32.9)])},
             "quality_mobe.json": {"method": "mobe", "rows": rows("mobe", [(0.2, 18.3)]) + [
                 {"method": "mobe", "variant": "default", "ratio": 0.8, "status": "infeasible",
                  "reason": "--ratio 0.8: infeasible for mobe; the largest feasible ratio is 0.7"},
                 {"method": "mobe", "variant": "identity", "ratio": 0.2, "achieved_ratio": 0.2, "ppl": 18.4}]},
             "moe-svd.json": {"checkpoint": "x", "method": "moe-svd", "ratio": 0.4, "achieved_ratio": 0.4002,
                              "ppl": 388.0}}
    for name, data in files.items():
        (tmp / name).write_text(json.dumps(data))
    return [tmp / n for n in files]


def test_compare_table_json_and_plot(tmp_path, capsys):
    import matplotlib.image

    files = _results(tmp_path)
    moe_eval(["compare", *map(str, files), "--out-dir", str(tmp_path / "out")])
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "| svd | 18.50 (+1.6%) | 18.90 (+3.8%) | 32.90 (+80.7%) |" in md
    assert "| mobe | 18.30 (+0.5%) | – | infeasible[^1] |" in md
    assert "[^1]: mobe at 0.8: --ratio 0.8: infeasible for mobe; the largest feasible ratio is 0.7" in md
    assert "| moe-svd | – | 388.00 (+2030.7%) | – |" in md
    assert "identity" not in md  # ablations only with --variants all
    assert md in capsys.readouterr().out
    data = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert data["dense_ppl"] == 18.2099 and len(data["rows"]) == 6
    img = matplotlib.image.imread(tmp_path / "out" / "comparison.png")
    assert img.shape[0] > 500 and img.shape[1] > 800
    moe_eval(["compare", *map(str, files), "--out-dir", str(tmp_path / "out"), "--name", "all", "--variants", "all"])
    assert "| mobe (identity) | 18.40 (+1.0%) |" in (tmp_path / "out" / "all.md").read_text()


def test_compare_checkpoint_folders(tmp_path, svd_case, capsys):
    comp, _ = svd_case
    with pytest.raises(SystemExit):  # no recorded perplexity and no --text
        moe_eval(["compare", str(comp), "--out-dir", str(tmp_path)])
    assert "pass --text FILE" in capsys.readouterr().err
    ckpt = tmp_path / "ckpt"  # a copy holding a `moe-eval ppl --out` result
    ckpt.mkdir()
    (ckpt / "config.json").write_text((comp / "config.json").read_text())
    (ckpt / "moe_eval_ppl.json").write_text(json.dumps({"method": "svd", "ratio": 0.3, "achieved_ratio": 0.3,
                                                        "ppl": 19.0}))
    from vllm_moe_lowrank.evaluation.compare import collect

    r = collect([ckpt])
    assert r["rows"][0]["ppl"] == 19.0 and r["rows"][0]["method"] == "svd"


# ----- benchmark helpers ----------------------------------------------------------------------------------------
def test_quality_records_infeasible_ratio(tmp_path):
    import quality

    row = quality.run_one("svd", 0.999, "default", [], work=tmp_path)
    assert row["status"] == "infeasible" and "largest feasible ratio is" in row["reason"]
    quality.upsert("svd", row, results=tmp_path)
    quality.upsert("svd", {**row, "ratio": 0.998}, results=tmp_path)
    quality.upsert("svd", row, results=tmp_path)  # replaced, not duplicated
    rows = json.loads((tmp_path / "quality_svd.json").read_text())["rows"]
    assert sorted(r["ratio"] for r in rows) == [0.998, 0.999]


def test_measured_run_reports_peak_rss():
    import quality

    r = quality.measured_run([sys.executable, "-c", "x = bytearray(200 * 2**20); x[::4096] = b'1' * len(x[::4096])"])
    assert r["returncode"] == 0 and 200 * 2**20 < r["peak_rss_bytes"] < 1 * 2**30


def test_serve_load_counts_tokens():
    """The throughput client logic against a stub openai client (the real server is exercised by the benchmark)."""
    from types import SimpleNamespace as NS

    import serve_throughput

    class Completions:
        def create(self, **kw):
            assert kw["stream"] and kw["extra_body"] == {"ignore_eos": True}
            for _ in range(kw["max_tokens"]):
                yield NS(choices=[NS(text="x")], usage=None)
            yield NS(choices=[], usage=NS(completion_tokens=kw["max_tokens"]))

    client = NS(completions=Completions())
    r = serve_throughput.run_load(client, "m", serve_throughput.prompts(6), streams=3, requests=2, max_tokens=5)
    assert (r["requests"], r["output_tokens"], r["streams"]) == (6, 30, 3)
    assert r["tokens_per_s"] > 0
    assert len(set(serve_throughput.prompts(16))) == 16


def test_convert_cost_keeps_rows_of_other_methods(tmp_path):
    """A run measuring some methods keeps the rows other runs recorded at the same ratio (and only those)."""
    import convert_cost

    out = tmp_path / "cost.json"
    convert_cost.save(out, 0.4, [{"method": "rfid-moe", "convert_s": 1.0}, {"method": "svd", "convert_s": 2.0}])
    data = convert_cost.save(out, 0.4, [{"method": "(import only)", "convert_s": 0.5},
                                        {"method": "svd", "convert_s": 3.0}])
    assert [(r["method"], r["convert_s"]) for r in data["rows"]] == [("(import only)", 0.5), ("svd", 3.0),
                                                                     ("rfid-moe", 1.0)]
    assert [r["method"] for r in convert_cost.save(out, 0.6, [{"method": "svd"}])["rows"]] == ["svd"]
