"""Densify, then fine-tune (``analysis.densify_finetune``): the record, the claim kind that reads it, bad blocks."""
import json

import pytest
import yaml

from workbench.studies.claims import evaluate_claims
from workbench.studies.records import load_refit
from workbench.studies.refit import _dense_in, choose
from workbench.studies.runner import run_study
from workbench.studies.spec import StudyError, load_study

TRAIN = {"dataset": "synthetic", "train_subset": 96, "val_size": 64, "test_subset": 48, "epochs": 1,
         "batch_size": 32}
MICRO = {"embed_dim": 32, "num_heads": 2}
REFIT = {"count": 2, "epochs": 1, "lr": 1.0e-3}


def _study(tmp_path, name, analysis=None, claims=None, configs=None):
    study = {"name": name, "protocol": "scratch", "model": "vimoe_micro_patch7_28", "train": TRAIN, "seeds": [5, 6],
             "common": {"num_experts": 4, **MICRO},
             "analysis": analysis if analysis is not None else {"cls_routing": True, "random_routers": 4,
                                                                "max_images": 32, "densify_finetune": REFIT},
             "configs": configs or {"dense": {"moe_layers": "none"}, "all": {"moe_layers": "all"}},
             "claims": claims or []}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_choose_takes_the_two_ends_of_one_order():
    assert choose({0: 0.1, 1: 0.3, 2: -0.2, 3: 0.5}, 2) == ([0, 2], [1, 3])
    assert choose({0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}, 2) == ([0, 1], [2, 3])  # ties never make the two overlap
    with pytest.raises(StudyError, match="count=4 needs fewer blocks"):
        choose({0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}, 4)


def test_densify_finetune_records_every_variant_and_its_claim_reads_them(tmp_path):
    claims = [{"id": "merge-ft-keeps", "says": "merge + fine-tune keeps the fine-tuned MoE's accuracy",
               "kind": "refit", "treatment": "all", "compare": ["merge_ft", "unpruned_ft"], "expect": "no_less",
               "margin": 0.5}]
    path = _study(tmp_path, "rf", claims=claims)
    results = tmp_path / "results"
    run_study(path, results=results, allow_dirty=True)
    read = lambda c, s: json.loads((results / "rf" / f"{c}__seed{s}.json").read_text())  # noqa: E731
    assert "densify_finetune" not in read("dense", 5)
    rec = read("all", 5)
    d = rec["densify_finetune"]
    assert d["least"] == sorted(d["least"]) and len(d["least"]) == 2 and not set(d["least"]) & set(d["most"])
    assert set(d["scores"]) == set(rec["routing_cls"])  # ranked by the CLS routing the record holds
    v = d["variants"]
    assert v["unpruned"]["test_acc"] == pytest.approx(rec["test_acc"], abs=1e-6)  # the trained model itself
    assert set(v) == {x for s in ("unpruned", "merge", "most_merge", "all_merge", "remove", "reinit")
                      for x in (s, s + "_ft")}  # scratch: no base to restore
    assert v["merge"]["params"] == v["reinit"]["params"] == v["most_merge"]["params"] < v["unpruned"]["params"]
    assert v["remove"]["params"] == v["merge"]["params"] and v["all_merge"]["params"] < v["merge"]["params"]
    assert d["specialised"] == sorted(int(b) for b, r in rec["routing_cls"].items() if r["specialised"])
    assert v["merge_ft"]["params"] == v["merge"]["params"]  # the fine-tune keeps the architecture
    assert v["merge"]["gmacs"] <= v["unpruned"]["gmacs"]
    assert d["finetune"] == {"epochs": 1, "lr": 1.0e-3, "min_lr": 1.0e-4}
    assert not any(tmp_path.rglob("refit"))  # the fine-tunes went with the run folder once recorded

    table = load_refit(load_study(path), ["all"], results=results)
    assert sorted(table["seed"]) == [5, 6]
    row = evaluate_claims(load_study(path), results=results).iloc[0]
    expected = (100 * (table["merge_ft_test"] - table["unpruned_ft_test"])).mean()
    assert row["kind"] == "refit" and row["n"] == 2 and row["estimate"] == pytest.approx(expected)
    assert row["contrast"] == "all: merge_ft vs unpruned_ft"
    from workbench.studies.pruning import refit_table

    view = refit_table(load_study(path), "all", results=results).set_index("variant")
    assert set(view.index) == set(v)
    assert view.loc["merge_ft", "test_acc"] == pytest.approx(100 * table["merge_ft_test"].mean())
    assert view.loc["unpruned_ft", "vs_control"] == "-" and view.loc["merge", "vs_control"].startswith(("+", "-"))


def test_the_fine_tune_repeats_exactly(tmp_path):
    """Two studies with the same definition record the same variants (deterministic CPU training)."""
    records = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        path = _study(tmp_path / name, "rf")
        run_study(path, results=tmp_path / name / "results", only=["all"], seeds=[5], allow_dirty=True)
        records.append(json.loads((tmp_path / name / "results" / "rf" / "all__seed5.json").read_text()))
    assert records[0]["densify_finetune"] == records[1]["densify_finetune"]


def test_restore_puts_the_base_ffn_back_and_remove_zeroes_it(tmp_path):
    import timm
    import torch

    import workbench  # noqa: F401  (registers the models)
    from workbench.train.checkpoint import model_config, save_model

    kwargs = {"embed_dim": 32, "num_heads": 2}
    dense_config = model_config("vimoe_micro_patch7_28", {**kwargs, "moe_layers": "none"})
    base = timm.create_model("vimoe_micro_patch7_28", **kwargs, moe_layers="none")
    save_model(base, dense_config, tmp_path / "base")
    config = model_config("vimoe_micro_patch7_28", {**kwargs, "moe_layers": "all", "num_experts": 4})
    moe = timm.create_model("vimoe_micro_patch7_28", **kwargs, moe_layers="all", num_experts=4).eval()
    restored, new_config = _dense_in(moe, config, [1, 2], "restore", 0, base=tmp_path / "base")
    assert new_config["model_kwargs"]["moe_layers"] == [0, 3] and new_config["pruned"]["method"] == "restore"
    state, source, trained = restored.state_dict(), base.state_dict(), moe.state_dict()
    assert all(torch.equal(state[k], source[k]) for k in state if k.startswith(("blocks.1.mlp.", "blocks.2.mlp.")))
    assert all(torch.equal(state[k], trained[k]) for k in state if not k.startswith(("blocks.1.mlp.", "blocks.2.mlp.")))
    removed, _ = _dense_in(moe, config, [1], "remove", 0)
    assert all(not v.any() for k, v in removed.state_dict().items() if k.startswith("blocks.1.mlp."))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():  # a zeroed FFN adds nothing: block 1 is its attention alone
        h = removed.blocks[0](removed._pos_embed(removed.patch_embed(x)))
        b = removed.blocks[1]
        alone = h + b.ls1(b.attn(b.norm1(h)))
        assert torch.allclose(b(h), alone, atol=1e-6)


@pytest.mark.parametrize("block, analysis, message", [
    ({"count": 2, "epochs": 1}, {"cls_routing": True}, "densify_finetune must be a mapping with count"),
    ({**REFIT, "count": 0}, {"cls_routing": True}, "count=0 is invalid"),
    ({**REFIT, "lr": 1e-3, "min_lr": 1e-2}, {"cls_routing": True}, "0 <= min_lr <= lr"),
    (REFIT, {"routing": True}, "set analysis.cls_routing: true"),
    ({**REFIT, "tokens": "patch"}, {"cls_routing": True}, "set analysis.routing: true"),
    ({**REFIT, "rank_by": "nmi"}, {"cls_routing": True}, "rank_by='nmi' is invalid"),
    ({**REFIT, "configs": ["dense"]}, {"cls_routing": True}, "configs names ['dense'], not MoE arms"),
    ({**REFIT, "configs": ["shared"]}, {"cls_routing": True}, "have a shared expert"),
    ({**REFIT, "configs": ["all"], "starts": ["restore"]}, {"cls_routing": True}, "a scratch run has no base"),
    ({**REFIT, "configs": ["all"], "starts": ["prune"]}, {"cls_routing": True}, "starts=['prune'] is invalid"),
])
def test_a_bad_densify_finetune_block_is_refused_in_one_line(tmp_path, block, analysis, message):
    configs = {"dense": {"moe_layers": "none"}, "all": {"moe_layers": "all"},
               "shared": {"moe_layers": "all", "shared_expert": "add"}}
    path = _study(tmp_path, "rfb", analysis={**analysis, "densify_finetune": block}, configs=configs)
    with pytest.raises(StudyError) as err:
        load_study(path)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("compare", [["merge_ft"], ["merge_ft", "merge_ft"], ["merge_ft", "pruned"], "merge_ft"])
def test_a_refit_claim_names_two_known_variants(tmp_path, compare):
    claims = [{"id": "c", "says": "s", "kind": "refit", "treatment": "all", "compare": compare, "expect": "greater"}]
    with pytest.raises(StudyError) as err:
        load_study(_study(tmp_path, "rfc", claims=claims))
    assert "compare: [a, b]" in str(err.value) and "\n" not in str(err.value)


def test_a_refit_claim_reads_only_recorded_variants(tmp_path):
    claims = [{"id": "c", "says": "s", "kind": "refit", "treatment": "all", "compare": ["restore_ft", "unpruned_ft"],
               "expect": "greater"}]
    with pytest.raises(StudyError, match="does not record"):
        load_study(_study(tmp_path, "rfd", claims=claims))


def test_a_check_is_evaluated_on_another_studys_records(tmp_path):
    """The run rule of a file that runs only if an arm another study recorded passes its check."""
    from workbench.studies.checks import check_on

    path = _study(tmp_path, "rfk")
    results = tmp_path / "results"
    run_study(path, results=results, only=["all"], seeds=[5], allow_dirty=True)
    other = yaml.safe_load(path.read_text())
    other.update(name="rfk2", references=["rfk"], control="rfk/dense", configs={"all": {"moe_layers": "all"}},
                 checks=[{"id": "premise", "says": "s", "metric": "specialised_blocks_cls", "at_least": 1}])
    (tmp_path / "rfk2.yaml").write_text(yaml.safe_dump(other, sort_keys=False))
    table = check_on(tmp_path / "rfk2.yaml", "premise", "rfk/all", results=results)
    record = json.loads((results / "rfk" / "all__seed5.json").read_text())
    expected = sum(r["specialised"] for r in record["routing_cls"].values())
    assert table["seed"].tolist() == [5] and table["value"].tolist() == [expected]
    assert table.attrs["passed"] == (expected >= 1) and table.attrs["rule"] == ">= 1"
    with pytest.raises(ValueError, match="no check 'nothing'"):
        check_on(tmp_path / "rfk2.yaml", "nothing", "rfk/all", results=results)
