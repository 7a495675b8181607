"""The README's commands run as written from a fresh clone, in the order given: every command parses and every path
it reads is shipped or written by an earlier command (fast); the commands and Python blocks run, with small budgets
(a tenth of the epochs, few images, one timing round) where the written ones take minutes (slow: make test-slow).
Left out of the run, and said here: the training scripts (tens of minutes; checked to exist and be executable),
`make`, app.py (it serves until stopped; its options are parsed) and the block that needs a ViT-S weights file the
user supplies."""
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
READS = ("--checkpoint", "--config", "--init-from")


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", README, re.S)


def _commands() -> list[list[str]]:
    """Every command line of the README's bash blocks; a here-document (``cat > FILE <<'END'`` ... ``END``) becomes
    the one pseudo-command ``["write", FILE]``."""
    out, ending = [], None
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if ending is not None:
                ending = None if line.strip() == ending else ending
                continue
            heredoc = re.match(r"\s*cat\s*>\s*(\S+)\s*<<\s*'?(\w+)'?", line)
            if heredoc:
                out.append(["write", heredoc.group(1)])
                ending = heredoc.group(2)
                continue
            words = shlex.split(line, comments=True)
            if words:
                out.append(words)
    return out


def _workbench_argv(words: list[str]) -> list[str] | None:
    """The ``python -m workbench`` arguments of a command (also under torchrun), else None."""
    if "-m" in words and words[words.index("-m") + 1] == "workbench":
        return words[words.index("-m") + 2:]
    return None


def test_every_readme_command_parses_and_reads_only_what_exists_by_then():
    outputs, seen = [], 0
    targets = set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), re.M))
    for words in _commands():
        argv = _workbench_argv(words)
        if words[0] == "make":
            assert words[1] in targets, words
        elif words[0].endswith(".sh"):
            assert os.access(ROOT / words[0], os.X_OK), words
        elif words[0] == "write":  # a file the README writes with a here-document
            outputs.append(words[1])
        elif words[0] == "tensorboard":  # TensorBoard's own command: it only reads the folder it is given
            assert words[1:2] == ["--logdir"] and len(words) == 3, words
        elif words[:2] == ["python", "app.py"]:
            import app

            app.parse_args(words[2:])
        else:
            assert argv is not None and words[0] in ("python", "torchrun"), f"not a known command: {words}"
            args = build_parser().parse_args(argv)
            for flag in READS:
                value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
                if value:
                    assert (ROOT / value).exists() or any(value.startswith(o + "/") or value == o
                                                          for o in outputs), f"{' '.join(words)}: {value} is " \
                                                                             "neither shipped nor made above"
            if getattr(args, "study", None):
                assert (ROOT / args.study).is_file() or args.study in outputs, words
            if getattr(args, "output", None):
                outputs.append(args.output)
            seen += 1
    assert seen >= 15 and "runs/dense" in outputs  # the upcycling example's dense run is made before it is read


def _budget(argv: list[str]) -> list[str]:
    """The same command with a small budget: a tenth of the epochs (at least one), few images, one timing round."""
    argv = list(argv)
    for i, word in enumerate(argv[:-1]):
        if word == "--epochs":
            argv[i + 1] = str(max(1, math.ceil(int(argv[i + 1]) / 10)))
    command = argv[0]
    if command == "train":
        argv += ["--train-subset", "64", "--test-subset", "32", "--batch-size", "32", "--warmup-epochs", "0.5",
                 "--save-every", "0", "--quiet"]
        if "fmnist-scenes" in argv:
            argv += ["--data-arg", "train_size=128"]
        if "--epochs" not in argv and "--resume" not in argv:  # the default (or the config's) 10 epochs
            argv += ["--epochs", "1"]
    elif command == "eval":
        argv += ["--test-subset", "32", "--quiet"]
    elif argv[:2] == ["bench", "moe"]:
        argv += ["--reps", "1", "--batch", "2", "--tokens", "4", "--dim", "16", "--expert-hidden", "32",
                 "--num-experts", "2", "--quiet"]
    elif argv[:2] == ["bench", "train"]:
        argv += ["--steps", "1", "--batch", "2", "--threads", "1"]
    elif argv[:2] == ["bench", "app"]:
        argv += ["--reps", "1"]
    elif argv[:2] == ["bench", "matmul"]:
        argv += ["--reps", "2", "--rows", "2,8"]
    elif argv[:2] == ["bench", "split"]:
        argv += ["--reps", "1", "--batch", "2", "--threads", "1"]
    return argv


@pytest.fixture()
def fresh(tmp_path, monkeypatch):
    """A working folder that looks like a fresh clone to the README's relative paths (runs/ is written here)."""
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _needs_fashion_mnist():
    from workbench.data.classification import DatasetNotFound, build_datasets

    try:
        build_datasets("fashion-mnist", test_subset=1, augment=False)
    except DatasetNotFound as err:
        pytest.skip(f"Fashion-MNIST is not installed: {err}")


@pytest.mark.slow
def test_readme_commands_run_as_written_with_small_budgets(fresh, capsys):
    """About 2.5 min on a 2-core machine shared with other work (each run's checkpoint of the tiny model is 82 MB);
    make test-slow runs it."""
    _needs_fashion_mnist()
    ran = []
    for words in _commands():
        argv = _workbench_argv(words)
        if argv is None or words[0] == "torchrun":
            continue  # make, the training scripts, app.py (serves until stopped), torchrun (the slow test)
        assert main(_budget(argv)) == 0, words
        ran.append(" ".join(argv[:2]))
    out = capsys.readouterr().out
    assert "resuming with epochs 1 -> 2" in out  # the resume example extends the run it names
    assert (fresh / "runs" / "upcycled" / "model" / "model.safetensors").is_file()
    assert {"train --model", "train --init-from", "eval --checkpoint", "study run", "study claims",
            "bench moe"} <= set(ran)


@pytest.mark.slow
def test_readme_python_blocks_run(fresh):
    """About a minute (the specialisation report on 2,000 validation images)."""
    _needs_fashion_mnist()
    import plotly.graph_objects as go

    blocks = _blocks("python")
    assert len(blocks) == 3
    for block in blocks:
        if "vit_s16.safetensors" in block:
            assert "you\nsupply" in README or "that you\nsupply" in README  # said to be the user's own file
            continue
        code = block.replace("draws=100", "draws=2").replace(".show()", "")  # the budget; no browser window
        namespace = {}
        exec(compile(code, "README.md", "exec"), namespace)
        if "densify" in block:
            assert isinstance(namespace["smaller"], type(namespace["model"]))
            assert isinstance(go.Figure(), go.Figure)


@pytest.mark.slow
def test_readme_torchrun_runs_as_written_with_a_small_budget(fresh):
    (words,) = [w for w in _commands() if w[0] == "torchrun"]
    torchrun = Path(sys.executable).with_name("torchrun")
    argv = _budget(_workbench_argv(words))
    index = words.index("-m")
    cmd = [str(torchrun), *words[1:index], "-m", "workbench", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=fresh, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("done: ") == 1  # the final line once, from the main process


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but hyphens and underscores dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("name", ["README.md", "docs/performance.md", "docs/studies.md"])
def test_markdown_links_resolve(name):
    """Every in-page link names a heading of the page and every relative link names a file that is shipped."""
    text = re.sub(r"```.*?```", "", (ROOT / name).read_text(), flags=re.S)  # a '#' in a code block is a comment
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links or name != "README.md"
    for link in links:
        if link.startswith("#"):
            assert link[1:] in anchors, f"{name}: no heading for {link}"
        elif not re.match(r"\w+://", link):
            assert (ROOT / Path(name).parent / link.split("#")[0]).exists(), f"{name}: {link} does not exist"
