import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# the app's model cards: a quick specialisation test (a checkpoint's cached card with more draws still serves)
os.environ.setdefault("WORKBENCH_CARD_DRAWS", "10")
os.environ.setdefault("WORKBENCH_CARD_IMAGES", "64")

import pytest  # noqa: E402
import torch  # noqa: E402

import workbench  # noqa: E402,F401  (registers the models)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def crash_training(monkeypatch):
    """``with crash_training(n): train(...)``: ``Trainer.compute_loss`` raises KeyboardInterrupt on its n-th call (a
    crash mid-run, which the block must see), then the trainer is restored for the resume."""
    from contextlib import contextmanager

    from workbench.train.trainer import Trainer

    @contextmanager
    def crash(call: int):
        original, calls = Trainer.compute_loss, []

        def crashing(self, x, y):
            calls.append(1)
            if len(calls) == call:
                raise KeyboardInterrupt("simulated crash")
            return original(self, x, y)

        monkeypatch.setattr(Trainer, "compute_loss", crashing)
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            monkeypatch.setattr(Trainer, "compute_loss", original)

    return crash


@pytest.fixture
def tiny_cli_train():
    """The arguments (after the interpreter) of a CLI training run small enough to interrupt and resume in a test:
    synthetic data, 2 epochs of 32 steps, a 2-block ViMoE; add --output and --save-every."""
    return ["-m", "workbench", "train", "--dataset", "synthetic", "--train-subset", "512", "--test-subset", "64",
            "--epochs", "2", "--batch-size", "16", "--quiet", "--moe-layers", "last-1", "--num-experts", "4",
            "--model-arg", "depth=2", "--model-arg", "embed_dim=32", "--model-arg", "num_heads=2"]


@pytest.fixture
def torchrun():
    """Run a script under ``torchrun --standalone --nproc_per_node=2`` (one thread each) from the repository root;
    the completed process, output captured as text."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def run(script):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(script)], capture_output=True, text=True, cwd=root, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)})

    return run
