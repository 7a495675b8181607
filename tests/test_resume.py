"""Nothing lost, nothing misread: ``--resume`` continues a run as it was planned (its saved config wins; explicit
flags may change what a run in progress can change, and say so), and SIGINT / SIGTERM save a checkpoint at the
current step and stop with one line naming the command that continues the run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from workbench.cli import main
from workbench.train import interrupt
from workbench.train.checkpoint import CheckpointError, load_model, read_checkpoint
from workbench.train.config import TrainConfig
from workbench.train.interrupt import Interrupted, StoppedAtOnce
from workbench.train.trainer import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthetic", "--train-subset", "64", "--test-subset", "32", "--batch-size", "32",
        "--warmup-epochs", "0.5", "--moe-layers", "last-1", "--num-experts", "2", "--model-arg", "depth=2",
        "--model-arg", "embed_dim=32", "--model-arg", "num_heads=2", "--quiet"]


def _cfg(tmp_path, **kw):
    base = dict(dataset="synthetic", train_subset=256, test_subset=64, epochs=2, batch_size=32, lr=5e-3,
                warmup_epochs=0.25, output=str(tmp_path / "run"), quiet=True,
                model_kwargs=dict(moe_layers="last-1", num_experts=2, depth=2, embed_dim=32, num_heads=2))
    base.update(kw)
    return TrainConfig(**base)


def _weights(path):
    return load_model(path)[0].state_dict()


def _same_weights(a, b) -> bool:
    a, b = _weights(a), _weights(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _strip_timing(history):
    return [{k: v for k, v in row.items() if k not in ("img_per_s", "wall_time")} for row in history]


def _metrics(folder):
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


# -- resume keeps the plan --------------------------------------------------------------------------------------
def test_resume_without_flags_keeps_the_saved_epochs(tmp_path, capsys):
    """The reported case: a finished 2-epoch run resumed with no --epochs trained on to the default 10 and
    replaced the model.  Now it stays finished, and its train_config.json keeps epochs 2."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--output", str(out)]) == 0
    before = (out / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "all 2 epochs done" in text and "resuming with" not in text
    assert json.loads((out / "train_config.json").read_text())["epochs"] == 2
    assert len(_metrics(out)) == 2 and (out / "model" / "model.safetensors").read_bytes() == before
    # --quiet on resume is this call's business, not a change of the plan
    assert main(["train", "--resume", "--output", str(out), "--quiet"]) == 0
    assert "resuming with" not in capsys.readouterr().out


def test_resume_with_explicit_epochs_extends_and_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--output", str(out), "--epochs", "2", "--lr", "0.002"]) == 0
    text = capsys.readouterr().out
    assert "resuming with epochs 1 -> 2" in text and "resuming with lr 0.001 -> 0.002" in text
    assert "training to epoch 2" in text
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["epochs"], saved["lr"], saved["train_subset"], saved["batch_size"]) == (2, 0.002, 64, 32)
    assert [row["epoch"] for row in _metrics(out)] == [1, 2]


def test_a_config_file_given_again_on_resume_changes_nothing(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("dataset: synthetic\ntrain_subset: 64\ntest_subset: 32\nbatch_size: 32\nepochs: 1\nquiet: true\n"
                      "model_kwargs: {moe_layers: none, depth: 2, embed_dim: 32, num_heads: 2}\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--output", str(out), "--resume"]) == 0
    assert "resuming with" not in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "16"], "--resume cannot change batch_size 32 -> 16"),
    (["--seed", "3"], "seed 0 -> 3"),
    (["--dataset", "fashion-mnist"], "dataset synthetic -> fashion-mnist"),
    (["--num-experts", "4"], "model_kwargs.num_experts 2 -> 4"),
    (["--train-subset", "128"], "train_subset 64 -> 128"),
    (["--model", "vimoe_micro_patch7_28"], "model vimoe_tiny_patch4_28 -> vimoe_micro_patch7_28"),
])
def test_changes_a_run_in_progress_cannot_take_are_refused(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--output", str(out)]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        main(["train", "--resume", "--output", str(out), "--epochs", "2", *flags])
    text = capsys.readouterr().err
    assert err.value.code == 2 and message in text and "leave that out" in text and "another --output" in text
    assert text.strip().count("\n") == 0 and "Traceback" not in text
    assert json.loads((out / "train_config.json").read_text())["epochs"] == 1  # nothing was touched


def test_same_values_given_again_are_not_changes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--output", str(out)]) == 0
    capsys.readouterr()
    # the model was built as the default: naming it (or the same MoE switches) changes nothing
    assert main(["train", "--resume", "--output", str(out), "--model", "vimoe_tiny_patch4_28", "--num-experts",
                 "2", "--batch-size", "32", "--lr", "1e-3"]) == 0
    assert "resuming with" not in capsys.readouterr().out


def test_python_api_resume_with_a_changed_lr_uses_it_from_the_next_step(tmp_path):
    train(_cfg(tmp_path, epochs=1))
    trainer = Trainer(_cfg(tmp_path, epochs=2, lr=1e-2), resume=True, given={"epochs", "lr"})
    assert trainer.cfg.lr == 1e-2 and trainer.cfg.epochs == 2
    lam = trainer.scheduler.lr_lambdas[0](trainer.scheduler.last_epoch)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * lam)
    assert trainer.scheduler.base_lrs == [1e-2, 1e-2]
    # the whole config (studies pass one): a field that cannot change is refused, in one line
    with pytest.raises(ValueError, match="cannot change seed 0 -> 1"):
        Trainer(_cfg(tmp_path, epochs=2, seed=1), resume=True)


# -- interrupts save and say how to continue ----------------------------------------------------------------------
def _signal_at(monkeypatch, call: int, signums):
    """Make the trainer's ``call``-th loss computation send itself ``signums`` (a signal arriving mid-step)."""
    original, calls = Trainer.compute_loss, []

    def signalled(self, x, y):
        calls.append(1)
        if len(calls) == call:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return original(self, x, y)

    monkeypatch.setattr(Trainer, "compute_loss", signalled)
    return original


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_at_the_current_step_and_resumes_exactly(tmp_path, monkeypatch, signum):
    full = train(_cfg(tmp_path, output=str(tmp_path / "full")))
    original = _signal_at(monkeypatch, 11, [signum])  # 8 steps per epoch: step 3 of epoch 2; no periodic saves
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as err:
        train(_cfg(tmp_path, output=str(tmp_path / "part")))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers given back
    assert err.value.signum == signum and err.value.exit_code == 128 + signum
    text = str(err.value)
    assert "at epoch 2, step 3 of 8" in text and f"--output {tmp_path / 'part'} --resume" in text
    state = read_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert (state["epoch"], state["step"]) == (1, 3)
    monkeypatch.setattr(Trainer, "compute_loss", original)
    resumed = train(_cfg(tmp_path, output=str(tmp_path / "part")), resume=True)
    assert _strip_timing(resumed["history"]) == _strip_timing(full["history"])
    assert _same_weights(tmp_path / "full" / "model", tmp_path / "part" / "model")


def test_a_signal_at_the_last_step_of_an_epoch_resumes_exactly(tmp_path, monkeypatch):
    full = train(_cfg(tmp_path, output=str(tmp_path / "full")))
    original = _signal_at(monkeypatch, 8, [signal.SIGINT])
    with pytest.raises(Interrupted, match="at epoch 1, step 8 of 8"):
        train(_cfg(tmp_path, output=str(tmp_path / "part")))
    monkeypatch.setattr(Trainer, "compute_loss", original)
    resumed = train(_cfg(tmp_path, output=str(tmp_path / "part")), resume=True)
    assert _strip_timing(resumed["history"]) == _strip_timing(full["history"])
    assert _same_weights(tmp_path / "full" / "model", tmp_path / "part" / "model")


def test_a_second_signal_stops_at_once_without_saving(tmp_path, monkeypatch):
    monkeypatch.setattr(interrupt, "REPEAT_S", 0.0)  # the second Ctrl-C a person gives, later than a repeat
    _signal_at(monkeypatch, 5, [signal.SIGINT, signal.SIGINT])
    with pytest.raises(StoppedAtOnce) as err:
        train(_cfg(tmp_path, save_every=3))
    assert "second SIGINT" in str(err.value) and "is kept: continue with" in str(err.value)
    state = read_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert (state["epoch"], state["step"]) == (0, 3)  # the last periodic checkpoint, as it was


def test_a_repeated_delivery_of_one_signal_is_one_request(tmp_path, monkeypatch):
    """torchrun and schedulers signal every process of a group: a repeat within REPEAT_S is the same request."""
    _signal_at(monkeypatch, 5, [signal.SIGTERM, signal.SIGTERM])
    with pytest.raises(Interrupted) as err:
        train(_cfg(tmp_path))
    assert not isinstance(err.value, StoppedAtOnce) and "step 5 of 8" in str(err.value)


def test_cli_prints_one_line_and_exits_128_plus_the_signal(tmp_path, monkeypatch, capsys):
    _signal_at(monkeypatch, 2, [signal.SIGTERM])
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--output", str(out)]) == 143
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "interrupted by SIGTERM at epoch 1, step 2 of 2; saved " in err
    assert f"continue with: python -m workbench train --output {out} --resume" in err


def test_ctrl_c_mid_run_saves_and_resume_gives_the_uninterrupted_weights(tmp_path, tiny_cli_train):
    """A real Ctrl-C (SIGINT) to a CLI run saving every step; then --resume with no other flag."""
    args = [sys.executable, *tiny_cli_train, "--save-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(args + ["--output", str(tmp_path / "full")], check=True, env=env, cwd=ROOT, timeout=600,
                   capture_output=True)
    proc = subprocess.Popen(args + ["--output", str(tmp_path / "cut")], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    deadline, seen = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None:
        try:
            state = read_checkpoint(ckpt) if ckpt.exists() else None
        except CheckpointError:
            state = None
        if state is not None and state["step"] >= 3:
            seen = (state["epoch"], state["step"])
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert seen is not None and proc.returncode == 130, (proc.returncode, err)
    assert err.count("\n") == 1 and "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "interrupted by SIGINT (Ctrl-C)" in err and f"--output {tmp_path / 'cut'} --resume" in err
    state = read_checkpoint(ckpt)
    assert (state["epoch"], state["step"]) >= seen and state["epoch"] < 2
    resumed = subprocess.run(args[:4] + ["--output", str(tmp_path / "cut"), "--resume", "--quiet"], env=env, cwd=ROOT,
                             timeout=600, capture_output=True, text=True)
    assert resumed.returncode == 0 and "resuming with" not in resumed.stdout, resumed.stderr
    assert _same_weights(tmp_path / "full" / "model", tmp_path / "cut" / "model")
    assert _strip_timing(_metrics(tmp_path / "full")) == _strip_timing(_metrics(tmp_path / "cut"))


def test_progress_bars_need_no_ipywidgets():
    """Without ipywidgets (not a dependency) the bars are tqdm's text bars, so a notebook shows no TqdmWarning."""
    import importlib.util

    from workbench.train import progress
    from workbench.train import trainer as trainer_module

    if importlib.util.find_spec("ipywidgets") is None:
        import tqdm.std

        assert progress.tqdm is tqdm.std.tqdm
    assert trainer_module.tqdm is progress.tqdm


def test_a_checkpoint_config_this_version_cannot_read_is_named(tmp_path, capsys):
    from workbench.train.checkpoint import save_checkpoint

    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--output", str(out)]) == 0
    state = read_checkpoint(out / "checkpoint.pt")
    state["train_config"]["schedule"] = "cosine-v2"  # written by another version
    save_checkpoint(out / "checkpoint.pt", state)
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        main(["train", "--resume", "--output", str(out)])
    text = capsys.readouterr().err
    assert err.value.code == 2 and text.count("\n") == 1
    assert f"{out / 'checkpoint.pt'} holds a run config this version cannot read" in text and "schedule" in text


def test_under_torchrun_only_the_main_process_prints_the_final_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("workbench.train.trainer.train", lambda cfg, resume, given: {
        "history": [{"epoch": 1, "test_acc": 0.5}], "output": cfg.output})
    monkeypatch.setenv("RANK", "1")
    assert main(["train", *TINY, "--output", str(tmp_path / "r")]) == 0
    assert "done:" not in capsys.readouterr().out
    monkeypatch.setenv("RANK", "0")
    assert main(["train", *TINY, "--output", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.count("done: test accuracy 0.5000 after 1 epoch;") == 1


def test_under_ddp_a_signal_to_one_rank_stops_every_rank_at_one_step_and_resumes_exactly(tmp_path, torchrun):
    """torchrun (two gloo processes): a SIGTERM to rank 1 alone stops both ranks after the same step, rank 0 saves
    there before any rank exits, and the resumed run ends with an uninterrupted run's weights."""
    script = tmp_path / "ddp_stop.py"
    script.write_text(f"""
import os, signal
import torch, torch.distributed as dist
from workbench.train.config import TrainConfig
from workbench.train.interrupt import Interrupted
from workbench.train.trainer import Trainer, train

def cfg(name):
    return TrainConfig(dataset="synthetic", train_subset=128, test_subset=32, epochs=2, batch_size=32, quiet=True,
                       output=os.path.join(r"{tmp_path}", name), device="cpu",
                       model_kwargs=dict(moe_layers="last-1", num_experts=2, depth=2, embed_dim=32, num_heads=2))

train(cfg("full"))
original, calls = Trainer.compute_loss, []
def signalled(self, x, y):
    calls.append(1)
    if dist.get_rank() == 1 and len(calls) == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return original(self, x, y)
Trainer.compute_loss = signalled
try:
    train(cfg("cut"))
    raise SystemExit("not interrupted")
except Interrupted as err:
    message = str(err)
Trainer.compute_loss = original
dist.barrier()
if dist.get_rank() == 0:
    print("MESSAGE", message)
train(cfg("cut"), resume=True)
dist.destroy_process_group()
""")
    out = torchrun(script)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MESSAGE interrupted by SIGTERM at epoch 1, step 3 of 4" in out.stdout
    assert "torchrun --nproc_per_node=2 -m workbench train" in out.stdout
    assert _same_weights(tmp_path / "full" / "model", tmp_path / "cut" / "model")
    # the interrupted epoch's metrics count both ranks' steps once (rank 0 saved every rank's partial sums)
    assert _strip_timing(_metrics(tmp_path / "full")) == _strip_timing(_metrics(tmp_path / "cut"))
