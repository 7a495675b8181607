import json
import os
import re
import shutil
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
    # an unknown model keyword names the key and lists the known ones; a wrong type names the type wanted
    (["train", "--model-arg", "foo=1", "--quiet"], "unknown model argument 'foo'"),
    (["train", "--model-arg", "dept=3", "--quiet"], "did you mean 'depth'?"),
    (["info", "--model-arg", "foo=1"], "takes: "),
    (["train", "--model-arg", "depth=abc", "--quiet"], "depth='abc' is invalid: depth takes an integer"),
    (["info", "--model-arg", "renormalize=3"], "renormalize=3 is invalid: use False, True or 'straight_through'"),
    (["info", "--model", "no_such_model"], "is not a timm model"),
    (["train", "--model", "nonexistent", "--quiet"], "--model 'nonexistent' is not a timm model"),
    # moe_layers: the error shows the accepted list forms
    (["info", "--moe-layers", "[1, x]"], "1,3 or '1 3' or '[1, 3]'"),
    (["info", "--moe-layers", "middle-2"], "--moe-layers 1,3 or '1 3' or '[1, 3]'"),
    # the new train flags are range-checked before anything heavy runs
    (["train", "--label-smoothing", "1"], "--label-smoothing 1.0 is invalid: use a number in [0, 1)"),
    (["train", "--warmup-epochs", "-1"], "--warmup-epochs -1.0 is invalid"),
    (["train", "--weight-decay", "-0.1"], "--weight-decay -0.1 is invalid"),
    (["train", "--clip-grad", "abc"], "--clip-grad: 'abc' is not a number"),
    (["train", "--test-subset", "0"], "--test-subset 0 is invalid"),
    (["train", "--test-every", "0"], "--test-every 0 is invalid: use an integer >= 1"),
    (["eval", "--checkpoint", "experiments/checkpoints/vimoe_tiny_fmnist", "--test-subset", "0"],
     "--test-subset 0 is invalid: use an integer >= 1"),
    (["train", "--shared-expert", "both"], "invalid choice: 'both'"),
])
def test_usage_errors_exit_2(argv, message, capsys, tmp_path):
    argv = argv + (["--output", str(tmp_path / "o")] if argv[0] == "train" else [])
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    text = capsys.readouterr().err
    assert message in text
    assert text.strip().count("\n") == 0 and "Traceback" not in text  # one line, no usage block or traceback


@pytest.mark.parametrize("text, expected", [
    ("[1, 3]", [1, 3]), ("1,3", [1, 3]), ("1 3", [1, 3]), (" -1 , 2 ", [-1, 2]), ("[1,3]", [1, 3]), ("2", [2]),
    ("[]", []), ("last-2", "last-2"), ("none", "none"), ("every-2", "every-2"),
])
def test_moe_layers_forms(text, expected):
    from workbench.cli import parse_moe_layers

    assert parse_moe_layers(text) == expected


def test_moe_layers_list_form_reaches_the_model(capsys):
    assert main(["info", "--moe-layers", "[1, 3]", "--json"]) == 0
    blocks = json.loads(capsys.readouterr().out)["blocks"]
    assert [b["block"] for b in blocks if b["ffn"] == "moe"] == [1, 3]


def test_train_help_shows_defaults_of_train_config():
    """The help's defaults come from TrainConfig's source (no torch import): they must match the dataclass."""
    import dataclasses

    from workbench.train.cli import _train_defaults
    from workbench.train.config import TrainConfig

    parsed = _train_defaults()
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    assert {"warmup_epochs", "weight_decay", "label_smoothing", "min_lr", "clip_grad"} <= set(parsed)
    assert parsed == {k: v for k, v in fields.items() if k in parsed}
    assert set(fields) - set(parsed) == set()


def test_help_is_quick_and_imports_no_torch():
    # importing workbench (which workbench.cli does) and building the parser load neither torch nor timm
    code = "import workbench.cli as c, sys; c.build_parser(); print('torch' in sys.modules, 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr
    for argv in (["--help"], ["train", "--help"], ["eval", "--help"]):
        run = subprocess.run([sys.executable, "-X", "importtime", "-m", "workbench", *argv], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if "|" in line}
        assert not imported & {"torch", "timm", "fvcore", "pandas"}, argv
    train_help = subprocess.run([sys.executable, "-m", "workbench", "train", "--help"], cwd=ROOT,
                                capture_output=True, text=True, timeout=120).stdout
    for flag in ("--warmup-epochs", "--weight-decay", "--label-smoothing", "--min-lr", "--clip-grad"):
        assert flag in train_help
    assert "(default: 1.0)" in " ".join(train_help.split())  # warmup_epochs, from TrainConfig


def test_deferred_commands_still_parse():
    """bench / profile / study are imported only when asked for; their parsers then work as before."""
    from workbench.cli import build_parser

    args = build_parser().parse_args(["study", "summary", "some.yaml", "--json"])
    assert args.command == "study" and args.study == "some.yaml" and args.json and callable(args.func)
    args = build_parser().parse_args(["profile", "--moe-layers", "last-2"])
    assert args.command == "profile" and args.moe_layers == "last-2" and callable(args.func)


@pytest.mark.parametrize("order", ["import workbench, timm", "import timm, workbench"])
def test_import_workbench_registers_models_lazily(order):
    code = (f"{order}; m = timm.create_model('vimoe_tiny_patch4_28'); "
            "print(type(m).__name__, workbench.upcycle.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["ViMoE", "upcycle"], out.stderr[-2000:]


def test_workbench_unknown_attribute_is_an_attribute_error():
    import workbench

    with pytest.raises(AttributeError):
        workbench.no_such_thing  # noqa: B018


def _write_bytes(path, data: bytes):
    path.write_bytes(data)
    return path


def test_not_a_checkpoint_vs_truncated_checkpoint(tmp_path, capsys):
    import torch

    from workbench.train.checkpoint import CheckpointError, read_checkpoint

    text = _write_bytes(tmp_path / "text.pt", b"just some notes\n")
    png = _write_bytes(tmp_path / "png.pt", b"\x89PNG\r\n\x1a\n" + bytes(100))
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    real = tmp_path / "real.pt"
    torch.save({"model": {"w": torch.zeros(2000)}, "model_config": {"model": "x"}}, real)
    truncated = _write_bytes(tmp_path / "truncated.pt", real.read_bytes()[: real.stat().st_size // 2])
    for path, kind in ((text, "a text file"), (png, "a PNG image"), (other, "without model/model_config")):
        with pytest.raises(CheckpointError) as err:
            read_checkpoint(path)
        message = str(err.value)
        assert "is not a workbench checkpoint" in message and kind in message
        assert "model.safetensors and config.json" in message and "\n" not in message
        assert "weights_only" not in message and "truncated" not in message
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(truncated)
    assert "truncated or corrupt" in str(err.value) and "not a workbench checkpoint" not in str(err.value)
    assert "\n" not in str(err.value)
    assert read_checkpoint(real)["model_config"] == {"model": "x"}
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--checkpoint", str(text)])
    assert exit_.value.code == 1
    assert "is not a workbench checkpoint (a text file)" in capsys.readouterr().err


def test_pickled_objects_are_not_a_checkpoint(tmp_path):
    import torch

    from workbench.train.checkpoint import CheckpointError, read_checkpoint

    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "model_config": Path("x")}, path)  # a Python object: not weights
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert "is not a workbench checkpoint" in str(err.value) and "\n" not in str(err.value)


def test_unknown_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as err:
        main(["train", "--frobnicate"])
    assert err.value.code == 2


def _usage_error(argv, capsys) -> str:
    """The one line ``main(argv)`` writes for a usage error (exit 2)."""
    with pytest.raises(SystemExit) as err:
        main(argv)
    line = capsys.readouterr().err
    assert err.value.code == 2 and line.count("\n") == 1, line
    return line


@pytest.mark.parametrize("argv, flag, meant, command", [
    (["prune", "--checkpoint", "x", "--method", "frequency", "--keep-expert", "4", "--output", "o"], "--keep-expert",
     "--keep-experts", "prune"),
    (["train", "--epoch", "1"], "--epoch", "--epochs", "train"),
    (["study", "claims", "--al"], "--al", "--all", "study claims"),
])
def test_abbreviated_flags_are_refused_not_matched(argv, flag, meant, command, capsys):
    """A shortened flag (``--keep-expert`` for ``--keep-experts``) is an error naming it, the flag it is close to and
    the subcommand's help, in one line; argparse would otherwise take it silently, and a flag added later could make
    the same command mean something else."""
    line = _usage_error(argv, capsys)
    assert f"unrecognized arguments: {flag}" in line
    assert f"(did you mean {meant}?)" in line and f"(see python -m workbench {command} --help)" in line


def test_a_mistyped_required_flag_is_named_beside_the_missing_one(capsys):
    line = _usage_error(["eval", "--checkpiont", "x"], capsys)
    assert "required: --checkpoint; unrecognized: --checkpiont (did you mean --checkpoint?)" in line
    with pytest.raises(SystemExit):
        main(["train", "--frobnicate"])
    assert "did you mean" not in capsys.readouterr().err  # nothing close: no guess


def test_malformed_config_yaml_is_one_line(tmp_path, capsys):
    for text, message in [("epochs: [1\n", "is not valid YAML"), ("- 1\n- 2\n", "must hold a mapping"),
                          ("epochs: 1\nepochz: 2\n", "unknown config keys ['epochz']")]:
        config = tmp_path / "bad.yaml"
        config.write_text(text)
        with pytest.raises(SystemExit) as err:
            main(["train", "--config", str(config), "--output", str(tmp_path / "o")])
        err_text = capsys.readouterr().err
        assert err.value.code == 2 and message in err_text and str(config) in err_text or "epochz" in err_text
        assert err_text.count("\n") == 1 and "Traceback" not in err_text


def test_missing_checkpoint_exits_1(capsys, tmp_path):
    for path in ("/nonexistent/checkpoint.pt", "runs/nope/model.safetensors", str(tmp_path / "model.safetensors")):
        with pytest.raises(SystemExit) as err:
            main(["eval", "--checkpoint", path])
        text = capsys.readouterr().err
        assert err.value.code == 1 and f"checkpoint {path} does not exist" in text and text.count("\n") == 1


def test_a_checkpoint_naming_an_unknown_model_says_so(tmp_path, capsys):
    from safetensors.torch import save_file
    import torch

    (tmp_path / "m").mkdir()
    save_file({"w": torch.zeros(1)}, str(tmp_path / "m" / "model.safetensors"))
    (tmp_path / "m" / "config.json").write_text('{"model": "vimoe_gone", "model_kwargs": {}}')
    with pytest.raises(SystemExit) as err:
        main(["eval", "--checkpoint", str(tmp_path / "m")])
    text = capsys.readouterr().err
    assert err.value.code == 1 and "timm has no model 'vimoe_gone'" in text and "checkpoint config" not in text


def test_train_eval_info_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "workbench"]
    common = ["--dataset", "synthetic", "--train-subset", "128", "--test-subset", "64"]
    tiny = ["--moe-layers", "1", "--num-experts", "2", "--model-arg", "depth=2", "--model-arg", "embed_dim=32",
            "--model-arg", "num_heads=2"]
    first = subprocess.run(cmd + ["train", *common, "--epochs", "1", "--batch-size", "32", "--output", str(out),
                                  "--warmup-epochs", "0.25", "--weight-decay", "0.01", "--label-smoothing", "0",
                                  "--min-lr", "0", "--clip-grad", "none", *tiny],
                           check=True, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "expert load CV / drop rate (train): block 1 " in first.stdout  # per epoch, per MoE layer
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["warmup_epochs"], saved["weight_decay"], saved["label_smoothing"], saved["min_lr"],
            saved["clip_grad"]) == (0.25, 0.01, 0.0, 0.0, None)
    assert main(["train", "--resume", "--output", str(out), "--epochs", "2"]) == 0
    assert f"resumed from epoch 1 ({out / 'checkpoint.pt'}); training to epoch 2" in capsys.readouterr().out
    result = subprocess.run(cmd + ["eval", "--checkpoint", str(out / "checkpoint.pt"), "--json", "--batch-size",
                                   "16", "--dataset", "synthetic", "--test-subset", "64"],
                            check=True, cwd=ROOT, capture_output=True, text=True, timeout=300)
    data = json.loads(result.stdout)  # the progress bar goes to stderr, the JSON alone to stdout
    assert data["n"] == 64 and set(data["moe"]) == {"1"}
    assert re.search(r"eval: .*\d/4 \[", result.stderr)  # a progress bar: 64 images / 16 per batch
    assert main(["eval", "--checkpoint", str(out), "--quiet", "--dataset", "synthetic", "--test-subset", "64"]) == 0
    quiet = capsys.readouterr()
    assert "accuracy" in quiet.out and "eval" not in quiet.err  # a run folder works as --checkpoint too
    info = subprocess.run(cmd + ["info", "--checkpoint", str(out / "model")], check=True, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert "MoE blocks [1]" in info.stdout


def test_pyproject_license_is_an_spdx_string():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(project["project"]["license"], str)  # the table form makes setuptools warn three times
    (req,) = [r.replace(" ", "") for r in project["build-system"]["requires"] if r.startswith("setuptools")]
    assert req.startswith("setuptools>=") and int(req.split(">=")[1].split(".")[0]) >= 77  # SPDX strings: >= 77


def _fake_bin(folder: Path, name: str, log: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\necho \"{name} $*\" >> {log}\nexit 1\n")
    path.chmod(0o755)
    return path


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_lab_passes_allow_root_only_as_root(tmp_path):
    log = tmp_path / "log"
    _fake_bin(tmp_path / "venv" / "bin", "jupyter", log)
    subprocess.run(["make", "-o", "setup", "lab", f"VENV={tmp_path / 'venv'}"], cwd=ROOT, check=False,
                   capture_output=True, text=True, timeout=60)
    assert log.read_text().startswith("jupyter lab notebooks/")
    assert ("--allow-root" in log.read_text()) == (os.getuid() == 0)


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_data_says_what_it_installs_and_never_fails(tmp_path):
    log = tmp_path / "log"
    _fake_bin(tmp_path / "bin", "apt-get", log)  # an apt-get that always fails
    env = {k: v for k, v in os.environ.items() if k != "WORKBENCH_DATA"}
    env["PATH"] = f"{tmp_path / 'bin'}:/usr/bin:/bin"
    run = subprocess.run(["make", "data", f"FMNIST={tmp_path / 'absent.gz'}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "dataset-fashion-mnist" in run.stdout
    if os.getuid() == 0:
        assert "installing Debian's dataset-fashion-mnist with apt-get" in run.stdout
        assert "apt-get could not install" in run.stdout
    else:
        assert not log.exists() and "sudo apt-get install dataset-fashion-mnist" in run.stdout


@pytest.mark.parametrize("how, ships", [([], False), (["--ship"], True), (["SHIP=1"], True)])
def test_default_train_script_ships_only_when_asked(tmp_path, how, ships):
    log = tmp_path / "log"
    py = tmp_path / "py"
    py.write_text(f"#!/bin/sh\necho \"$*\" >> {log}\n")
    py.chmod(0o755)
    env = {**os.environ, "PY": str(py)}
    args = [a for a in how if a.startswith("--")]
    env.update(a.split("=", 1) for a in how if "=" in a)
    run = subprocess.run(["bash", str(ROOT / "experiments/default/train.sh"), *args], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    calls = log.read_text()
    assert calls.count("workbench train --config") == 4  # no name: the tiny pair, the explorer's default, regime's
    assert ("workbench.train.ship" in calls) == ships and calls.count("workbench card") == 2 * ships
    for config, run_dir in (("dense", "dense"), ("moe", "moe"), ("moe_scratch", "moe_scratch"),
                            ("moe_micro4", "moe_micro4")):
        line = next(c for c in calls.splitlines() if f"experiments/default/{config}.yaml" in c)
        # --resume only where a checkpoint is (train refuses it on a fresh folder)
        assert ("--resume" in line) == (ROOT / "experiments/runs/default" / run_dir / "checkpoint.pt").is_file()
    if not ships:
        assert "unchanged" in run.stdout
    one = subprocess.run(["bash", str(ROOT / "experiments/default/train.sh"), "explorer", *args], env=env,
                         capture_output=True, text=True, timeout=60)
    assert one.returncode == 0 and log.read_text()[len(calls):].count("workbench train --config") == 1


def test_readme_upcycling_example_runs_and_says_to_use_the_venv():
    readme = (ROOT / "README.md").read_text()
    assert "source .venv/bin/activate" in readme
    using = readme.split("## Using it", 1)[1]
    example = using.split("```python", 1)[1].split("```", 1)[0]
    assert "vimoe_tiny_fmnist_dense" in example
    scope = {}
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)  # the README's paths are relative to the repository root
        exec(compile(example, "README.md", "exec"), scope)
    finally:
        os.chdir(cwd)
    assert scope["moe"].moe_layer_indices == [4, 5]


def test_segmentation_model_args_are_checked_against_the_segmentation_model(tmp_path, capsys):
    """With a segmentation dataset and no --model, --model-arg keys are those of the model the trainer picks
    (vimoe_seg_micro_patch7_56: head=...), not the classifier's."""
    from workbench.cli import main

    out = tmp_path / "seg"
    assert main(["train", "--dataset", "fmnist-scenes", "--model-arg", "head=linear", "--moe-layers", "last-1",
                 "--data-arg", "train_size=64", "--test-subset", "16", "--val-size", "0", "--epochs", "1",
                 "--batch-size", "32", "--output", str(out), "--quiet"]) == 0
    assert json.loads((out / "model" / "config.json").read_text())["model"] == "vimoe_seg_micro_patch7_56"
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "fashion-mnist", "--model-arg", "head=linear", "--output", str(tmp_path / "c")])
    assert "unknown model argument 'head'" in capsys.readouterr().err


def test_model_flags_with_a_checkpoint_are_refused_in_one_line(capsys):
    from workbench.cli import main

    with pytest.raises(SystemExit) as err:
        main(["profile", "--checkpoint", str(ROOT / "experiments/checkpoints/vimoe_seg_micro_scenes"), "--router",
              "soft"])
    assert err.value.code == 2
    line = capsys.readouterr().err
    assert "--router describe a new model" in line and line.count("\n") == 1


def test_resume_of_a_folder_without_a_checkpoint_is_refused_and_eval_checks_its_device(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--dataset", "synthetic", "--output", str(tmp_path / "typo"), "--resume"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "holds no checkpoint.pt" in err and "drop --resume" in err
    assert not (tmp_path / "typo" / "checkpoint.pt").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--checkpoint", "experiments/checkpoints/vimoe_tiny_fmnist", "--device", "banana"])
    assert exit_.value.code == 2 and "--device 'banana' is invalid" in capsys.readouterr().err


def test_card_command_prints_the_cached_verdicts_and_refuses_bad_input(tmp_path, capsys):
    """`card` reads the shipped card from its cache (no test is run: the weights' hash matches) and prints one line
    per MoE layer with its verdict; a dense model has no routing to test; a bad path or too few draws is one line."""
    shipped = ROOT / "experiments" / "checkpoints" / "vimoe_tiny_fmnist"
    folder = tmp_path / "tiny"
    shutil.copytree(shipped, folder)
    stored = json.loads((folder / "model_card.json").read_text())
    assert main(["card", "--checkpoint", str(folder)]) == 0
    out = capsys.readouterr().out
    for block, v in stored["layers"].items():
        verdict = "specialised" if v["specialised"] else "not distinguishable from random routers"
        assert f"block {block}: NMI {v['nmi']:.4f} vs random {v['random_nmi']:.4f}, Holm p {v['p_holm']:.3f}: " \
               f"{verdict}" in out
    assert "these images were in its training set" in out  # the tiny model trained on its validation images
    assert main(["card", "--checkpoint", str(ROOT / "experiments/checkpoints/vimoe_tiny_fmnist_dense")]) == 0
    assert "dense: no MoE layers" in capsys.readouterr().out
    for argv, message in ((["--checkpoint", str(tmp_path / "nope")], "no such file or folder"),
                          (["--checkpoint", str(folder), "--draws", "3"], "--draws >= 10")):
        with pytest.raises(SystemExit) as exit_:
            main(["card", *argv])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1


def test_a_python_without_the_packages_gets_one_line_naming_the_venv():
    """``python -m workbench`` from a Python without the project's packages (``-S``: no site-packages, as a system
    ``python3`` would be): one line naming the missing package and the set-up venv, exit 1, no traceback."""
    run = subprocess.run([sys.executable, "-S", "-m", "workbench", "info"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr and run.stderr.count("\n") == 1, run.stderr
    assert "is not installed in this Python" in run.stderr and ".venv/bin/python -m workbench" in run.stderr


def test_a_study_file_missing_its_folder_is_pointed_to_the_ones_it_may_mean(capsys):
    line = _usage_error(["study", "claims", "experiments/studies/upcycle_half.yaml"], capsys)
    assert "did you mean experiments/studies/pilots/upcycle_half.yaml or experiments/studies/regime/upcycle_half.yaml?" in line
