import json
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, message", [
    (["train", "--top-k", "0", "--quiet"], "top_k=0"),
    (["train", "--epochs", "0"], "epochs=0"),
    (["train", "--model-arg", "novalue"], "KEY=VALUE"),
    (["train", "--dataset", "mnist3d", "--quiet"], "dataset='mnist3d'"),
    (["train", "--moe-layers", "middle-2", "--quiet"], "moe_layers='middle-2'"),
    (["train", "--config", "/nonexistent.yaml"], "does not exist"),
    (["info", "--num-experts", "2", "--top-k", "3"], "top_k=3"),
])
def test_usage_errors_exit_2(argv, message, capsys, tmp_path):
    argv = argv + (["--output", str(tmp_path / "o")] if argv[0] == "train" else [])
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as err:
        main(["train", "--frobnicate"])
    assert err.value.code == 2


def test_missing_checkpoint_exits_1(capsys):
    with pytest.raises(SystemExit) as err:
        main(["eval", "--checkpoint", "/nonexistent/checkpoint.pt"])
    assert err.value.code == 1
    assert "does not exist" in capsys.readouterr().err


def test_train_eval_info_end_to_end(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "workbench"]
    common = ["--dataset", "synthetic", "--train-subset", "128", "--test-subset", "64"]
    subprocess.run(cmd + ["train", *common, "--epochs", "1", "--batch-size", "32", "--output", str(out),
                          "--quiet", "--moe-layers", "1", "--num-experts", "2", "--model-arg", "depth=2",
                          "--model-arg", "embed_dim=32", "--model-arg", "num_heads=2"],
                   check=True, cwd=ROOT, timeout=300)
    result = subprocess.run(cmd + ["eval", "--checkpoint", str(out / "checkpoint.pt"), "--json", *
                                   ["--dataset", "synthetic", "--test-subset", "64"]],
                            check=True, cwd=ROOT, capture_output=True, text=True, timeout=300)
    data = json.loads(result.stdout)
    assert data["n"] == 64 and set(data["moe"]) == {"1"}
    info = subprocess.run(cmd + ["info", "--checkpoint", str(out / "model")], check=True, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert "MoE blocks [1]" in info.stdout
