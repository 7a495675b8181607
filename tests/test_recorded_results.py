"""The recorded study results regenerate: one run per kind of record is re-run from scratch on the CPU (one
thread, as recorded) and compared with its record.  Notebooks 01 and 02 re-run the 'last-2' runs of the
placement and shared-expert studies; these cover the records they do not (routing analysis, pruning controls,
image routing)."""
import json
from pathlib import Path

import pytest
import torch

from workbench.study import load_study, result_path, run_one

ROOT = Path(__file__).resolve().parents[1]
ACC_TOL = 0.005  # thread scheduling may change float sums; one image in 10k is 0.0001
NMI_TOL = 0.01


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("study_name, config, seed", [("placement", "all", 0), ("routing", "image-last-2", 0)])
def test_recorded_run_regenerates(study_name, config, seed, tmp_path, one_thread):
    study = load_study(ROOT / "experiments" / "studies" / f"{study_name}.yaml")
    path = result_path(study, config, seed)
    assert path.is_file(), f"{path} is not recorded: run `python -m workbench study run` for {study_name}"
    recorded = json.loads(path.read_text())
    rerun = run_one(study, config, seed, device="cpu", results=tmp_path / "results")
    assert rerun["test_acc"] == pytest.approx(recorded["test_acc"], abs=ACC_TOL)
    assert rerun["params"] == recorded["params"] and rerun["gmacs"] == pytest.approx(recorded["gmacs"])
    assert set(rerun["routing"]) == set(recorded["routing"])
    for block, layer in recorded["routing"].items():
        for metric in ("nmi", "null_nmi", "position_nmi", "purity"):
            if layer[metric] == layer[metric]:  # position_nmi is NaN for image routing
                assert rerun["routing"][block][metric] == pytest.approx(layer[metric], abs=NMI_TOL), (block, metric)
    if "pruning" in recorded:
        assert len(rerun["pruning"]) == len(recorded["pruning"])
        for old, new in zip(recorded["pruning"], rerun["pruning"]):
            assert (old["densified"], old["params"]) == (new["densified"], new["params"])
            assert new["test_acc"] == pytest.approx(old["test_acc"], abs=ACC_TOL), old["densified"]
