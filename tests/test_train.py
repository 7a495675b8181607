import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from workbench.train.checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint
from workbench.train.config import NonFiniteLoss, TrainConfig
from workbench.train.trainer import Trainer, train

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, **kw):
    base = dict(dataset="synthetic", train_subset=256, test_subset=128, epochs=2, batch_size=32, lr=5e-3,
                warmup_epochs=0.25, output=str(tmp_path / "run"), quiet=True,
                model_kwargs=dict(moe_layers="last-2", num_experts=4, top_k=2, shared_expert="add", depth=2,
                                  embed_dim=32, num_heads=2))
    base.update(kw)
    return TrainConfig(**base)


def _weights(path):
    model, _ = load_model(path)
    return model.state_dict()


def _strip_timing(history):
    return [{k: v for k, v in row.items() if k not in ("img_per_s", "wall_time")} for row in history]


def test_loss_decreases_and_metrics_written(tmp_path):
    result = train(_cfg(tmp_path, epochs=3))
    h = result["history"]
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert h[-1]["test_acc"] > 0.3  # chance is 0.1
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    moe = rows[-1]["moe_train"]
    assert set(moe) == {"0", "1"} and len(moe["0"]["load"]) == 4 and moe["0"]["drop_rate"] == 0
    # Switch balance loss: E * sum_e f_e P_e lies in (0, E] (4 experts); it is not bounded below by 1
    assert 0 < rows[-1]["aux_balance"] <= 4 + 1e-6 and rows[-1]["img_per_s"] > 0
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_test_every_skips_test_scores_but_not_training(tmp_path):
    every = train(_cfg(tmp_path / "a", epochs=3, val_size=64))["history"]
    sparse = train(_cfg(tmp_path / "b", epochs=3, val_size=64, test_every=2))["history"]
    assert [("test_acc" in r, "val_acc" in r) for r in sparse] == [(False, True), (True, True), (True, True)]
    assert "moe_test" not in sparse[0] and "moe_test" in sparse[1]
    # evaluation draws no random numbers: the same training, the same scores where both were taken
    for a, b in zip(_strip_timing(every), _strip_timing(sparse)):
        assert {k: v for k, v in a.items() if k in b} == b
    assert torch.equal(torch.cat([p.flatten() for p in _weights(tmp_path / "a" / "run" / "model").values()]),
                       torch.cat([p.flatten() for p in _weights(tmp_path / "b" / "run" / "model").values()]))
    with pytest.raises(ValueError, match="test_every=0 is invalid"):
        TrainConfig(test_every=0).validate()


def test_exact_resume_in_process(tmp_path, crash_training):
    full = train(_cfg(tmp_path, output=str(tmp_path / "full")))
    # crash in the middle of epoch 2 (8 steps per epoch; checkpoints every 3 steps and at epoch ends)
    with crash_training(13):
        train(_cfg(tmp_path, output=str(tmp_path / "part"), save_every=3))
    state = read_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert (state["epoch"], state["step"]) == (1, 3)
    resumed = train(_cfg(tmp_path, output=str(tmp_path / "part"), save_every=3), resume=True)
    assert _strip_timing(resumed["history"]) == _strip_timing(full["history"])
    a, b = _weights(tmp_path / "full" / "model"), _weights(tmp_path / "part" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_run_resumes_to_identical_weights(tmp_path, tiny_cli_train):
    """Kill a CLI run with SIGKILL mid-epoch, resume it, and compare with an uninterrupted run."""
    args = [sys.executable, *tiny_cli_train, "--save-every", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(args + ["--output", str(tmp_path / "full")], check=True, env=env, cwd=ROOT, timeout=600)
    proc = subprocess.Popen(args + ["--output", str(tmp_path / "killed")], env=env, cwd=ROOT)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 300
    while time.time() < deadline:
        if ckpt.exists():
            try:
                state = read_checkpoint(ckpt)
                if state["epoch"] == 1 and state["step"] >= 5 or state["epoch"] >= 2:
                    break
            except CheckpointError:
                pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = read_checkpoint(ckpt)
    assert state["epoch"] < 2, "the run finished before it could be killed"
    subprocess.run(args + ["--output", str(tmp_path / "killed"), "--resume"], check=True, env=env, cwd=ROOT,
                   timeout=600)
    a, b = _weights(tmp_path / "full" / "model"), _weights(tmp_path / "killed" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(l) for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert _strip_timing(metrics) == _strip_timing(resumed)


def test_atomic_checkpoint_survives_crash_during_write(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "model_config": {"model": "x"}})

    def crash(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "model_config": {"model": "x"}})
    monkeypatch.undo()
    assert torch.equal(read_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="is not a workbench checkpoint"):
        read_checkpoint(path)
    save_checkpoint(path, {"model": {"w": torch.zeros(1000)}, "epoch": 1})
    path.write_bytes(path.read_bytes()[:-300])  # a real checkpoint, cut short
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(path)


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, epochs=1)
    train(cfg)
    before = read_checkpoint(tmp_path / "run" / "checkpoint.pt")
    original = Trainer.compute_loss

    def poisoned(self, x, y):
        logits, task, aux = original(self, x, y)
        return logits, task * float("nan"), aux

    monkeypatch.setattr(Trainer, "compute_loss", poisoned)
    with pytest.raises(NonFiniteLoss, match="loss became nan.*last good checkpoint"):
        train(_cfg(tmp_path, epochs=2), resume=True)
    after = read_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert after["epoch"] == before["epoch"] == 1
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])


def test_upcycling_run_starts_from_dense(tmp_path):
    dense_cfg = _cfg(tmp_path, epochs=1, output=str(tmp_path / "dense"),
                     model_kwargs=dict(moe_layers="none", depth=2, embed_dim=32, num_heads=2))
    train(dense_cfg)
    moe_cfg = _cfg(tmp_path, epochs=1, output=str(tmp_path / "moe"), init_from=str(tmp_path / "dense" / "model"),
                   model_kwargs=dict(moe_layers="last-1", num_experts=4, top_k=1, renormalize=True))
    trainer = Trainer(moe_cfg)
    dense, _ = load_model(tmp_path / "dense" / "model")
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(trainer.model.eval()(x), dense(x), atol=1e-5, rtol=1e-5)
    trainer.model.train()
    trainer.run()
    model, config = load_model(tmp_path / "moe" / "model")
    assert config["model_kwargs"]["moe_layers"] == "last-1" and config["model_kwargs"]["depth"] == 2
    assert model.moe_layer_indices == [1]


def test_wrong_architecture_is_refused(tmp_path):
    train(_cfg(tmp_path, epochs=1))
    with pytest.raises(CheckpointError, match="init-from.*already has MoE layers"):
        Trainer(_cfg(tmp_path, output=str(tmp_path / "b"), init_from=str(tmp_path / "run" / "model"),
                     model_kwargs={"moe_layers": "last-1"}))
    with pytest.raises(CheckpointError, match="vimoe_small_patch16_224"):
        Trainer(_cfg(tmp_path, output=str(tmp_path / "c"), init_from=str(tmp_path / "run" / "model"),
                     model="vimoe_small_patch16_224", model_kwargs={}))
    from workbench.train.checkpoint import load_state_into
    import timm
    other = timm.create_model("vimoe_tiny_patch4_28", moe_layers="none")
    state = read_checkpoint(tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="another architecture"):
        load_state_into(other, state["model"], state["model_config"], "run")


def test_existing_output_needs_resume(tmp_path):
    train(_cfg(tmp_path, epochs=1))
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(_cfg(tmp_path, epochs=1))


def test_ddp_two_gloo_processes_keep_replicas_identical(tmp_path, torchrun):
    script = tmp_path / "ddp_check.py"
    script.write_text(f"""
import torch, torch.distributed as dist
from workbench.train.config import TrainConfig
from workbench.train.trainer import Trainer
cfg = TrainConfig(dataset="synthetic", train_subset=128, test_subset=64, epochs=1, batch_size=32, quiet=True,
                  output=r"{tmp_path / 'ddp'}", device="cpu",
                  model_kwargs=dict(moe_layers="last-1", num_experts=4, depth=2, embed_dim=32, num_heads=2))
trainer = Trainer(cfg)
before = torch.cat([p.detach().flatten() for p in trainer.model.parameters()]).clone()
trainer.run()
flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(2)]
dist.all_gather(gathered, flat)
assert not torch.equal(before, flat), "weights did not move"
assert torch.equal(gathered[0], gathered[1]), "replicas diverged"
if dist.get_rank() == 0:
    print("REPLICAS_IDENTICAL", trainer.history[-1]["test_n"])
dist.destroy_process_group()
""")
    out = torchrun(script)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REPLICAS_IDENTICAL 64" in out.stdout


@pytest.mark.gpu
def test_gpu_training_bf16(tmp_path):
    result = train(_cfg(tmp_path, device="cuda", epochs=2))
    assert result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]
