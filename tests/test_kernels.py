"""The CPU matmul switch (``workbench.moe.kernels``): oneDNN agrees with BLAS to fp32 rounding forward and backward,
in the products, in ``nn.Linear`` and in the grouped experts; the switch keeps parameters and goes back; bad names
get one clear line."""
import copy

import pytest
import timm
import torch
import torch.nn as nn

from workbench.models import register
from workbench.moe import MoEMlp, moe_modules, set_cpu_matmul
from workbench.moe import kernels
from workbench.moe.kernels import ONEDNN_MIN_ROWS, OneDNNLinear, a_bt, a_tb, check_cpu_matmul, x_w

pytestmark = pytest.mark.skipif(not kernels.onednn_available(), reason="this torch build has no oneDNN")
register()


@pytest.mark.parametrize("rows", [1, ONEDNN_MIN_ROWS - 1, ONEDNN_MIN_ROWS, 50])
def test_products_agree_with_blas_to_fp32_rounding(rows):
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 24, generator=g), torch.randn(24, 40, generator=g), torch.randn(40, generator=g)
    gy = torch.randn(rows, 40, generator=g)
    for fn, args in ((x_w, (x, w, b)), (x_w, (x, w)), (a_tb, (x, gy)), (a_bt, (gy, w))):
        ref, got = fn(*args), fn(*args, backend="onednn")
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        out = torch.full_like(ref, float("nan"))
        assert fn(*args, out=out, backend="onednn") is out
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(x_w(x, w, b, backend="onednn"), x_w(x, w, b, backend="onednn"))  # deterministic


def test_onednn_linear_matches_nn_linear_forward_and_backward():
    torch.manual_seed(0)
    ref = nn.Linear(24, 40)
    fast = copy.deepcopy(ref)
    fast.__class__ = OneDNNLinear
    x = torch.randn(3, 17, 24, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref, y = ref(x), fast(x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    y_ref.backward(gy)
    y.backward(gy)
    for a, b in ((x2.grad, x.grad), (fast.weight.grad, ref.weight.grad), (fast.bias.grad, ref.bias.grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert fast(torch.randn(2, 24)).shape == (2, 40)  # few rows: BLAS, same result shape


@pytest.mark.parametrize("top_k,shared", [(1, "add"), (2, "none")])
def test_set_cpu_matmul_keeps_parameters_and_agrees_in_training(top_k, shared):
    torch.manual_seed(1)
    model = timm.create_model("vimoe_tiny_patch4_28", moe_layers="last-2", num_experts=4, top_k=top_k,
                              shared_expert=shared, depth=3, embed_dim=48, num_heads=3)
    fast = copy.deepcopy(model)
    params = [id(p) for p in fast.parameters()]
    linears = sum(type(m) is nn.Linear for m in fast.modules())
    assert set_cpu_matmul(fast, "onednn") == linears + len(moe_modules(fast))
    assert [id(p) for p in fast.parameters()] == params
    assert not any(type(m) is nn.Linear for m in fast.modules())
    assert all(layer.cpu_matmul == "onednn" for layer in moe_modules(fast).values())
    assert fast.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(32, 1, 28, 28)
    y_ref, y = model(x), fast(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    y_ref.square().sum().backward()
    y.square().sum().backward()
    for (name, p_ref), p in zip(model.named_parameters(), fast.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-3, atol=1e-5, msg=name)
    set_cpu_matmul(fast, "blas")
    assert sum(type(m) is nn.Linear for m in fast.modules()) == linears
    assert all(layer.cpu_matmul == "blas" for layer in moe_modules(fast).values())
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))  # back on BLAS: bit for bit again


def test_grouped_experts_use_the_backend_and_inference_agrees():
    torch.manual_seed(2)
    layer = MoEMlp(32, 64, num_experts=4, top_k=1)
    x = torch.randn(2, 50, 32)
    with torch.no_grad():
        ref = layer(x)
        layer.cpu_matmul = "onednn"
        got = layer(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_bad_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"cpu_matmul='mkl' is invalid: use one of \('blas', 'onednn'\)"):
        check_cpu_matmul("mkl")
    with pytest.raises(ValueError, match="cpu_matmul='fast' is invalid"):
        set_cpu_matmul(nn.Linear(2, 2), "fast")
    from workbench.train.config import TrainConfig

    with pytest.raises(ValueError, match="cpu_matmul='dnn' is invalid: use 'blas'"):
        TrainConfig(cpu_matmul="dnn").validate()


def test_bench_train_times_each_backend_alike():
    from workbench.bench.models import bench_train, format_train

    result = bench_train(batch=2, steps=1, warmup=0, latency_reps=1, depth=2, embed_dim=32, num_heads=2,
                         moe_layers="last-1", num_experts=2, threads=[1], cpu_matmuls=["blas", "onednn"])
    assert [(t["cpu_matmul"], t["threads"]) for t in result["training"]] == [("blas", 1), ("onednn", 1)]
    assert [(r["cpu_matmul"], r["batch"]) for r in result["latency"]] == [
        ("blas", 1), ("blas", 8), ("onednn", 1), ("onednn", 8)]
    text = format_train(result)
    assert "onednn   1 thread" in text and "  onednn       1     8" in text


def test_train_cli_runs_on_onednn_records_it_and_may_switch_on_resume(tmp_path, capsys):
    from workbench.cli import main

    config = tmp_path / "run.yaml"
    config.write_text("dataset: synthetic\ntrain_subset: 64\ntest_subset: 32\nbatch_size: 32\nepochs: 1\nquiet: true\n"
                      "model_kwargs: {moe_layers: last-1, num_experts: 2, depth: 2, embed_dim: 32, num_heads: 2}\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--output", str(out), "--cpu-matmul", "onednn"]) == 0
    saved = torch.load(out / "checkpoint.pt", weights_only=False)["train_config"]
    assert saved["cpu_matmul"] == "onednn"
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--output", str(out), "--resume", "--epochs", "2",
                 "--cpu-matmul", "blas"]) == 0
    assert "resuming with cpu_matmul onednn -> blas" in capsys.readouterr().out


def test_bench_moe_puts_dense_and_layers_on_the_same_backend(capsys):
    from workbench.cli import main

    assert main(["bench", "moe", "--batch", "2", "--tokens", "8", "--dim", "16", "--expert-hidden", "32",
                 "--num-experts", "2", "--top-k", "1", "--dispatch", "grouped", "--shared", "none", "--routers",
                 "topk", "--reps", "1", "--quiet", "--cpu-matmul", "onednn", "--json"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)
    assert [r["cpu_matmul"] for r in rows] == ["onednn"] and rows[0]["ratio"] > 0


def test_bench_matmul_reports_per_row_cost_per_backend(capsys, tmp_path):
    from workbench.bench.matmul import bench_matmul, format_matmul
    from workbench.cli import main

    r = bench_matmul(rows=(1, 8, 16), dim=16, hidden=32, num_experts=2, reps=2, warmup=1)
    assert [row["rows"] for row in r["rows"]] == [1, 8, 16] and r["backends"] == ["blas", "onednn"]
    for row in r["rows"]:
        for be in r["backends"]:
            assert row[f"{be}_us_per_row"] == pytest.approx(row[f"{be}_us"] / row["rows"], abs=0.06)  # us: 0.1
    text = format_matmul(r)
    assert "blas: 8 rows cost" in text and "the per-row time of 16 rows" in text
    assert main(["bench", "matmul", "--rows", "2,4", "--dim", "8", "--expert-hidden", "16", "--reps", "1",
                 "--cpu-matmul", "blas", "--save", str(tmp_path)]) == 0
    assert "saved" in capsys.readouterr().out and list(tmp_path.glob("matmul-*.json"))
    with pytest.raises(SystemExit):
        main(["bench", "matmul", "--rows", "0,4"])
    assert "'0,4' is invalid: use row counts >= 1" in capsys.readouterr().err


def test_defaults_stay_on_blas_and_odd_inputs_fall_back_or_agree():
    from workbench.train.config import TrainConfig

    assert TrainConfig().cpu_matmul == "blas" and MoEMlp.cpu_matmul == "blas"
    torch.manual_seed(3)
    w = torch.randn(40, 24)
    x = torch.randn(24, 16).t()  # non-contiguous rows
    torch.testing.assert_close(kernels.onednn_linear(x, w), x @ w.t(), rtol=1e-5, atol=1e-5)  # no bias
    b64 = torch.randn(40, dtype=torch.float64)
    assert kernels.onednn_linear(x, w, b64.float()).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.onednn_linear(x, w).dtype == torch.bfloat16  # autocast: torch's own path
    layer = OneDNNLinear(24, 40)
    xg = torch.randn(10, 24, requires_grad=True)
    first = torch.autograd.grad(layer(xg).sum(), xg, create_graph=True)[0]
    with pytest.raises(RuntimeError):
        first.sum().backward()  # no second derivative: an error, never a wrong number
