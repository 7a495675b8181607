"""Pruning a ViMoE: experts kept by frequency or saliency, merged (M-SMoE) or clustered (HC-SMoE), layers made
dense; the result is an ordinary checkpoint; bad requests get one line."""
import json

import pytest
import timm
import torch

import workbench  # noqa: F401
from workbench.analysis.prune import PruneError, calibrate, expert_groups, prune
from workbench.cli import main
from workbench.data.classification import TensorData, synthetic
from workbench.moe import moe_modules
from workbench.train.checkpoint import load_model, model_config, save_model

KW = {"embed_dim": 32, "num_heads": 2, "depth": 4}


def _data(n=64, seed=1):
    return TensorData(*synthetic(n, seed=seed), (0.5,), (0.25,), 10)


def _moe(**kw):
    torch.manual_seed(0)
    kwargs = {**KW, "moe_layers": "last-2", "num_experts": 4, "top_k": 1, **kw}
    return timm.create_model("vimoe_micro_patch7_28", **kwargs).eval(), model_config("vimoe_micro_patch7_28", kwargs)


def test_frequency_keeps_the_most_used_experts_exactly():
    model, config = _moe()
    calib = calibrate(model, _data(), max_images=64)
    pruned, new = prune(model, config, "frequency", keep=2, calib=calib)
    assert new["model_kwargs"]["num_experts"] == 2 and new["pruned"]["method"] == "frequency"
    for block, layer in moe_modules(pruned).items():
        if not isinstance(block, int):
            continue
        kept = sorted(torch.argsort(calib[block]["load"], descending=True, stable=True)[:2].tolist())
        old = moe_modules(model)[block]
        assert layer.num_experts == 2 and [g[0] for g in new["pruned"]["groups"][str(block)]] == kept
        assert torch.equal(layer.w1, old.w1[kept]) and torch.equal(layer.router.weight, old.router.weight[kept])


def test_reap_keeps_the_expert_whose_routed_output_is_largest():
    model, config = _moe()
    layer = moe_modules(model)[3]
    calib = calibrate(model, _data(), max_images=64)
    used = int(torch.argmax(calib[3]["load"]))
    quiet = [e for e in range(4) if calib[3]["load"][e] > 0 and e != used]
    assert quiet, "needs two experts in use"
    with torch.no_grad():
        layer.w2[quiet[0]] *= 50  # its routed tokens now get a far larger output
    calib = calibrate(model, _data(), max_images=64)
    assert [quiet[0]] in expert_groups("reap", calib[3], 1)
    assert expert_groups("frequency", calib[3], 1) == [[used]]


@pytest.mark.parametrize("method", ["merge", "cluster", "frequency", "reap"])
def test_pruning_copies_of_one_ffn_keeps_the_function(method):
    """Upcycled experts are copies: any choice or merge of them computes the same FFN (gates sum to 1)."""
    torch.manual_seed(0)
    dense = timm.create_model("vimoe_micro_patch7_28", moe_layers="none", **KW).eval()
    moe = workbench.upcycle(dense, moe_layers="last-2", num_experts=4, top_k=1, renormalize=True).eval()
    config = model_config("vimoe_micro_patch7_28", {**KW, "moe_layers": "last-2", "num_experts": 4, "top_k": 1,
                                                     "renormalize": True})
    x = _data(8).batches(8, shuffle=False).__next__()[0]
    pruned, new = prune(moe, config, method, keep=2, calib=calibrate(moe, _data(), max_images=64))
    assert sum(len(g) for g in new["pruned"]["groups"]["3"]) == (4 if method in ("merge", "cluster") else 2)
    with torch.no_grad():
        assert torch.allclose(pruned(x), dense(x), atol=1e-5)


def test_densify_makes_layers_dense_and_the_result_rebuilds(tmp_path):
    model, config = _moe()
    from workbench.analysis.routing import collect_routing

    pruned, new = prune(model, config, "densify", layers=[2], calib={"_stats": collect_routing(model, _data())})
    assert new["model_kwargs"]["moe_layers"] == [3] and sorted(k for k in moe_modules(pruned) if isinstance(k, int)) == [3]
    save_model(pruned, {k: new[k] for k in ("model", "model_kwargs", "upcycle")}, tmp_path / "m", {"pruned": new["pruned"]})
    again, cfg = load_model(tmp_path / "m")
    x = _data(4).batches(4, shuffle=False).__next__()[0]
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x)) and cfg["pruned"]["layers"] == [2]


def test_bad_requests_name_the_fix():
    model, config = _moe()
    calib = calibrate(model, _data(), max_images=16)
    with pytest.raises(PruneError, match="top_k \\(1\\) <= M < the 4 experts"):
        prune(model, config, "frequency", keep=4, calib=calib)
    with pytest.raises(PruneError, match="not MoE blocks"):
        prune(model, config, "densify", layers=[0])
    with pytest.raises(PruneError, match="needs --keep-experts"):
        prune(model, config, "reap", calib=calib)
    dense, dense_config = _moe(moe_layers="none")
    with pytest.raises(PruneError, match="no MoE layers"):
        prune(dense, dense_config, "frequency", keep=2, calib={})
    shared, shared_config = _moe(shared_expert="add")
    with pytest.raises(PruneError, match="shared expert"):
        prune(shared, shared_config, "densify", layers=[3])
    top2, top2_config = _moe(top_k=2)
    with pytest.raises(PruneError, match="top_k \\(2\\)"):
        prune(top2, top2_config, "frequency", keep=1, calib=calibrate(top2, _data(), max_images=16))


def test_prune_command_writes_a_loadable_model_and_prints_before_and_after(tmp_path, capsys):
    model, config = _moe(shared_expert="add")
    save_model(model, config, tmp_path / "ck")
    args = ["prune", "--checkpoint", str(tmp_path / "ck"), "--dataset", "synthetic", "--val-size", "64",
            "--calibration-images", "64", "--test-subset", "32", "--output", str(tmp_path / "out")]
    assert main(args + ["--method", "merge", "--keep-experts", "2", "--json", "--val-subset", "48"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)  # a checkpoint trained with no held-out split: its val acc is on seen images
    assert "was not trained with --val-size 64 held out" in captured.err
    assert [r["model"] for r in out["rows"]] == ["before", "pruned"]
    assert out["rows"][1]["params"] < out["rows"][0]["params"] and out["pruned"]["calibration"] == "val"
    pruned, cfg = load_model(tmp_path / "out")
    assert cfg["model_kwargs"]["num_experts"] == 2 and cfg["pruned"]["from_experts"] == 4
    assert main(["eval", "--checkpoint", str(tmp_path / "out"), "--dataset", "synthetic", "--quiet"]) == 0
    capsys.readouterr()
    for bad, message in ((["--method", "frequency", "--keep-experts", "2"], "already holds a model that another"),
                         (["--method", "merge", "--keep-experts", "3"], "already holds a model that another")):
        with pytest.raises(SystemExit) as exit_:  # another request into a folder that holds a model: refused
            main(args + bad)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([*args[:-1], str(tmp_path / "ck"), "--method", "merge", "--keep-experts", "2", "--overwrite"])
    assert exit_.value.code == 2 and "is the checkpoint being pruned" in capsys.readouterr().err
    assert main(args + ["--method", "merge", "--keep-experts", "2", "--json", "--val-subset", "48"]) == 0  # the same
    capsys.readouterr()
    assert main(["info", "--checkpoint", str(tmp_path / "out")]) == 0
    info = capsys.readouterr().out
    assert f"pruned by merge (4 -> 2 experts per MoE layer) from {tmp_path / 'ck'}, not fine-tuned" in info
    assert "python -m workbench profile --checkpoint" in info
    assert main(args + ["--method", "frequency", "--keep-experts", "2", "--finetune-epochs", "1",
                        "--train-subset", "256", "--overwrite"]) == 0
    text = capsys.readouterr().out
    assert "fine-tuned" in text and "params" in text
    assert load_model(tmp_path / "out")[1]["pruned"]["finetune"]["epochs"] == 1
    tuned = load_model(tmp_path / "out")[0].state_dict()
    begun = json.loads((tmp_path / "out" / "finetune" / "start.json").read_text())
    assert begun["pruned"]["method"] == "frequency" and begun["finetune"] == {"epochs": 1, "lr": 1e-4, "min_lr": 1e-5}
    assert main(args + ["--method", "frequency", "--keep-experts", "2", "--finetune-epochs", "1",
                        "--train-subset", "256"]) == 0  # the same command again: the finished fine-tune is reused
    capsys.readouterr()
    again = load_model(tmp_path / "out")[0].state_dict()
    assert all(torch.equal(tuned[k], again[k]) for k in tuned)
    for bad, message in ((["--method", "frequency", "--keep-experts", "9"], "--keep-experts 9 is invalid"),
                         (["--method", "densify", "--layers", "3"], "shared expert"),
                         (["--method", "densify", "--keep-experts", "2"], "densify takes --layers"),
                         (["--method", "frequency", "--keep-experts", "2", "--val-subset", "0"], "--val-subset >= 1")):
        with pytest.raises(SystemExit) as exit_:
            main(args + bad)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    save_model(model, {**config, "train_config": {"val_size": 64}, "metrics": {"test_acc": 0.123}}, tmp_path / "held-out")
    assert main([*args[:2], str(tmp_path / "held-out"), *args[3:-1], str(tmp_path / "out2"), "--method", "frequency",
                 "--keep-experts", "2", "--json"]) == 0
    captured = capsys.readouterr()
    assert "not trained with" not in captured.err
    # the pruned model keeps its lineage (the data its source held out) and its own scores, not the source's
    written = load_model(tmp_path / "out2")[1]
    final = json.loads(captured.out)["rows"][-1]
    assert written["train_config"] == {"val_size": 64}
    assert written["metrics"] == {"test_acc": final["test_acc"], "val_acc": final["val_acc"], "test_n": 32}
    from workbench.analysis.card import _chosen_on, facts
    card = facts(load_model(tmp_path / "out2")[0], written)
    assert card["trained_with_val_size"] == 64 and card["accuracy"]["test_acc"] == final["test_acc"]
    assert _chosen_on(card["pruned"], 2000) == {"chosen_on": 64, "pruned_by": "frequency"}
    assert _chosen_on({"method": "densify", "layers": [3]}, 500) == {"chosen_on": 500, "pruned_by": "densify"}
    assert _chosen_on({"method": "reinit", "layers": [3]}, 500) == {} and _chosen_on(None, 500) == {}


def test_prune_refuses_a_bad_request_before_reading_any_data(tmp_path, capsys):
    model, config = _moe(shared_expert="add")
    save_model(model, config, tmp_path / "ck")
    base = ["prune", "--checkpoint", str(tmp_path / "ck"), "--dataset", "no-such-dataset", "--output", str(tmp_path / "o")]
    for bad, message in ((["--method", "densify", "--layers", "3"], "shared expert"),
                         (["--method", "reap"], "needs --keep-experts"),
                         (["--method", "frequency", "--keep-experts", "4"], "--keep-experts 4 is invalid")):
        with pytest.raises(SystemExit) as exit_:
            main(base + bad)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and "no-such-dataset" not in err


def test_random_baseline_draws_keep_experts_reproducibly():
    from workbench.analysis.prune import expert_groups

    calib = {"load": torch.tensor([5.0, 1.0, 3.0, 0.0, 2.0, 4.0])}
    draws = {tuple(map(tuple, expert_groups("random", calib, 3, seed=s))) for s in range(20)}
    assert all(len(d) == 3 and list(d) == sorted(d) and all(len(g) == 1 for g in d) for d in draws)
    assert expert_groups("random", calib, 3, seed=7) == expert_groups("random", calib, 3, seed=7)
    assert len(draws) > 5  # the seed matters: not always the same experts


def test_reinit_replaces_the_chosen_layers_with_fresh_dense_ffns_and_keeps_the_rest(tmp_path, capsys):
    """The control for "densify, then fine-tune": the chosen MoE blocks become dense FFNs of timm's init (seeded:
    the same seed, the same weights; another seed, others), every other weight as trained, and a shared expert is
    no obstacle (nothing is merged)."""
    model, config = _moe(shared_expert="add")
    a, a_config = prune(model, config, "reinit", layers=[3], seed=1)
    b, _ = prune(model, config, "reinit", layers=[3], seed=1)
    c, _ = prune(model, config, "reinit", layers=[3], seed=2)
    assert a_config["model_kwargs"]["moe_layers"] == [2] and a_config["pruned"] == {"method": "reinit",
                                                                                  "layers": [3], "seed": 1}
    trained = model.state_dict()
    for name, value in a.state_dict().items():
        if name.startswith("blocks.3.mlp."):
            assert torch.equal(value, b.state_dict()[name])  # biases start at zero; weights follow the seed
            assert name.endswith("bias") or not torch.equal(value, c.state_dict()[name])
        else:
            assert torch.equal(value, trained[name]), name
    assert not hasattr(a.blocks[3].mlp, "router") and hasattr(a.blocks[2].mlp, "router")
    save_model(model, config, tmp_path / "ck")
    args = ["prune", "--checkpoint", str(tmp_path / "ck"), "--dataset", "synthetic", "--val-size", "64",
            "--test-subset", "32", "--output", str(tmp_path / "out"), "--method", "reinit", "--layers", "2,3",
            "--seed", "1", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"][1]["params"] < out["rows"][0]["params"] and out["pruned"]["method"] == "reinit"
    assert load_model(tmp_path / "out")[1]["model_kwargs"]["moe_layers"] == "none"
    for bad, message in ((["--keep-experts", "2"], "reinit takes --layers"), (["--layers", "1"], "not MoE blocks")):
        with pytest.raises(SystemExit) as exit_:
            main([a for a in args if a not in ("--layers", "2,3")] + bad)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_prune_command_on_a_segmentation_checkpoint_reads_its_own_data_and_scores_miou(tmp_path, capsys):
    """A segmentation checkpoint is pruned on the scenes it was trained on (dataset, data options and validation
    size from its train config) and scored by mIoU beside pixel accuracy; a classification --dataset is refused in
    one line, as is a scenes dataset for a classifier."""
    import timm

    from workbench.train.checkpoint import model_config

    kw = {"moe_layers": "last-1", "num_experts": 4, "top_k": 1, "head": "linear", "embed_dim": 32, "num_heads": 2}
    seg = timm.create_model("vimoe_seg_micro_patch7_56", **kw)
    save_model(seg, {**model_config("vimoe_seg_micro_patch7_56", kw),
                     "train_config": {"dataset": "fmnist-scenes", "data_options": {"train_size": 64}, "val_size": 24}},
               tmp_path / "seg")
    args = ["prune", "--checkpoint", str(tmp_path / "seg"), "--method", "reap", "--keep-experts", "2",
            "--calibration-images", "16", "--test-subset", "16", "--output", str(tmp_path / "out")]
    assert main(args + ["--json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)["rows"]
    assert "not trained with" not in captured.err  # its own validation size was used
    assert all({"val_acc", "test_acc", "val_miou", "test_miou"} <= set(r) for r in rows)
    assert rows[1]["params"] < rows[0]["params"]
    assert load_model(tmp_path / "out")[1]["model_kwargs"]["num_experts"] == 2
    assert main(args) == 0
    assert "test mIoU" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(args + ["--dataset", "synthetic"])
    assert exit_.value.code == 2 and "segmentation model and --dataset synthetic" in capsys.readouterr().err
    model, config = _moe()
    save_model(model, config, tmp_path / "cls")
    with pytest.raises(SystemExit) as exit_:
        main(["prune", "--checkpoint", str(tmp_path / "cls"), "--method", "reap", "--keep-experts", "2",
              "--dataset", "fmnist-scenes", "--output", str(tmp_path / "out3")])
    assert exit_.value.code == 2 and "is a segmentation dataset and the checkpoint is a classifier" in \
        capsys.readouterr().err
