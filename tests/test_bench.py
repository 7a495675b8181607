"""The benchmark runs and reports what it claims to; speed itself is never asserted here."""
import os
import json
import sys
from pathlib import Path, PureWindowsPath

import pytest
import timm
import torch

from workbench import bench
from workbench.bench.layers import _backward, bench_moe, bench_peers, format_peers_table
from workbench.bench.models import bench_train
from workbench.bench.timing import saved_bytes, write_result
from workbench.moe import moe_modules

ROOT = Path(__file__).resolve().parents[1]
RECORDED = sorted((ROOT / "experiments" / "results" / "bench").glob("*.json"))


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value
from workbench.cli import main
from workbench.moe import MoEMlp


def test_bench_moe_rows_and_fields():
    rows = bench_moe(batch=2, tokens=5, dim=16, expert_hidden=32, num_experts=4, top_ks=(1, 2), reps=2, warmup=1)
    assert len(rows) == 2 * 2 * 5  # k x shared x (three top-k paths, experts-choose, Soft MoE)
    assert {r["dispatch"] for r in rows} == {"grouped", "loop", "einsum", "experts_choose(cf=1)", "soft(S=1)",
                                             "experts_choose(cf=2)", "soft(S=2)"}  # S = round(k * 5 / 4)
    assert all(r["ms"] > 0 and r["dense_ms"] > 0 and r["mem_bytes"] > 0 for r in rows)
    only = bench_moe(batch=2, tokens=5, dim=16, expert_hidden=32, num_experts=4, top_ks=(1,), reps=1, warmup=0,
                     shared=("none",), routers=("soft",))
    assert [r["dispatch"] for r in only] == ["soft(S=1)"]


def test_activation_memory_excludes_parameters_and_counts_activations():
    layer = MoEMlp(16, 32, num_experts=4)
    x = torch.randn(2, 8, 16, requires_grad=True)
    with saved_bytes(exclude=layer) as total:
        layer(x)
    with saved_bytes() as with_params:
        layer(x)
    weights = sum(p.numel() * 4 for p in (layer.w1, layer.w2))
    assert with_params[0] - total[0] >= weights
    assert total[0] >= 2 * 16 * 32 * 4  # at least the pre- and post-activation of every token


def test_bench_train_reports_ratio():
    result = bench_train(batch=4, steps=1, warmup=1, latency_reps=2, depth=2, embed_dim=32, num_heads=2,
                         moe_layers="last-1", num_experts=2)
    assert result["moe_img_s"] > 0 and result["dense_img_s"] > 0
    rounding = 0.05 / result["moe_img_s"] + 0.05 / result["dense_img_s"]  # img/s are rounded to 0.1 (slow on a loaded CPU)
    assert result["throughput_ratio"] == pytest.approx(result["moe_img_s"] / result["dense_img_s"],
                                                       rel=0.01 + rounding)
    assert result["params_moe"] > result["params_dense"]
    # the optimizer step is timed alone and taken out of both steps for the second ratio
    t = result["training"][0]
    assert 0 < t["moe_optimizer_ms"] < t["moe_step_ms"] and 0 < t["dense_optimizer_ms"] < t["dense_step_ms"]
    moe, dense = t["moe_step_ms"] - t["moe_optimizer_ms"], t["dense_step_ms"] - t["dense_optimizer_ms"]
    rounding = 0.06 / moe + 0.06 / dense + 0.001  # step ms are rounded to 0.1, optimizer ms to 0.01, the ratio to 0.001
    assert t["ratio_without_optimizer"] == pytest.approx(dense / moe, rel=rounding)
    assert "the optimizer alone takes" in bench.format_train(result)


def test_bench_train_latency_per_thread_count_against_macs():
    before = torch.get_num_threads()
    result = bench_train(batch=2, steps=1, warmup=0, latency_reps=1, depth=2, embed_dim=32, num_heads=2,
                         moe_layers="last-1", num_experts=2, shared_expert="add", threads=[1, 2])
    assert torch.get_num_threads() == before
    assert [t["threads"] for t in result["training"]] == [1, 2]
    assert [(r["threads"], r["batch"]) for r in result["latency"]] == [(1, 1), (1, 8), (2, 1), (2, 8)]
    assert result["macs_ratio"] > 1  # the shared expert and the router add MACs
    for r in result["latency"]:
        assert r["vs_macs"] == pytest.approx(r["ratio"] / result["macs_ratio"], abs=2e-3)
        assert r["sorted_ms"] > 0 and r["sorted_vs_macs"] > 0  # the same ViMoE with the padded path off
        assert r["fixed_ms"] > 0 and r["one_copy_vs_macs"] == pytest.approx(
            r["one_copy_ms"] / r["dense_ms"] / result["macs_ratio"], abs=0.05)
    assert result["moe_latency_ms"] == result["latency"][0]["moe_ms"] and result["threads"] == 1
    text = bench.format_train(result)
    assert "2 threads" in text and "one copy" in text and f"{result['macs_ratio']:.3f}x dense" in text


def test_bench_cli_json(capsys, tmp_path):
    assert main(["bench", "moe", "--batch", "2", "--tokens", "4", "--dim", "16", "--expert-hidden", "32",
                 "--num-experts", "2", "--top-k", "1", "--reps", "1", "--json", "--save", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out[:out.rindex("]") + 1])
    assert len(rows) == 2 * 5  # shared none/add x (grouped, loop, einsum, experts-choose, Soft MoE)
    saved = list(tmp_path.glob("moe-*.json"))
    assert len(saved) == 1 and "provenance" in json.loads(saved[0].read_text())


def test_bench_moe_shows_progress_and_the_expected_time(capsys):
    assert main(["bench", "moe", "--batch", "2", "--tokens", "4", "--dim", "16", "--expert-hidden", "32",
                 "--num-experts", "2", "--top-k", "1", "2", "--shared", "none", "--reps", "2", "--json"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # the bar goes to stderr: stdout stays the JSON
    assert "bench moe: top-2, shared none" in captured.err and "14/14 rounds" in captured.err  # 2 x (5 + 2)
    assert "expected" in captured.err and "more]" in captured.err
    assert main(["bench", "moe", "--batch", "2", "--tokens", "4", "--dim", "16", "--expert-hidden", "32",
                 "--num-experts", "2", "--top-k", "1", "--shared", "none", "--reps", "1", "--quiet"]) == 0
    assert "rounds" not in capsys.readouterr().err


def test_bench_cli_rejects_bad_top_k(capsys):
    with pytest.raises(SystemExit) as err:
        main(["bench", "moe", "--num-experts", "2", "--top-k", "3"])
    assert err.value.code == 2


def test_bench_app(tmp_path):
    import timm
    from workbench.train.checkpoint import model_config, save_model

    model = timm.create_model("vimoe_tiny_patch4_28", moe_layers="last-1", num_experts=2)
    save_model(model, model_config("vimoe_tiny_patch4_28", {"moe_layers": "last-1", "num_experts": 2}), tmp_path)
    from workbench.bench.models import bench_app

    result = bench_app(tmp_path, reps=2)
    assert result["total_ms"] >= result["forward_ms"] > 0


def test_recorded_bench_files_hold_no_absolute_paths():
    assert RECORDED, "no recorded bench results under experiments/results/bench"
    for path in RECORDED:
        record = json.loads(path.read_text())
        absolute = [s for s in _strings(record) if Path(s).is_absolute() or PureWindowsPath(s).is_absolute()]
        assert absolute == [], f"{path.name} records absolute paths: {absolute}"
        assert str(ROOT) not in path.read_text()


def test_write_result_stores_repo_relative_paths(tmp_path):
    checkpoint = ROOT / "experiments" / "checkpoints" / "vimoe_tiny_fmnist"
    payload = {"checkpoint": str(checkpoint), "runs": [checkpoint / "model.safetensors"], "threads": 2,
               "device": "cpu", "outside": "/elsewhere/model"}
    record = json.loads(write_result("app", payload, tmp_path).read_text())
    assert record["results"] == {"checkpoint": "experiments/checkpoints/vimoe_tiny_fmnist",
                                 "runs": ["experiments/checkpoints/vimoe_tiny_fmnist/model.safetensors"],
                                 "threads": 2, "device": "cpu", "outside": "/elsewhere/model"}


TINY = dict(batch=2, tokens=8, dim=16, expert_hidden=32, num_experts=4, reps=1, warmup=0, threads=[1])
PEER_MODULES = ("transformers", "st_moe_pytorch", "mixture_of_experts")


def test_bench_peers_without_peers_says_how_to_install(monkeypatch, capsys):
    for name in PEER_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # an import of it now raises ImportError
    result = bench_peers(**TINY)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "pip install -e '.[peers]'" in out
    assert "transformers, st-moe-pytorch, mixture-of-experts" in out
    assert result["skipped"] == ["transformers", "st-moe-pytorch", "mixture-of-experts"]
    assert {r["layer"] for r in result["rows"]} == set(result["layers"])
    assert all(r["layer"].startswith("workbench") and r["ratio"] > 0 for r in result["rows"])
    assert "not installed, skipped" in format_peers_table(result)


def test_bench_peers_with_peers():
    for name in PEER_MODULES:
        pytest.importorskip(name)
    result = bench_peers(**TINY, top_ks=(1, 2))
    layers = {r["layer"] for r in result["rows"]}
    assert any("Mixtral" in name for name in layers) and any("Qwen2-MoE" in name for name in layers)
    assert any("st-moe" in name for name in layers) and any("mixture-of-experts" in name for name in layers)
    assert result["skipped"] == [] and set(result["peer_versions"]) == set(bench.PEER_DISTRIBUTIONS)
    st_moe = {r["top_k"] for r in result["rows"] if "st-moe" in r["layer"]}
    assert st_moe == {2}  # its gating needs top-n >= 2
    for r in result["rows"]:
        assert r["ms"] > 0 and r["dense_ms"] > 0 and r["ratio"] == pytest.approx(r["ms"] / r["dense_ms"], rel=0.01)
    swiglu = {r["dense"] for r in result["rows"] if "transformers" in r["layer"]}
    assert swiglu == {"SwiGLU 32", "SwiGLU 64", "SwiGLU 96"}  # Mixtral k*h; Qwen2-MoE (k+1)*h with its shared expert


def test_peer_layers_compute_finite_outputs_and_gradients():
    for name in PEER_MODULES:
        pytest.importorskip(name)
    contenders, forms, missing = bench.peer_contenders(16, 32, 4)
    x = torch.randn(2, 8, 16, requires_grad=True)
    for c in contenders:
        layer = c.build(c.top_ks[-1])
        y = _backward(layer(x), torch.ones(2, 8, 16))
        assert y.shape == x.shape and torch.isfinite(y).all(), c.name
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in layer.parameters()), c.name
    assert missing == [] and set(forms) == {"SwiGLU", "GEGLU", "GELU MLP, no biases"}


def test_format_peers_table():
    rows = [{"layer": "a", "top_k": k, "threads": n, "ratio": r, "dense": "GELU MLP 64", "ms": 10 * r + n,
             "dense_ms": 10.0 + n} for (n, k), r in {(1, 1): 0.95, (1, 2): 0.9, (2, 1): 1.0, (2, 2): 0.875}.items()]
    rows += [{"layer": "b", "top_k": 2, "threads": n, "ratio": 1.5, "dense": "GEGLU 64", "ms": 30.0, "dense_ms": 20.0}
             for n in (1, 2)]
    result = {"rows": rows, "layers": ["a", "b"], "threads": [1, 2], "top_ks": [1, 2], "reps": 3, "batch": 4,
              "tokens": 50, "dim": 16, "expert_hidden": 32, "num_experts": 4, "machine": "CPU X, 2 cores",
              "torch": "2.x", "load_avg_1min": 0.12, "quiet": True, "skipped": []}
    lines = format_peers_table(result).splitlines()
    assert lines[0] == ("| layer | dense reference | top-1, 1 thread | top-2, 1 thread | top-1, 2 threads "
                        "| top-2, 2 threads |")
    assert lines[1] == "|---|---|---:|---:|---:|---:|"
    assert lines[2] == "| a | GELU MLP | 0.95x | 0.90x | 1.00x | 0.88x |"
    assert lines[3] == "| b | GEGLU | n/a | 1.50x | n/a | 1.50x |"
    assert lines[5] == ("| layer: fwd+bwd ms (its dense reference's ms) | top-1, 1 thread | top-2, 1 thread "
                        "| top-1, 2 threads | top-2, 2 threads |")
    assert lines[7] == "| a | 10.5 (11.0) | 10.0 (11.0) | 12.0 (12.0) | 10.8 (12.0) |"
    assert lines[8] == "| b | n/a | 30.0 (20.0) | n/a | 30.0 (20.0) |"
    assert "T = 200 tokens" in lines[10] and "CPU X, 2 cores" in lines[10] and "load average 0.12" in lines[10]
    assert "(quiet)" in lines[10] and len(lines) == 11


def test_load_note_warns_under_load(monkeypatch, capsys):
    monkeypatch.setattr(os, "getloadavg", lambda: (3.2, 1.0, 0.5))
    assert bench.load_note() == {"load_avg_1min": 3.2, "quiet": False}
    assert "load average is 3.20" in capsys.readouterr().err
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert bench.load_note() == {"load_avg_1min": 0.1, "quiet": True}
    assert capsys.readouterr().err == ""


def test_bench_peers_cli_saves_with_machine_and_load(capsys, tmp_path):
    assert main(["bench", "peers", "--no-peers", "--batch", "2", "--tokens", "4", "--dim", "16", "--expert-hidden",
                 "32", "--num-experts", "2", "--top-k", "1", "--dispatch", "grouped", "--threads", "1", "--reps", "1",
                 "--warmup", "0", "--save", str(tmp_path)]) == 0
    assert "| workbench `grouped` | GELU MLP |" in capsys.readouterr().out
    saved = list(tmp_path.glob("peers-*.json"))
    assert len(saved) == 1
    record = json.loads(saved[0].read_text())
    results = record["results"]
    assert {"machine", "threads", "torch", "quiet", "load_avg_1min"} <= results.keys() and "provenance" in record
    assert [r["layer"] for r in results["rows"]] == ["workbench `grouped`", "workbench `grouped` + gated shared expert"]


def test_bench_cli_rejects_bad_threads(capsys):
    with pytest.raises(SystemExit) as err:
        main(["bench", "peers", "--threads", "0,2"])
    assert err.value.code == 2 and "thread counts >= 1" in capsys.readouterr().err


def test_bench_moe_presets_cover_both_vit_shapes_and_expert_counts(capsys):
    assert main(["bench", "moe", "--preset", "vit-s16", "vit-b16", "--batch", "1", "--tokens", "3", "--dim", "8",
                 "--expert-hidden", "16", "--dtype", "fp32", "--reps", "1", "--quiet", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["preset"], r["num_experts"], r["top_k"]) for r in rows] == [
        (p, e, k) for p in ("vit-s16", "vit-b16") for e in (8, 16) for k in (1, 2)]
    assert {r["dispatch"] for r in rows} == {"grouped"} and {r["shared"] for r in rows} == {"none"}
    assert rows[0]["dim"] == 8  # a flag beside the preset overrides it
    from workbench.bench.layers import MOE_PRESETS
    assert MOE_PRESETS["vit-b16"] == {"batch": 256, "tokens": 197, "dim": 768, "expert_hidden": 3072}


def test_bench_step_reports_img_s_and_memory_fields():
    result = bench.bench_step(img_size=32, depth=2, batch=2, steps=1, warmup=0, device="cpu")
    assert result["input_size"] == [3, 32, 32] and result["moe_img_s"] > 0 and result["dense_img_s"] > 0
    assert result["moe_peak_mb"] is None and result["params_moe"] > result["params_dense"]  # peak memory: CUDA only
    text = bench.format_step(result)
    assert "ViMoE-" not in text and "img/s" in text and "not measured (CUDA only)" in text


def test_bench_step_refuses_bad_sizes(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "step", "--batch", "0"])
    assert "--batch 0" in capsys.readouterr().err


def test_latency_diagnostics_route_to_fixed_experts_and_read_one_experts_weights():
    """bench train's two equal-MACs diagnostics: `fixed` sends every token to experts 0..k-1 (as routed gates),
    `one copy` keeps the routing but every expert is a view of expert 0's weights; the model itself is untouched."""
    from workbench.bench.models import _fixed_routing, _one_copy

    torch.manual_seed(0)
    model = timm.create_model("vimoe_tiny_patch4_28", depth=2, embed_dim=32, num_heads=2, moe_layers="last-1",
                              num_experts=4, top_k=2).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 1, 28, 28)
    fixed, copied = _fixed_routing(model), _one_copy(model)
    layer, fixed_layer, copied_layer = (next(iter(moe_modules(m).values())) for m in (model, fixed, copied))
    tokens = torch.randn(10, 32)
    assert fixed_layer.router(tokens)[2].tolist() == [[0, 1]] * 10
    assert layer.router(tokens)[2].tolist() == copied_layer.router(tokens)[2].tolist() != [[0, 1]] * 10
    assert copied_layer.w1.stride(0) == 0 and torch.equal(copied_layer.w2[3], layer.w2[0])
    with torch.no_grad():
        assert not torch.allclose(fixed(x), model(x)) and not torch.allclose(copied(x), model(x))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bench_train_reports_weight_bytes_and_cache(tmp_path):
    from workbench.bench.models import _weights_mb, last_level_cache_mb

    layer = torch.nn.Linear(1000, 250)  # 250,250 fp32 parameters
    assert _weights_mb(layer) == pytest.approx(1.001, abs=0.005)
    for level, size in ((1, "32K"), (2, "1024K"), (3, "32768K")):
        d = tmp_path / f"index{level}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "size").write_text(f"{size}\n")
    assert last_level_cache_mb(str(tmp_path)) == 33.6  # the highest level, 32 MiB in MB
    assert last_level_cache_mb(str(tmp_path / "absent")) is None
    result = bench_train(batch=2, steps=1, warmup=0, latency_reps=1, depth=2, embed_dim=32, num_heads=2,
                         moe_layers="last-1", num_experts=4)
    assert result["weights_mb_moe"] == pytest.approx(result["params_moe"] * 4 / 1e6, abs=0.01)
    assert result["weights_mb_moe"] > result["weights_mb_dense"]
    text = bench.format_train(result)
    assert f"ViMoE {result['weights_mb_moe']:.1f} MB" in text and "last-level cache" in text
    old = {k: v for k, v in result.items() if not k.startswith(("weights_mb", "last_level"))}
    assert "last-level cache" not in bench.format_train(old)  # records saved before the keys existed


def test_bench_split_times_each_piece_and_reports_the_increments(capsys, tmp_path):
    from workbench.bench.split import PIECES, bench_split, format_split
    from workbench.cli import main

    r = bench_split(batch=2, tokens=5, dim=16, expert_hidden=32, num_experts=4, top_ks=(1, 2), threads=[1], reps=2,
                    warmup=1)
    assert [(row["threads"], row["top_k"]) for row in r["rows"]] == [(1, 1), (1, 2)]
    for row in r["rows"]:
        assert all(row[f"{p}_ms"] > 0 for p in PIECES)
        ms = {p: row[f"{p}_ms"] for p in PIECES}
        assert row["layer_ratio"] == pytest.approx(ms["layer"] / ms["dense"], abs=0.01)
        # the three increments add up to the layer's excess over dense (each rounded to 0.001)
        total = row["expert_matmuls"] + row["moving_rows"] + row["routing"]
        assert total == pytest.approx(row["layer_ratio"] - 1, abs=0.004)
    for row in r["rows"]:
        assert sum(row["rows_per_expert"]) == 2 * 5 * row["top_k"] and len(row["rows_per_expert"]) == 4
        assert row["experts_vs_dispatch"] <= 1e-5 and row["dispatch_vs_layer"] <= 1e-5  # the pieces nest
    text = format_split(r)
    assert "experts: the expert FFNs on rows already sorted by expert" in text and len(text.splitlines()) == 9
    assert "nested: each piece's output equals the next one's inner work" in text and "NOT NESTED" not in text
    assert main(["bench", "split", "--batch", "2", "--tokens", "4", "--dim", "8", "--expert-hidden", "16",
                 "--num-experts", "2", "--threads", "1", "--reps", "1", "--save", str(tmp_path)]) == 0
    saved = json.loads(next(tmp_path.glob("split-*.json")).read_text())
    assert saved["kind"] == "split" and saved["results"]["allocator"] and "provenance" in saved
    capsys.readouterr()
    for bad, message in ((["--top-k", "3", "--num-experts", "2"], "each top-k must be in 1..2"),
                         (["--tokens", "0"], "--tokens 0 is invalid")):
        with pytest.raises(SystemExit):
            main(["bench", "split", *bad])
        assert message in capsys.readouterr().err


def test_a_timed_step_backpropagates_the_aux_loss_as_a_training_loss_does():
    """``_step`` charges an MoE layer its router's aux-loss gradient, as a scalar added to the loss (not as a (T, d)
    add): the gradients equal those of (y * grad).sum() + aux_loss."""
    from workbench.bench.timing import _step
    from workbench.moe import MoEMlp

    torch.manual_seed(0)
    layer = MoEMlp(8, 16, num_experts=4, top_k=2, balance_weight=0.5)
    x = torch.randn(2, 5, 8, requires_grad=True)
    grad = torch.randn(2, 5, 8)
    y = _step(layer, x, grad, torch.float32)
    mine = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    layer.zero_grad(set_to_none=True)
    x.grad = None
    ((layer(x) * grad).sum() + layer.aux_loss).backward()
    for a, b in zip(mine, [p.grad for p in layer.parameters()] + [x.grad]):
        torch.testing.assert_close(a, b)
    assert y.shape == x.shape and layer.aux_loss.requires_grad


def test_bench_split_says_when_its_pieces_do_not_nest(monkeypatch):
    """A dispatch piece that computed something other than the layer's inner work is flagged, not reported as a
    split of the layer."""
    from workbench.bench import split

    real = split.dispatch_grouped
    monkeypatch.setattr(split, "dispatch_grouped", lambda *a, **k: real(*a, **k) * 1.01)
    r = split.bench_split(batch=2, tokens=5, dim=16, expert_hidden=32, num_experts=4, threads=[1], reps=1, warmup=0)
    assert r["rows"][0]["experts_vs_dispatch"] > 1e-4 and r["rows"][0]["dispatch_vs_layer"] > 1e-4
    assert "NOT NESTED: the split does not describe this layer" in split.format_split(r)


def test_every_bench_command_says_what_it_measures_in_its_help(capsys):
    from workbench.cli import main

    for name, first in (("split", "Where one MoE layer's fwd+bwd time goes"), ("peers", "MoE layers a user would"),
                        ("train", "Training img/s of the tiny ViMoE"), ("matmul", "One expert's matmul per token row")):
        with pytest.raises(SystemExit):
            main(["bench", name, "--help"])
        assert first in " ".join(capsys.readouterr().out.split()), name
