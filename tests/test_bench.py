"""The benchmark runs and reports what it claims to; speed itself is never asserted here."""
import json
from pathlib import Path, PureWindowsPath

import pytest
import torch

from workbench.bench import bench_moe, bench_train, saved_bytes, write_result

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
    assert len(rows) == 2 * 2 * 3
    assert {r["dispatch"] for r in rows} == {"grouped", "loop", "einsum"}
    assert all(r["ms"] > 0 and r["dense_ms"] > 0 and r["mem_bytes"] > 0 for r in rows)


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
    assert result["throughput_ratio"] == pytest.approx(result["moe_img_s"] / result["dense_img_s"], rel=0.01)
    assert result["params_moe"] > result["params_dense"]


def test_bench_cli_json(capsys, tmp_path):
    assert main(["bench", "moe", "--batch", "2", "--tokens", "4", "--dim", "16", "--expert-hidden", "32",
                 "--num-experts", "2", "--top-k", "1", "--reps", "1", "--json", "--save", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out[:out.rindex("]") + 1])
    assert len(rows) == 6
    saved = list(tmp_path.glob("moe-*.json"))
    assert len(saved) == 1 and "provenance" in json.loads(saved[0].read_text())


def test_bench_cli_rejects_bad_top_k(capsys):
    with pytest.raises(SystemExit) as err:
        main(["bench", "moe", "--num-experts", "2", "--top-k", "3"])
    assert err.value.code == 2


def test_bench_app(tmp_path):
    import timm
    from workbench.checkpoint import model_config, save_model

    model = timm.create_model("vimoe_tiny_patch4_28", moe_layers="last-1", num_experts=2)
    save_model(model, model_config("vimoe_tiny_patch4_28", {"moe_layers": "last-1", "num_experts": 2}), tmp_path)
    from workbench.bench import bench_app

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
