"""experiments/gpu/check.sh runs end to end: its dry run (every step on the CPU, tiny shapes, synthetic data)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "experiments" / "gpu" / "check.sh"
STEPS = ("1. CUDA tests", "2. torchrun", "3. the gpu profile's dense base", "4. MoE layer benchmark (",
         "5. MoE layer benchmark at ViT-S/16 and ViT-B/16", "6. training step ViMoE-S/16 vs ViT-S/16")


def test_check_dry_run_runs_every_step(tmp_path):
    env = {**os.environ, "PY": sys.executable, "CHECK_OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(CHECK), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("== ")]
    for step in STEPS:
        assert any(line.startswith(f"== {step}") for line in lines), f"step {step!r} did not print its line:\n{out}"
    assert lines[-1].startswith("== done") and "check.sh: all 6 steps passed (dry run)" in out
    assert "preset vit-s16, E=16" in out and "preset vit-b16, E=8" in out  # both shapes, both expert counts
    assert "training step vimoe_small_patch16_224" in out and "img/s" in out
    assert (tmp_path / "check.log").read_text().count("\n== ") >= len(STEPS)


def test_check_refuses_an_unknown_argument():
    done = subprocess.run(["bash", str(CHECK), "--fast"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip() == "check.sh: unknown argument --fast: use --dry-run or none"
