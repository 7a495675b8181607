"""A study file is checked completely before anything runs, and ``claims`` / ``summary`` check it the same way;
records the file no longer describes are left out with a warning; a damaged record names its file; SIGINT / SIGTERM
stop a study cleanly and it continues where it stopped."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import yaml

from workbench.cli import main
from workbench.studies.claims import evaluate_claims, summary
from workbench.studies.records import load_results
from workbench.studies.runner import run_study
from workbench.studies.spec import StudyError, arm_spec, load_study
from workbench.train.checkpoint import model_config, save_model
from workbench.train.interrupt import Interrupted
from workbench.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {"dataset": "synthetic", "train_subset": 96, "val_size": 64, "test_subset": 48, "epochs": 1,
         "batch_size": 32}
MICRO = {"embed_dim": 32, "num_heads": 2}
GOOD = {"name": "g", "protocol": "scratch", "model": "vimoe_micro_patch7_28", "train": TRAIN, "seeds": [0, 1],
        "common": {"num_experts": 2, **MICRO},
        "configs": {"dense": {"moe_layers": "none"}, "last-1": {"moe_layers": "last-1"}},
        "claims": [{"id": "c1", "says": "MoE helps", "treatment": "last-1", "expect": "greater"}]}


def _write(tmp_path, study, name="s"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def _edit(base: dict, **changes) -> dict:
    study = json.loads(json.dumps(base))
    for dotted, value in changes.items():
        keys = dotted.split("__")
        target = study
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return study


@pytest.mark.parametrize("changes, message", [
    ({"control": "dnese"}, "control 'dnese' is not an arm of this study (did you mean 'dense'?)"),
    ({"configs__last-1": {"moe_layer": "last-1"}}, "arm 'last-1': unknown model argument 'moe_layer'; did you mean "
                                                    "'moe_layers'?"),
    ({"common__top_k": 8}, "arm 'last-1': top_k=8 is invalid: use an integer with 1 <= top_k <= num_experts (2)"),
    ({"configs__last-1": {"moe_layers": "middle-1"}}, "arm 'last-1': moe_layers='middle-1' is not a known spec"),
    ({"configs__last-1": {"moe_layers": "last-1", "num_experts": "two"}},
     "arm 'last-1': model argument num_experts='two' is invalid: num_experts takes an integer"),
    ({"train__train_subest": 96}, "unknown train key 'train_subest' (did you mean 'train_subset'?)"),
    ({"train__epochs": 0}, "arm 'dense': epochs=0 is invalid"),
    ({"train__dataset": "mnist3d"}, "dataset='mnist3d' is not known"),
    ({"train__seed": 3}, "train.seed is set by the study itself (seeds)"),
    ({"train__data_options": {"train_sise": 5}}, "data_options ['train_sise'] are options of the segmentation"),
    ({"train__dataset": "fmnist-scenes", "train__data_options": {"train_sise": 5}},
     "unknown option(s) ['train_sise'] for fmnist-scenes: use train_size"),
    ({"train__dataset": "fmnist-scenes"}, "arm 'dense': model vimoe_micro_patch7_28 is a classification model but "
                                          "the dataset is a segmentation dataset"),
    ({"train__dataset": "fmnist-scenes", "model": "vimoe_seg_micro_patch7_56", "analysis": {"regions": False},
      "checks": [{"id": "moved", "says": "s", "metric": "expert_spread", "at_least": 0.1}]},
     "check 'moved': a segmentation study records expert_spread with its regions analysis; set analysis.regions: true"),
    ({"seeds": [0, 0]}, "seeds=[0, 0] is invalid: give a list of distinct integers"),
    ({"seeds": "0"}, "seeds='0' is invalid"),
    ({"references": ["nowhere"]}, "references names study 'nowhere', which has no file in"),
    ({"references": ["nowhere"]}, "copy 'nowhere''s study file beside this one"),
    ({"comon": {"top_k": 1}}, "unknown keys 'comon' (did you mean 'common'?)"),
    ({"model": "no_such_model"}, "model: --model 'no_such_model' is not a timm model"),
    ({"configs": {}}, "'configs' must be a mapping of arm name -> model keywords"),
])
def test_a_bad_study_file_is_refused_before_any_run(tmp_path, changes, message, capsys):
    path = _write(tmp_path, _edit(GOOD, **changes))
    results = tmp_path / "results"
    with pytest.raises(StudyError) as err:
        run_study(path, results=results, allow_dirty=True)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)
    assert not (results / "g").exists()  # nothing ran, nothing was recorded (the dense arm first, as it used to)
    for command in ("claims", "summary", "checks"):  # read the same way
        with pytest.raises(SystemExit) as exit_:
            main(["study", command, str(path)])
        text = capsys.readouterr().err
        assert exit_.value.code == 2 and message in text and text.count("\n") == 1 and "Traceback" not in text


def test_referenced_arms_must_exist_in_the_referenced_study(tmp_path):
    _write(tmp_path, GOOD, name="g")
    other = _edit(GOOD, name="o", references=["g"], control="g/dense")
    assert load_study(_write(tmp_path, other, name="o"))["control"] == "g/dense"
    with pytest.raises(StudyError, match="'dnese' is not an arm of study 'g'"):
        load_study(_write(tmp_path, _edit(other, control="g/dnese"), name="o"))
    bad_claim = _edit(other, claims=[{"id": "c", "says": "s", "treatment": "last-1", "control": "g/last-9",
                                      "expect": "greater"}])
    with pytest.raises(StudyError, match="claim 'c' names 'g/last-9'"):
        load_study(_write(tmp_path, bad_claim, name="o"))


def test_upcycle_arms_are_built_on_the_base_before_any_run(tmp_path):
    kw = {"moe_layers": "none", "depth": 2, **MICRO}
    save_model(timm.create_model("vimoe_micro_patch7_28", **kw), model_config("vimoe_micro_patch7_28", kw),
               tmp_path / "dense")
    study = {"name": "u", "protocol": "upcycle", "base": str(tmp_path / "dense"), "train": TRAIN, "seeds": [0],
             "common": {"num_experts": 2, "renormalize": True},
             "configs": {"dense": {"moe_layers": "none"}, "split": {"moe_layers": "all", "shared_expert": "add",
                                                                     "shared_init": "split"}}}
    with pytest.raises(StudyError, match="arm 'split': shared_init='split' needs shared_expert='add' and "
                                         "shared_hidden \\+ expert_hidden equal to the dense FFN width 128"):
        load_study(_write(tmp_path, study, name="u"))
    study["configs"]["split"].update(shared_hidden=64, expert_hidden=64)
    assert load_study(_write(tmp_path, study, name="u"))
    study["configs"]["split"]["depth"] = 3  # the architecture comes from the base
    with pytest.raises(StudyError, match="arm 'split': with init_from only MoE switches may be given, not "
                                         "\\['depth'\\]"):
        load_study(_write(tmp_path, study, name="u"))
    study["base"] = str(tmp_path / "not-trained-yet")  # without its base, the MoE switches are checked alone
    study["configs"]["split"].pop("depth")
    study["common"]["top_k"] = 3
    with pytest.raises(StudyError, match="arm 'split': top_k=3 is invalid"):
        load_study(_write(tmp_path, study, name="u"))


def _fake_record(results, study, config, seed, acc):
    rec = {"study": study["name"], "config": config, "seed": seed, "arm_spec": arm_spec(study, config),
           "test_acc": acc, "val_acc": acc, "params": 1, "active_params": 1, "gmacs": 0.1,
           "provenance": {"wall_time_s": 1.0, "threads": 1, "device": "cpu", "commit": "x"}}
    path = results / study["name"] / f"{config}__seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return path


def test_records_the_file_does_not_describe_are_left_out_with_a_warning(tmp_path, capsys):
    path = _write(tmp_path, GOOD)
    study = load_study(path)
    results = tmp_path / "results"
    for seed in (0, 1, 2, 3):  # seeds 2 and 3: `study run --seeds 2 3` on a file that lists [0, 1]
        _fake_record(results, study, "dense", seed, 0.80 + 0.01 * seed)
        _fake_record(results, study, "last-1", seed, 0.82 + 0.011 * seed)
    capsys.readouterr()
    assert summary(study, results)["n"].tolist() == [2, 2]
    assert evaluate_claims(study, results).loc[0, "n"] == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1  # one warning however often the records are read
    assert "4 records in" in err and "4 of seeds the file does not list (dense seed 2" in err
    # the budget edited after the runs: every record describes another arm now; none is pooled with the new file
    edited = _write(tmp_path, _edit(GOOD, train__epochs=2))
    assert load_results(edited, results).empty
    err = capsys.readouterr().err
    assert "8 records" in err and "4 recorded with another definition of their arm" in err
    assert main(["study", "claims", str(edited), "--results", str(results)]) == 0
    assert "no runs recorded yet" in capsys.readouterr().out


def test_a_damaged_record_names_its_file(tmp_path, capsys):
    path = _write(tmp_path, GOOD)
    study = load_study(path)
    results = tmp_path / "results"
    _fake_record(results, study, "dense", 0, 0.8)
    bad = _fake_record(results, study, "last-1", 0, 0.8)
    bad.write_text(bad.read_text()[:40])
    with pytest.raises(StudyError, match=f"record {bad} is damaged \\(JSONDecodeError"):
        summary(study, results)
    with pytest.raises(StudyError, match=f"record {bad} is damaged"):
        run_study(path, results=results, allow_dirty=True)
    bad.write_text("[1, 2]")
    with pytest.raises(StudyError, match="not a study record"):
        load_results(study, results)


def test_run_with_seeds_beyond_the_file_says_they_will_not_count(tmp_path, capsys, monkeypatch):
    path = _write(tmp_path, GOOD)
    monkeypatch.setattr("workbench.studies.runner._worker", lambda task: (task[1], task[2], 0.5, 0.0))
    run_study(path, results=tmp_path / "results", seeds=[1, 2], allow_dirty=True)
    assert "note: seeds [2] are not among" in capsys.readouterr().out


# -- interrupted studies -------------------------------------------------------------------------------------------
STOPPABLE = _edit(GOOD, name="stop", seeds=[0], train={**TRAIN, "train_subset": 320, "batch_size": 16,
                                                        "save_every": 1})


def _strip(record):
    return {"history": [{k: v for k, v in row.items() if k not in ("img_per_s", "wall_time")}
                        for row in record["history"]], "test_predictions": record["test_predictions"]}


def test_an_interrupted_study_saves_its_run_and_continues_exactly(tmp_path, monkeypatch):
    path = _write(tmp_path, STOPPABLE)
    full = tmp_path / "full"
    run_study(path, results=full, only=["last-1"], allow_dirty=True)
    original, calls = Trainer.compute_loss, []

    def signalled(self, x, y):
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, x, y)

    monkeypatch.setattr(Trainer, "compute_loss", signalled)
    cut = tmp_path / "cut" / "results"
    with pytest.raises(Interrupted) as err:
        run_study(path, results=cut, only=["last-1"], allow_dirty=True)
    text = str(err.value)
    assert "study stop: interrupted by SIGINT (Ctrl-C); 0 of 1 runs recorded" in text
    assert f"continue with: python -m workbench study run {path} --results {cut} --only last-1 --allow-dirty" in text
    assert (tmp_path / "cut" / "runs" / "stop" / "last-1" / "seed0" / "checkpoint.pt").is_file()
    monkeypatch.setattr(Trainer, "compute_loss", original)
    assert len(run_study(path, results=cut, only=["last-1"], allow_dirty=True)) == 1
    a = json.loads((full / "stop" / "last-1__seed0.json").read_text())
    b = json.loads((cut / "stop" / "last-1__seed0.json").read_text())
    assert _strip(a) == _strip(b)


def test_sigterm_to_study_run_with_workers_saves_and_resumes(tmp_path):
    """A scheduler's SIGTERM to `study run --jobs 2`: the parent passes it to its workers, each saves its run at
    the current step; the same command continues, and the records equal an uninterrupted run's.  On a loaded
    machine one worker may record its run before the other has started, so the signal goes once no run is left
    unstarted and one is still training, and the message counts the runs recorded by then."""
    path = _write(tmp_path, _edit(STOPPABLE, train={**STOPPABLE["train"], "train_subset": 1600, "save_every": 5}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = tmp_path / "results"
    args = [sys.executable, "-m", "workbench", "study", "run", str(path), "--results", str(results), "--jobs", "2",
            "--allow-dirty"]
    runs = tmp_path / "runs" / "stop"

    def recorded():
        return {p.name.split("__")[0] for p in (results / "stop").glob("*__seed0.json")}

    def training():
        return {p.parent.parent.name for p in runs.glob("*/seed0/checkpoint.pt")} - recorded()

    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if training() and len(training() | recorded()) == 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, (out, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    done = recorded()
    assert len(done) < 2 and f"interrupted by SIGTERM; {len(done)} of 2 runs recorded" in err, err
    assert f"continue with: python -m workbench study run {path} --results {results} --jobs 2" in err
    assert training() == {"dense", "last-1"} - done  # every run not recorded saved its step
    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    fresh = tmp_path / "fresh"
    run_study(path, results=fresh, allow_dirty=True)
    for config in ("dense", "last-1"):
        a = json.loads((fresh / "stop" / f"{config}__seed0.json").read_text())
        b = json.loads((results / "stop" / f"{config}__seed0.json").read_text())
        assert _strip(a) == _strip(b)
        # a resumed run's wall time is the last attempt's; a run recorded before the signal was never resumed
        assert b["provenance"]["resumed"] == (config not in done) and not a["provenance"]["resumed"]


def test_summary_columns_keep_their_spacing_with_long_names_and_wide_intervals():
    import pandas as pd

    from workbench.studies.claims import format_contrasts, format_summary

    table = pd.DataFrame([
        {"config": "last-2", "n": 5, "delta": 0.1, "low": -0.5, "high": 0.7, "p": 0.5, "p_holm": 1.0,
         "params_M": 0.669, "gmacs": 0.0036},
        {"config": "experts-choose-cf2-per-batch", "n": 2, "delta": -12.5, "low": -140.25, "high": 115.25,
         "p": 0.2, "p_holm": 0.000557, "params_M": 1.134, "gmacs": 0.0059}])
    lines = format_contrasts(table).splitlines()
    assert "[-140.250, +115.250]" in lines[2] and "[-0.500, +0.700]" in lines[1]
    ends = {line.index("]") for line in lines[1:]}
    assert len(ends) == 1 and lines[0].index("95% CI") + len("95% CI") - 1 == ends.pop()  # one right edge
    assert all(" " + col in lines[0] for col in ("n", "p_holm", "GMACs"))
    assert lines[2].split()[0] == "experts-choose-cf2-per-batch" and lines[2].split()[1] == "2"
    summary_lines = format_summary(table.assign(acc_mean=0.8, acc_std=0.01)).splitlines()
    assert len({len(line) for line in summary_lines}) == 1  # every row as wide as the header


def test_a_run_in_progress_is_not_finished_under_an_edited_arm(tmp_path):
    from workbench.studies.run import run_one, train_config

    path = _write(tmp_path, GOOD)
    results = tmp_path / "results"
    out = tmp_path / "runs" / "g" / "last-1" / "seed0"
    out.mkdir(parents=True)
    started = train_config(load_study(path), "last-1", 0, out, "auto", True)
    (out / "train_config.json").write_text(json.dumps(started.__dict__))
    (out / "checkpoint.pt").write_bytes(b"in progress")
    edited = load_study(_write(tmp_path, _edit(GOOD, train__epochs=3)))
    with pytest.raises(StudyError, match="started under another definition of arm 'last-1' \\(epochs 1 -> 3\\); "
                                         "restore the study file, or delete"):
        run_one(edited, "last-1", 0, results=results, allow_dirty=True)
