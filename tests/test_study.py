import json

import pytest
import timm
import yaml

from workbench.checkpoint import model_config, save_model
from workbench.study import load_study, plan, run_study, summary


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

    for path in sorted((Path(__file__).resolve().parents[1] / "experiments" / "studies").glob("*.yaml")):
        study = load_study(path)
        assert len(study["seeds"]) >= 3, f"{path.name}: accuracy claims need at least 3 seeds"
        assert plan(study)
