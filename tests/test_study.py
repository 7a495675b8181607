import json
from pathlib import Path

import pytest
import timm
import torch
import yaml

import workbench

from workbench.train.checkpoint import model_config, save_model
from workbench.studies.spec import StudyError, load_study, parse_shard, plan
from workbench.studies.run import base_accuracy, base_fingerprint, run_one
from workbench.studies.claims import contrasts, evaluate_claims, summary
from workbench.analysis.movement import expert_spread
from workbench.studies.records import load_pruning, load_record, load_results, load_routing, routing_tables
from workbench.studies.runner import run_study

TRAIN = {"dataset": "synthetic", "train_subset": 96, "val_size": 64, "test_subset": 48, "epochs": 1,
         "batch_size": 32}
MICRO = {"embed_dim": 32, "num_heads": 2}


def _write(tmp_path, name, study):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


@pytest.fixture()
def scratch_file(tmp_path):
    return _write(tmp_path, "tiny", {
        "name": "tiny", "protocol": "scratch", "model": "vimoe_micro_patch7_28", "train": TRAIN, "seeds": [0, 1, 2],
        "common": {"num_experts": 2, **MICRO},
        "configs": {"dense": {"moe_layers": "none"}, "last-1": {"moe_layers": "last-1"}},
        "claims": [{"id": "c1", "says": "MoE helps", "treatment": "last-1", "expect": "greater"},
                   {"id": "c2", "says": "spread", "kind": "spread", "treatment": "last-1", "expect": "less"}]})


def test_scratch_study_records_provenance_predictions_and_resumes(scratch_file, tmp_path, capsys):
    results = tmp_path / "results"
    done = run_study(scratch_file, results=results, allow_dirty=True)
    assert len(done) == 6
    record = json.loads((results / "tiny" / "last-1__seed1.json").read_text())
    assert record["config"] == "last-1" and record["seed"] == 1 and record["test_n"] == 48
    assert record["protocol"] == "scratch" and record["val_acc"] is not None
    assert len(record["test_predictions"]) == 48
    prov = record["provenance"]
    assert prov["commit"] and prov["device"].startswith(("cpu", "cuda")) and prov["wall_time_s"] > 0
    assert prov["threads"] == 1
    assert record["model_config"]["model_kwargs"]["moe_layers"] == "last-1"
    assert record["params"] > json.loads((results / "tiny" / "dense__seed0.json").read_text())["params"]
    assert run_study(scratch_file, results=results, allow_dirty=True) == []  # all recorded: nothing re-run
    assert "6 of 6 runs recorded, 0 to run" in capsys.readouterr().out
    table = summary(scratch_file, results=results)
    assert table["config"].tolist() == ["dense", "last-1"] and table["n"].tolist() == [3, 3]
    c = contrasts(scratch_file, results=results)
    df = load_results(scratch_file, results=results).pivot(index="seed", columns="config", values="test_acc")
    assert c["delta"].item() == pytest.approx(100 * (df["last-1"] - df["dense"]).mean())
    claims = evaluate_claims(scratch_file, results=results)
    assert claims["id"].tolist() == ["c1", "c2"]
    assert claims.loc[0, "estimate"] == pytest.approx(c["delta"].item())
    assert set(claims["verdict"]) <= {"agrees", "disagrees", "inconclusive"}


def test_runs_are_deterministic_and_paired_by_seed(scratch_file, tmp_path):
    """Two runs of one config and seed give the identical record; one seed gives every config one data order."""
    study = load_study(scratch_file)
    a = run_one(study, "last-1", 0, device="cpu", results=tmp_path / "a", allow_dirty=True)
    b = run_one(study, "last-1", 0, device="cpu", results=tmp_path / "b", allow_dirty=True)
    assert a["test_predictions"] == b["test_predictions"] and a["history"][-1]["train_loss"] == \
        b["history"][-1]["train_loss"]


def test_jobs_and_shards_split_the_work(scratch_file, tmp_path):
    study = load_study(scratch_file)
    everything = plan(study)
    shards = [plan(study, shard=(i, 3)) for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(everything) and all(shards)
    assert not set(shards[0]) & set(shards[1])
    assert parse_shard("1/4") == (1, 4)
    with pytest.raises(StudyError, match="use i/N"):
        parse_shard("x")
    with pytest.raises(StudyError, match="0 <= i < N"):
        plan(study, shard=(3, 3))
    results = tmp_path / "results"
    assert len(run_study(scratch_file, results=results, jobs=2, shard=(0, 2), allow_dirty=True)) == 3
    assert len(run_study(scratch_file, results=results, jobs=2, allow_dirty=True)) == 3  # the other shard


def test_dirty_tree_is_refused(scratch_file, tmp_path, monkeypatch):
    monkeypatch.setattr("workbench.train.provenance.git_commit", lambda: "abc+dirty")
    with pytest.raises(StudyError, match="clean commit"):
        run_study(scratch_file, results=tmp_path / "r")
    with pytest.raises(StudyError, match="clean commit"):
        run_one(load_study(scratch_file), "dense", 0, results=tmp_path / "r")


def test_an_edited_arm_is_not_silently_mixed_with_its_old_records(scratch_file, tmp_path):
    results = tmp_path / "results"
    run_study(scratch_file, results=results, only=["last-1"], seeds=[0], allow_dirty=True)
    study = yaml.safe_load(scratch_file.read_text())
    study["configs"]["last-1"]["top_k"] = 2
    scratch_file.write_text(yaml.safe_dump(study))
    with pytest.raises(StudyError, match="different definition of arm 'last-1'"):
        run_study(scratch_file, results=results, only=["last-1"], allow_dirty=True)


def _dense_base(tmp_path, depth=4):
    kw = {"moe_layers": "none", "depth": depth, **MICRO}
    dense = timm.create_model("vimoe_micro_patch7_28", **kw)
    save_model(dense, model_config("vimoe_micro_patch7_28", kw), tmp_path / "dense")
    return str(tmp_path / "dense")


def test_a_clean_start_allows_fp32_ties_among_pixels_not_one_image_in_ten_thousand():
    from workbench.studies.run import starts_clean

    assert starts_clean(0.839092, 0.839091, 7.4e-6)  # one pixel of 6.27 million flipped at a tie: rounding
    assert starts_clean(0.9018, 0.9018, 0.0)
    assert not starts_clean(0.9017, 0.9018, 0.0)  # one test image of 10,000 predicted otherwise
    assert not starts_clean(0.9018, 0.9018, 2e-3)  # logits moved
    assert not starts_clean(0.839080, 0.839091, 7.4e-6)  # 1.1e-5: more than rounding


def test_upcycle_protocol_records_a_clean_start_and_refuses_a_damaged_one(tmp_path):
    study = {"name": "up", "protocol": "upcycle", "base": _dense_base(tmp_path), "train": TRAIN, "seeds": [0],
             "common": {"num_experts": 4, "renormalize": "straight_through"},
             "configs": {"dense": {"moe_layers": "none"}, "all": {"moe_layers": "all"},
                         "all-top2": {"moe_layers": "all", "top_k": 2},
                         "shared-zero": {"moe_layers": "all", "shared_expert": "add", "shared_init": "zero"},
                         "fine": {"moe_layers": "all", "shared_expert": "add", "shared_init": "split",
                                  "shared_hidden": 64, "expert_hidden": 64},
                         "unnormalised": {"moe_layers": "all", "renormalize": False}},
             "analysis": {"routing": True, "random_routers": 5}}
    path = _write(tmp_path, "up", study)
    results = tmp_path / "results"
    run_study(path, results=results, only=["dense", "all", "all-top2", "shared-zero", "fine"], allow_dirty=True)
    base = json.loads((results / "up" / "_base.json").read_text())
    df = load_results(path, results=results)
    assert (df["step0_test_acc"] == base["test_acc"]).all() and len(df) == 5
    # a claim against an arm's own start (control: step0): the fine-tune's gain over the base, paired by seed
    study["claims"] = [{"id": "keeps", "says": "s", "treatment": "dense", "control": "step0", "expect": "no_less",
                        "margin": 0.2}]
    claims = evaluate_claims(_write(tmp_path, "up", study), results=results).iloc[0]
    final = load_record(path, "dense", 0, results)["test_acc"]
    assert claims["contrast"] == "dense vs step0" and claims["n"] == 1
    assert claims["estimate"] == pytest.approx((final - base["test_acc"]) * 100)
    with pytest.raises(StudyError, match="for paired claims of upcycle studies"):
        load_study(_write(tmp_path, "bad", {**study, "protocol": "scratch", "model": "vimoe_micro_patch7_28"}))
    with pytest.raises(StudyError, match="the study's control must be a config"):
        load_study(_write(tmp_path, "bad2", {**study, "control": "step0", "claims": []}))
    with pytest.raises(StudyError, match="does not start function-preserving"):
        run_study(path, results=results, only=["unnormalised"], allow_dirty=True)
    # every record names the exact base it started from
    assert base["sha256"] == base_fingerprint(study["base"])
    assert {load_record(path, c, 0, results)["base_sha256"] for c in ("dense", "all")} == {base["sha256"]}
    # an upcycled run records how far its router and experts moved from the copies it started as
    rec = load_record(path, "all", 0, results)
    assert set(rec["router_init"]) == set(rec["expert_spread"]) == {"0", "1", "2", "3"}
    assert all(v["router_shift"] > 0 for v in rec["router_init"].values())
    assert all(v > 0 for v in rec["expert_spread"].values())


@pytest.mark.gpu
def test_upcycle_study_on_cuda_starts_clean_and_analyses_there(tmp_path):
    """The gpu path of a study run: training, the clean-start check, the routing analysis and the all-subsets
    pruning all on the GPU (a model left on the CPU beside CUDA data, or the reverse, fails here)."""
    study = {"name": "upg", "protocol": "upcycle", "base": _dense_base(tmp_path), "train": TRAIN, "seeds": [0],
             "common": {"num_experts": 4, "renormalize": "straight_through"},
             "configs": {"dense": {"moe_layers": "none"}, "all": {"moe_layers": "all"},
                         "all-top2": {"moe_layers": "all", "top_k": 2},
                         "shared-zero": {"moe_layers": "all", "shared_expert": "add", "shared_init": "zero"}},
             "analysis": {"routing": True, "random_routers": 5, "prune_fraction": 0.5}}
    path = _write(tmp_path, "upg", study)
    results = tmp_path / "results"
    assert len(run_study(path, results=results, device="cuda", allow_dirty=True)) == 4
    df = load_results(path, results=results)
    assert (df["step0_test_acc"].notna()).all()
    for config in study["configs"]:
        rec = load_record(path, config, 0, results)
        assert rec["clean_start"] and rec["step0_test_acc"] == rec["base_test_acc_device"]
        assert rec["provenance"]["device"].startswith("cuda")
        assert len(rec["test_predictions"]) == 48
    rec = load_record(path, "all", 0, results)
    assert len(rec["pruning"]["subsets"]) == 1 + 6 and set(rec["routing"]) == {"0", "1", "2", "3"}


def test_a_changed_or_weak_base_is_refused(tmp_path):
    base = _dense_base(tmp_path)
    study = {"name": "up2", "protocol": "upcycle", "base": base, "train": TRAIN, "seeds": [0],
             "common": {"num_experts": 4, "renormalize": "straight_through"}, "configs": {"all": {"moe_layers": "all"}}}
    results = tmp_path / "results"
    first = base_accuracy(load_study(_write(tmp_path, "up2", study)), results)
    assert base_accuracy(load_study(_write(tmp_path, "up2", study)), results) == first  # cached, same base
    # a stricter bar than the base reaches is refused in one line that names the fix
    strict = load_study(_write(tmp_path, "strict", {**study, "base_min_test_acc": first["test_acc"] + 0.01}))
    with pytest.raises(StudyError, match="below the study's base_min_test_acc"):
        base_accuracy(strict, results)
    assert base_accuracy(load_study(_write(tmp_path, "ok", {**study, "base_min_test_acc": first["test_acc"]})),
                         results)["test_acc"] == first["test_acc"]
    # the base re-trained (other weights) under the same study: refused, so one study never mixes bases
    torch.manual_seed(1)
    other = timm.create_model("vimoe_micro_patch7_28", moe_layers="none", depth=4, **MICRO)
    save_model(other, model_config("vimoe_micro_patch7_28", {"moe_layers": "none", "depth": 4, **MICRO}),
               Path(base))
    with pytest.raises(StudyError, match="not the one its records started from"):
        base_accuracy(load_study(_write(tmp_path, "up2", study)), results)


def test_expert_spread_is_zero_for_copies_and_grows_when_experts_differ():
    dense = timm.create_model("vimoe_micro_patch7_28", moe_layers="none", **MICRO)
    up = workbench.upcycle(dense, "last-2", num_experts=4, top_k=1, renormalize=True)
    assert expert_spread(up) == {"2": 0.0, "3": 0.0}
    with torch.no_grad():
        up.blocks[3].mlp.w1[1] += 0.5 * up.blocks[3].mlp.w1[1].norm() / up.blocks[3].mlp.w1[1].numel() ** 0.5
    spread = expert_spread(up)
    assert spread["2"] == 0.0 and spread["3"] > 0.05


def test_analysis_records_random_router_test_and_every_pruning_subset(tmp_path):
    path = _write(tmp_path, "an", {
        "name": "an", "protocol": "scratch", "model": "vimoe_micro_patch7_28", "train": TRAIN, "seeds": [3],
        "common": {"num_experts": 4, **MICRO},
        "analysis": {"routing": True, "prune_fraction": 0.5, "random_routers": 30, "random_subsets": 7},
        "configs": {"dense": {"moe_layers": "none"}, "all": {"moe_layers": "all"},
                    "last-2": {"moe_layers": "last-2"}}})
    results = tmp_path / "results"
    run_study(path, results=results, allow_dirty=True)
    read = lambda name: json.loads((results / "an" / f"{name}__seed3.json").read_text())  # noqa: E731
    assert "routing" not in read("dense") and "pruning" not in read("dense")
    rec = read("all")
    assert sorted(rec["routing"], key=int) == ["0", "1", "2", "3"]
    layer = rec["routing"]["3"]
    assert len(layer["class_expert"]) == 10 and len(layer["class_expert"][0]) == 4
    assert sum(map(sum, layer["class_expert"])) == 64 * 16  # every patch of every validation image
    assert len(layer["position_expert"]) == 16
    assert 0 <= layer["nmi"] <= 1 and layer["recommend"] in ("keep", "densify")
    assert 0 < layer["p_random"] <= 1 and layer["p_holm"] >= layer["p_random"]
    p = rec["pruning"]
    assert p["count"] == 2 and len(p["subsets"]) == 1 + 6 and len(p["random_draws"]) == 7
    assert p["subsets"][0]["blocks"] == [] and p["subsets"][0]["test_acc"] == pytest.approx(rec["test_acc"], abs=1e-6)
    ranked = sorted(rec["routing"], key=lambda b: rec["routing"][b]["excess"])
    assert p["least_specialised"] == sorted(int(b) for b in ranked[:2])
    assert all(s["params"] < p["subsets"][0]["params"] for s in p["subsets"][1:])
    assert "routing" in read("last-2") and "pruning" not in read("last-2")  # fewer than prune_min_layers
    routing = load_routing(path, results=results)
    assert sorted(set(routing["config"])) == ["all", "last-2"] and len(routing) == 4 + 2
    assert routing_tables(path, "all", 3, results=results)[3] == layer["class_expert"]
    with pytest.raises(StudyError, match="no routing analysis"):
        routing_tables(path, "dense", 3, results=results)
    pr = load_pruning(path, results=results)
    row = pr.iloc[0]
    assert row["subsets"] == 6 and 1 <= row["least_rank"] <= 6
    assert min(s["test_acc"] for s in p["subsets"][1:]) <= row["all_mean_test"] <= max(
        s["test_acc"] for s in p["subsets"][1:])


def test_study_file_errors(tmp_path, scratch_file):
    bad = tmp_path / "bad.yaml"
    for text, message in [("name: x\nconfigs: {}\nbase: y\nsurprise: 1\n", "surprise"),
                          ("name: x\nconfigs: {a: {}}\nprotocol: scratch\n", "needs 'model'"),
                          ("name: x\nconfigs: {a: {}}\nprotocol: upcycle\n", "needs 'base'"),
                          ("name: x\nconfigs: {a: {}}\nbase: y\nprotocol: magic\n", "protocol='magic'"),
                          ("name: x\nconfigs: {a: {}}\nbase: y\nanalysis: {prune: 2}\n", "unknown analysis keys"),
                          ("name: x\nconfigs: {a: {}}\nbase: y\nanalysis: {prune_fraction: 1.5}\n", "prune_fraction"),
                          ("name: x\nconfigs: {a: {}}\nbase: y\nclaims: [{id: c, says: s, treatment: b, "
                           "expect: greater}]\n", "'b' is not a config"),
                          ("name: x\nconfigs: {a: {}}\nbase: y\nclaims: [{id: c, says: s, treatment: o/a, "
                           "expect: greater}]\n", "list it under 'references'"),
                          ("name: x\nconfigs: {a: {}}\nbase: y\nclaims: [{id: c, says: s, treatment: a, "
                           "expect: better}]\n", "expect='better'")]:
        bad.write_text(text)
        with pytest.raises(StudyError, match=message):
            load_study(bad)
    with pytest.raises(StudyError, match="does not exist"):
        load_study(tmp_path / "missing.yaml")
    with pytest.raises(StudyError, match="not in this study"):
        plan(load_study(scratch_file), only=["last-9"])


def test_study_run_errors_name_the_fix(tmp_path, scratch_file, monkeypatch):
    missing = _write(tmp_path, "nobase", {"name": "n", "protocol": "upcycle", "base": str(tmp_path / "no-such"),
                                          "configs": {"a": {}}})
    with pytest.raises(StudyError, match="does not exist; train it first"):
        run_study(missing, results=tmp_path / "r")
    study = yaml.safe_load(scratch_file.read_text())
    gpu = _write(tmp_path, "gpu", {**study, "profile": "gpu"})
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(StudyError, match="gpu-profile study and this machine has no CUDA GPU"):
        run_study(gpu, results=tmp_path / "r")
    with pytest.raises(StudyError, match="has no records yet"):
        contrasts(scratch_file, results=tmp_path / "empty")


def test_shipped_study_files_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    paths = sorted((root / "experiments" / "studies").rglob("*.yaml"))
    names = {}
    for path in paths:
        study = load_study(path)
        assert plan(study)
        if "pilots" in path.parts:  # a pilot sizes a budget; it states its rule in its description, decides nothing
            assert study["name"].startswith("pilot-") and not study["claims"] and "PILOT" in study["description"]
            continue
        assert len(study["seeds"]) >= 5, f"{path.name}: headline claims need at least 5 seeds"
        assert study["claims"], f"{path.name}: claims are stated before the runs"
        names.setdefault((study["profile"], study["protocol"]), set()).add(study["name"])
    assert names[("cpu", "scratch")] == {"scratch-placement", "scratch-shared-expert", "scratch-routing",
                                         "scratch-routers", "scratch-segmentation", "scratch-confirm",
                                         "scratch-confirm-all", "scratch-confirm-shared"}


def test_cli_says_plainly_what_is_missing(tmp_path, scratch_file, capsys):
    from workbench.cli import main

    assert main(["study", "summary", str(scratch_file)]) == 0
    assert "no runs recorded yet" in capsys.readouterr().out
    assert main(["study", "claims", str(scratch_file)]) == 0
    assert "no runs recorded yet, so no verdicts" in capsys.readouterr().out
    notes = tmp_path / "notes.md"
    notes.write_text("# a heading\nkey: [unclosed\n")
    with pytest.raises(StudyError, match="is not a study file"):
        load_study(notes)
    with pytest.raises(StudyError, match="--jobs 0 is invalid"):
        run_study(scratch_file, jobs=0, results=tmp_path / "r", allow_dirty=True)


def test_seeds_for_half_width_uses_the_t_quantile_of_the_new_sample_size():
    from scipy import stats as sps

    from workbench.studies.claims import seeds_for_half_width

    hw = sps.t.ppf(0.975, 15) / 4  # SD 1 with 16 seeds
    assert seeds_for_half_width(hw, 16, target=hw) == 16
    assert seeds_for_half_width(hw, 16, target=hw * 0.999) == 17
    # the pilot's five-seed intervals: the old n * (hw / 0.5)^2 kept t(4) and asked for 15, 17, 22 seeds
    assert [seeds_for_half_width(h, 5) for h in (0.854, 0.900, 1.035)] == [10, 11, 14]
    assert seeds_for_half_width(float("nan"), 5) is None


def test_an_untracked_file_makes_the_tree_dirty_but_new_records_do_not(tmp_path, monkeypatch):
    import subprocess

    from workbench.train import provenance

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    assert not provenance.git_commit().endswith("+dirty")
    (tmp_path / "experiments" / "results" / "s").mkdir(parents=True)
    (tmp_path / "experiments" / "results" / "s" / "dense__seed0.json").write_text("{}")
    assert not provenance.git_commit().endswith("+dirty")  # a study's own records, being written
    (tmp_path / "new_module.py").write_text("y = 2\n")
    assert provenance.git_commit().endswith("+dirty")


def test_router_at_init_rebuilds_the_trainers_start(tmp_path):
    """The init router that the upcycled run's routing is compared with is the one the trainer started from."""
    from workbench.data.classification import build_splits
    from workbench.moe import moe_modules
    from workbench.studies.run import train_config as _train_config
    from workbench.analysis.movement import router_at_init
    from workbench.train.trainer import Trainer

    study = {"name": "ri", "protocol": "upcycle", "base": _dense_base(tmp_path), "train": TRAIN, "seeds": [2],
             "common": {"num_experts": 4, "renormalize": "straight_through"}, "configs": {"all": {"moe_layers": "all"}}}
    study = load_study(_write(tmp_path, "ri", study))
    cfg = _train_config(study, "all", 2, tmp_path / "run", "cpu", True)
    start = Trainer(cfg).model
    _, val, _ = build_splits(cfg.dataset, val_size=cfg.val_size, train_subset=cfg.train_subset, model=start,
                             augment=False, test_subset=cfg.test_subset)
    at_start = router_at_init(start, cfg, val, max_images=64)  # the model at step 0 *is* its init
    assert set(at_start) == {"0", "1", "2", "3"}
    assert all(v["router_shift"] == 0.0 and v["init_nmi"] == v["trained_nmi"] for v in at_start.values())
    moved = start
    with torch.no_grad():
        moe_modules(moved)[3].router.weight.mul_(-1)
    after = router_at_init(moved, cfg, val, max_images=64)
    assert after["3"]["router_shift"] == pytest.approx(2.0) and after["0"]["router_shift"] == 0.0
    # segmentation's inputs: patches with no label (-1: every pixel ignored) are left out of both NMIs, whatever
    # they route to; without the mask they would count as a class of their own (or index out of range)
    import dataclasses
    from workbench.analysis.specialisation import router_inputs
    inputs = router_inputs(moved, val, max_images=64)
    gen = torch.Generator().manual_seed(0)
    padded = {b: dataclasses.replace(i, x=torch.cat([i.x, 50 * torch.randn(40, i.x.shape[1], generator=gen)]),
                                     labels=torch.cat([i.labels, torch.full((40,), -1, dtype=i.labels.dtype)]),
                                     positions=None if i.positions is None else torch.cat([i.positions, i.positions[:40]]))
              for b, i in inputs.items()}
    assert router_at_init(moved, cfg, val, inputs=padded) == router_at_init(moved, cfg, val, inputs=inputs)
    zeros = torch.zeros(40, dtype=torch.long)
    relabelled = {b: dataclasses.replace(i, labels=torch.cat([inputs[b].labels, zeros.to(i.labels.dtype)]))
                  for b, i in padded.items()}  # the same patches labelled: now they count
    assert router_at_init(moved, cfg, val, inputs=relabelled) != router_at_init(moved, cfg, val, inputs=inputs)


def test_expert_pruning_analysis_records_each_method_and_random_draws(tmp_path):
    path = _write(tmp_path, "ep", {
        "name": "ep", "protocol": "scratch", "model": "vimoe_micro_patch7_28", "train": TRAIN, "seeds": [5],
        "common": {"num_experts": 4, **MICRO},
        "analysis": {"expert_pruning": {"keep": [2, 3], "random_draws": 2, "configs": ["all"],
                                        "calibration_images": 32}},
        "configs": {"dense": {"moe_layers": "none"}, "all": {"moe_layers": "all"},
                    "last-1": {"moe_layers": "last-1"}}})
    results = tmp_path / "results"
    run_study(path, results=results, allow_dirty=True)
    read = lambda name: json.loads((results / "ep" / f"{name}__seed5.json").read_text())  # noqa: E731
    assert "expert_pruning" not in read("last-1") and "expert_pruning" not in read("dense")  # only the listed arm
    ep = read("all")["expert_pruning"]
    assert ep["unpruned"]["test_acc"] == pytest.approx(read("all")["test_acc"], abs=1e-6)
    assert set(ep) == {"unpruned", "2", "3"}
    assert set(ep["2"]) == {"frequency", "reap", "merge", "cluster", "random"}
    assert len(ep["2"]["random"]["draws"]) == 2
    assert ep["2"]["random"]["test_acc"] == pytest.approx(sum(ep["2"]["random"]["draws"]) / 2, abs=1e-6)
    assert ep["2"]["frequency"]["params"] < ep["3"]["frequency"]["params"] < ep["unpruned"]["params"]
    assert ep["2"]["merge"]["gmacs"] == pytest.approx(ep["unpruned"]["gmacs"], rel=0.02)  # top-1: FLOPs kept
    from workbench.studies.pruning import expert_pruning_table

    table = expert_pruning_table(load_study(path), "all", results=results)
    assert set(table["method"]) == {"frequency", "reap", "merge", "cluster", "random"}
    row = table[(table["keep"] == 2) & (table["method"] == "random")].iloc[0]
    assert row["test_acc"] == pytest.approx(100 * ep["2"]["random"]["test_acc"])
    assert row["vs_random"] == "-"  # the baseline itself


def test_expert_pruning_fine_tunes_each_method_beside_the_unpruned_model_and_an_experts_claim_reads_it(tmp_path):
    path = _write(tmp_path, "eft", {
        "name": "eft", "protocol": "scratch", "model": "vimoe_micro_patch7_28", "train": TRAIN, "seeds": [5, 6],
        "common": {"num_experts": 4, **MICRO},
        "analysis": {"expert_pruning": {"keep": [3, 2], "methods": ["frequency", "reap"], "random_draws": 2,
                                        "calibration_images": 32,
                                        "finetune": {"epochs": 1, "lr": 1.0e-3, "train_images": 48, "keep": [2]}}},
        "configs": {"dense": {"moe_layers": "none"}, "all": {"moe_layers": "all"}},
        "claims": [{"id": "reap-beats-random", "says": "s", "kind": "experts", "treatment": "all", "keep": 2,
                    "compare": ["reap", "random"], "expect": "greater"},
                   {"id": "reap-ft-keeps", "says": "s", "kind": "experts", "treatment": "all", "keep": 2,
                    "compare": ["reap_ft", "unpruned_ft"], "expect": "no_less", "margin": 0.5}]})
    results = tmp_path / "results"
    run_study(path, results=results, allow_dirty=True)
    recs = [json.loads((results / "eft" / f"all__seed{s}.json").read_text()) for s in (5, 6)]
    ep = recs[0]["expert_pruning"]
    assert ep["finetune"] == {"epochs": 1, "lr": 1.0e-3, "min_lr": 1.0e-4, "train_images": 48, "keep": [2]}
    assert set(ep["2"]) == {"frequency", "frequency_ft", "reap", "reap_ft", "random", "random_ft"}
    assert set(ep["3"]) == {"frequency", "reap", "random"}  # fine-tuned only at the counts listed
    assert ep["unpruned_ft"]["params"] == ep["unpruned"]["params"]
    assert ep["2"]["reap_ft"]["params"] == ep["2"]["reap"]["params"] < ep["unpruned"]["params"]
    assert ep["2"]["reap_ft"] != ep["2"]["reap"] and ep["unpruned_ft"] != ep["unpruned"]  # the fine-tune moved them
    assert not any(tmp_path.rglob("experts"))  # the fine-tunes went with the run folder once recorded
    table = evaluate_claims(path, results=results).set_index("id")
    diff = [100 * (r["expert_pruning"]["2"]["reap"]["test_acc"] - r["expert_pruning"]["2"]["random"]["test_acc"])
            for r in recs]
    assert table.loc["reap-beats-random", "n"] == 2
    assert table.loc["reap-beats-random", "estimate"] == pytest.approx(sum(diff) / 2)
    assert table.loc["reap-ft-keeps", "n"] == 2 and "reap_ft vs unpruned_ft" in table.loc["reap-ft-keeps", "contrast"]
    from workbench.studies.pruning import expert_pruning_table

    view = expert_pruning_table(load_study(path), "all", results=results)
    view = view[view["keep"] == 2].set_index("method")
    assert list(view.index) == ["frequency", "frequency_ft", "reap", "reap_ft", "random", "random_ft"]
    assert view.loc["random_ft", "vs_random"] == "-" and view.loc["reap_ft", "vs_random"] != "-"


@pytest.mark.parametrize("claim, message", [
    ({"keep": 3, "compare": ["reap", "random"]}, "keep=3 is not among analysis.expert_pruning.keep [2]"),
    ({"keep": 2, "compare": ["merge", "random"]}, "compare names ['merge'], which analysis.expert_pruning does"),
    ({"keep": 2, "compare": ["reap_ft", "random_ft"]}, "has no finetune block"),
    ({"keep": 2, "compare": ["reap", "reap"]}, "an experts claim reads one arm's expert_pruning analysis"),
    ({"compare": ["reap", "random"]}, "an experts claim reads one arm's expert_pruning analysis"),
])
def test_a_bad_experts_claim_is_refused_in_one_line(tmp_path, claim, message):
    path = _write(tmp_path, "ecb", {
        "name": "ecb", "protocol": "scratch", "model": "vimoe_micro_patch7_28", "train": TRAIN, "seeds": [5],
        "common": {"num_experts": 4, **MICRO},
        "analysis": {"expert_pruning": {"keep": [2], "methods": ["frequency", "reap"]}},
        "configs": {"dense": {"moe_layers": "none"}, "all": {"moe_layers": "all"}},
        "claims": [{"id": "c", "says": "s", "kind": "experts", "treatment": "all", "expect": "greater", **claim}]})
    with pytest.raises(StudyError) as err:
        load_study(path)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("block, message", [
    ({"keep": [2], "finetune": {"epochs": 0, "lr": 1e-4}}, "analysis.expert_pruning.finetune="),
    ({"keep": [2], "finetune": {"epochs": 1}}, "analysis.expert_pruning.finetune="),
    ({"keep": [2], "finetune": {"epochs": 1, "lr": 1e-4, "keep": [3]}}, "analysis.expert_pruning.finetune="),
    ({"keep": [4]}, "keep [4] is invalid for arm 'all' (4 experts, top-1)"),
    ({"keep": [2], "methods": ["prune-everything"]}, "methods=['prune-everything'] is invalid"),
    ({"keep": [2], "configs": ["dense"]}, "configs names ['dense'], not MoE arms"),
    ({"keep": "2"}, "keep='2' is invalid"),
    ({"kept": [2]}, "analysis.expert_pruning must be a mapping with keep"),
])
def test_a_bad_expert_pruning_block_is_refused_in_one_line(tmp_path, block, message):
    path = _write(tmp_path, "epb", {
        "name": "epb", "protocol": "scratch", "model": "vimoe_micro_patch7_28", "train": TRAIN, "seeds": [5],
        "common": {"num_experts": 4, **MICRO}, "analysis": {"expert_pruning": block},
        "configs": {"dense": {"moe_layers": "none"}, "all": {"moe_layers": "all"}}})
    with pytest.raises(StudyError) as err:
        load_study(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_expert_pruning_on_a_segmentation_study_records_miou_and_claims_read_it(tmp_path):
    """A segmentation arm gets the same expert-level analysis as a classifier, scored by mIoU beside pixel accuracy,
    and an ``experts`` claim of a study whose metric is test_miou reads mIoU (in points), not pixel accuracy."""
    import timm

    from workbench.train.checkpoint import model_config, save_model

    kw = {"moe_layers": "none", "head": "linear", **MICRO}
    save_model(timm.create_model("vimoe_seg_micro_patch7_56", **kw), model_config("vimoe_seg_micro_patch7_56", kw),
               tmp_path / "base")
    path = _write(tmp_path, "segep", {
        "name": "segep", "protocol": "upcycle", "metric": "test_miou", "base": str(tmp_path / "base"),
        "train": {"dataset": "fmnist-scenes", "data_options": {"train_size": 64}, "val_size": 24, "test_subset": 16,
                  "epochs": 1, "batch_size": 16, "lr": 1.0e-3},
        "seeds": [5, 6], "control": "dense", "common": {"renormalize": "straight_through"},
        "analysis": {"regions": True, "random_routers": 2, "max_images": 8,
                     "expert_pruning": {"keep": [2], "methods": ["frequency", "reap"], "random_draws": 2,
                                        "calibration_images": 8,
                                        "finetune": {"epochs": 1, "lr": 1.0e-3, "train_images": 16}}},
        "configs": {"dense": {"moe_layers": "none"}, "all": {"moe_layers": "all", "num_experts": 4, "top_k": 2}},
        "claims": [{"id": "reap-beats-random", "says": "s", "kind": "experts", "treatment": "all", "keep": 2,
                    "compare": ["reap", "random"], "expect": "greater"}]})
    results = tmp_path / "results"
    run_study(path, results=results, allow_dirty=True)
    recs = [json.loads((results / "segep" / f"all__seed{s}.json").read_text()) for s in (5, 6)]
    assert "expert_pruning" not in json.loads((results / "segep" / "dense__seed5.json").read_text())
    ep = recs[0]["expert_pruning"]
    assert ep["unpruned"]["test_miou"] == pytest.approx(recs[0]["test_miou"], abs=1e-6)  # the trained model's score
    assert set(ep["2"]) == {"frequency", "frequency_ft", "reap", "reap_ft", "random", "random_ft"}
    for cell in (ep["2"]["reap"], ep["2"]["reap_ft"], ep["unpruned_ft"]):
        assert {"val_acc", "test_acc", "val_miou", "test_miou", "test_iou"} <= set(cell)
    assert ep["unpruned"]["test_iou"] == recs[0]["test_iou"]  # per class, as the run scored it
    rnd = ep["2"]["random"]
    assert rnd["test_miou"] == pytest.approx(sum(rnd["draws_miou"]) / 2, abs=1e-6)
    assert ep["2"]["reap"]["params"] < ep["unpruned"]["params"]
    table = evaluate_claims(path, results=results).set_index("id")
    diff = [100 * (r["expert_pruning"]["2"]["reap"]["test_miou"] - r["expert_pruning"]["2"]["random"]["test_miou"])
            for r in recs]
    assert table.loc["reap-beats-random", "n"] == 2
    assert table.loc["reap-beats-random", "estimate"] == pytest.approx(sum(diff) / 2)
    acc = [100 * (r["expert_pruning"]["2"]["reap"]["test_acc"] - r["expert_pruning"]["2"]["random"]["test_acc"])
           for r in recs]
    assert sum(acc) != pytest.approx(sum(diff))  # pixel accuracy would read differently
    from workbench.studies.pruning import expert_pruning_table

    view = expert_pruning_table(load_study(path), "all", results=results).set_index("method")
    assert "test_miou" in view.columns and "test_acc" not in view.columns
    from workbench import viz

    fig = viz.expert_pruning(view.reset_index(), unpruned=100 * ep["unpruned"]["test_miou"])
    assert fig.layout.yaxis.title.text.startswith("test mIoU")
    from workbench.studies.pruning import compare_expert_claims

    with pytest.raises(ValueError, match="unlike units"):
        compare_expert_claims(load_study(path), {**load_study(path), "name": "cls", "metric": "test_acc"},
                              results=results)
    assert view.loc["reap", "test_miou"] == pytest.approx(sum(100 * r["expert_pruning"]["2"]["reap"]["test_miou"]
                                                              for r in recs) / 2)
    from workbench.studies.pruning import expert_claims_by, expert_class_iou

    classes = expert_class_iou(load_study(path), "all", 2, results=results).set_index("variant")
    assert {"unpruned", "unpruned_ft", "reap", "reap_ft", "frequency", "random_ft"} <= set(classes.index)
    assert "random" not in classes.index  # its draws are averaged: no per-class IoU
    assert classes.loc["reap", "test_miou"] == pytest.approx(view.loc["reap", "test_miou"])
    iou = recs[0]["expert_pruning"]["2"]["reap"]["test_iou"]
    assert all(v is None or 0 <= v <= 1 for v in iou) and len(iou) == 11
    assert classes.loc["reap", "background_iou"] == pytest.approx(
        sum(100 * r["expert_pruning"]["2"]["reap"]["test_iou"][0] for r in recs) / 2)
    by_acc = expert_claims_by(load_study(path), "test_acc", control="dense", results=results).set_index("claim")
    est = float(by_acc.loc["reap-beats-random", "test_acc"].split()[0])
    assert est == pytest.approx(sum(acc) / 2, abs=0.006)  # printed to two decimals
    dense = {s: 100 * json.loads((results / "segep" / f"dense__seed{s}.json").read_text())["test_acc"] for s in (5, 6)}
    vs_dense = [100 * r["expert_pruning"]["2"]["reap"]["test_acc"] - dense[r["seed"]] for r in recs]
    assert float(by_acc.loc["reap-beats-random", "first - dense"].split()[0]) == pytest.approx(sum(vs_dense) / 2,
                                                                                               abs=0.006)
