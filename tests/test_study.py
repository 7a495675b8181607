import json

import pytest
import timm
import yaml

from workbench.checkpoint import model_config, save_model
from workbench.study import load_pruning, load_routing, load_study, plan, routing_tables, run_study, summary


@pytest.fixture()
def study_file(tmp_path):
    dense = timm.create_model("vimoe_tiny_patch4_28", moe_layers="none", depth=2, embed_dim=32, num_heads=2)
    save_model(dense, model_config("vimoe_tiny_patch4_28", {"moe_layers": "none", "depth": 2, "embed_dim": 32,
                                                            "num_heads": 2}), tmp_path / "dense")
    study = {"name": "tiny", "base": str(tmp_path / "dense"), "seeds": [0, 1],
             "train": {"dataset": "synthetic", "train_subset": 64, "test_subset": 32, "epochs": 1, "batch_size": 32},
             "common": {"num_experts": 2},
             "configs": {"dense": {"moe_layers": "none"}, "last-1": {"moe_layers": "last-1"}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_study_runs_records_provenance_and_resumes(study_file, tmp_path, capsys):
    results = tmp_path / "results"
    done = run_study(study_file, results=results)
    assert len(done) == 4
    record = json.loads((results / "tiny" / "last-1__seed1.json").read_text())
    assert record["config"] == "last-1" and record["seed"] == 1 and record["test_n"] == 32
    prov = record["provenance"]
    assert prov["commit"] and prov["device"].startswith(("cpu", "cuda")) and prov["wall_time_s"] > 0
    assert record["model_config"]["model_kwargs"]["moe_layers"] == "last-1"
    assert record["params"] > json.loads((results / "tiny" / "dense__seed0.json").read_text())["params"]
    assert run_study(study_file, results=results) == []  # everything recorded: nothing re-run
    assert "recorded, skipped" in capsys.readouterr().out
    table = summary(study_file, results=results)
    assert table["config"].tolist() == ["dense", "last-1"] and table["n"].tolist() == [2, 2]


def test_study_file_errors(tmp_path, study_file):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nconfigs: {}\nbase: y\nsurprise: 1\n")
    with pytest.raises(ValueError, match="surprise"):
        load_study(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_study(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="not in this study"):
        plan(load_study(study_file), only=["last-9"])


def test_shipped_study_files_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    paths = sorted((root / "experiments" / "studies").rglob("*.yaml"))
    profiles = {}
    for path in paths:
        study = load_study(path)
        assert len(study["seeds"]) >= 3, f"{path.name}: accuracy claims need at least 3 seeds"
        assert plan(study)
        profiles.setdefault(study["profile"], set()).add(study["name"].removesuffix("_gpu"))
    assert profiles["cpu"] == profiles["gpu"] == {"placement", "shared_expert", "routing"}
    base = yaml.safe_load((root / "experiments" / "gpu" / "dense.yaml").read_text())
    model = timm.create_model(base["model"], **base["model_kwargs"])
    assert model.embed_dim == 384 and len(model.blocks) == 12


def test_study_run_errors_name_the_fix(tmp_path, study_file, monkeypatch):
    study = yaml.safe_load(study_file.read_text())
    missing = tmp_path / "nobase.yaml"
    missing.write_text(yaml.safe_dump({**study, "base": str(tmp_path / "no-such-dense")}))
    with pytest.raises(ValueError, match="does not exist; train it first"):
        run_study(missing, results=tmp_path / "r")
    gpu = tmp_path / "gpu.yaml"
    gpu.write_text(yaml.safe_dump({**study, "profile": "gpu"}))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ValueError, match="gpu-profile study and this machine has no CUDA GPU"):
        run_study(gpu, results=tmp_path / "r")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**study, "profile": "tpu"}))
    with pytest.raises(ValueError, match="profile='tpu'"):
        load_study(bad)


def test_study_analysis_records_routing_and_pruning_controls(tmp_path):
    dense = timm.create_model("vimoe_tiny_patch4_28", moe_layers="none", depth=4, embed_dim=32, num_heads=2)
    kw = {"moe_layers": "none", "depth": 4, "embed_dim": 32, "num_heads": 2}
    save_model(dense, model_config("vimoe_tiny_patch4_28", kw), tmp_path / "dense")
    study = {"name": "an", "base": str(tmp_path / "dense"), "seeds": [3],
             "train": {"dataset": "synthetic", "train_subset": 64, "test_subset": 40, "epochs": 1, "batch_size": 32},
             "common": {"num_experts": 4}, "analysis": {"routing": True, "prune_fraction": 0.5},
             "configs": {"dense": {"moe_layers": "none"}, "all": {"moe_layers": "all"},
                         "last-2": {"moe_layers": "last-2"}}}
    path = tmp_path / "an.yaml"
    path.write_text(yaml.safe_dump(study))
    run_study(path, results=tmp_path / "results")
    read = lambda name: json.loads((tmp_path / "results" / "an" / f"{name}__seed3.json").read_text())  # noqa: E731
    assert "routing" not in read("dense") and "pruning" not in read("dense")
    rec = read("all")
    assert sorted(rec["routing"], key=int) == ["0", "1", "2", "3"]
    layer = rec["routing"]["3"]
    assert len(layer["class_expert"]) == 10 and len(layer["class_expert"][0]) == 4
    assert sum(map(sum, layer["class_expert"])) == 40 * 49  # every patch of every test image, first choice
    assert len(layer["position_expert"]) == 49
    assert 0 <= layer["nmi"] <= 1 and layer["recommend"] in ("keep", "densify")
    rows = {r["densified"]: r for r in rec["pruning"]}
    assert rows["none"]["test_acc"] == rec["test_acc"] and rows["none"]["blocks"] == []
    ranked = sorted(rec["routing"], key=lambda b: -rec["routing"][b]["nmi_excess"])
    assert rows["most specialised"]["blocks"] == sorted(int(b) for b in ranked[:2])
    assert rows["least specialised"]["blocks"] == sorted(int(b) for b in ranked[-2:])
    assert len(rows["random"]["blocks"]) == 2
    for name in ("least specialised", "most specialised", "random"):
        assert rows[name]["params"] < rows["none"]["params"]
    # last-2 has fewer MoE layers than prune_min_layers (4): routing recorded, no pruning
    assert "routing" in read("last-2") and "pruning" not in read("last-2")
    # the loaders the notebooks read
    routing = load_routing(path, results=tmp_path / "results")
    assert sorted(set(routing["config"])) == ["all", "last-2"] and len(routing) == 4 + 2
    assert routing.query("config == 'all' and block == 3")["nmi"].item() == layer["nmi"]
    assert routing_tables(path, "all", 3, results=tmp_path / "results")[3] == layer["class_expert"]
    assert len(routing_tables(path, "all", 3, "position_expert", results=tmp_path / "results")) == 4
    with pytest.raises(ValueError, match="no routing analysis"):
        routing_tables(path, "dense", 3, results=tmp_path / "results")
    pruning = load_pruning(path, results=tmp_path / "results")
    assert pruning["densified"].tolist() == ["none", "least specialised", "most specialised", "random"]


def test_study_analysis_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nconfigs: {a: {}}\nbase: y\nanalysis: {prune: 2}\n")
    with pytest.raises(ValueError, match="unknown analysis keys"):
        load_study(bad)
    bad.write_text("name: x\nconfigs: {a: {}}\nbase: y\nanalysis: {prune_fraction: 1.5}\n")
    with pytest.raises(ValueError, match="prune_fraction"):
        load_study(bad)
