"""Experts-choose routing and Soft MoE: the formulas against direct, slow references (outputs and gradients),
capacity and unchosen-token accounting, routing capture, FLOPs by hand, and the argument checks."""
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import workbench  # noqa: F401  (registers the models)
from workbench.analysis import flops
from workbench.moe import MoEMlp
from workbench.moe import experts_choose as ec
from workbench.analysis.routing import run_with_routing


def _ffn(layer, e, x):
    return F.gelu(x @ layer.w1[e] + layer.b1[e]) @ layer.w2[e] + layer.b2[e]


def reference_experts_choose(layer, x, group="image"):
    """Token by token, expert by expert: y_t = sum_{e chose t} p_te FFN_e(x_t)."""
    batch, tokens, dim = x.shape
    units = x.reshape(-1, dim)
    probs = (units @ layer.router.weight.t()).softmax(-1)
    groups = [list(range(b * tokens, (b + 1) * tokens)) for b in range(batch)] if group == "image" \
        else [list(range(batch * tokens))]
    y = torch.zeros(batch * tokens, layer.out_features)
    chosen = torch.zeros(batch * tokens, layer.num_experts, dtype=torch.bool)
    for members in groups:
        cap = min(len(members), max(1, math.floor(layer.capacity_factor * len(members) / layer.num_experts + 0.5)))
        for e in range(layer.num_experts):
            col = probs[members, e]
            for j in col.topk(cap).indices.tolist():
                t = members[j]
                y[t] = y[t] + probs[t, e] * _ffn(layer, e, units[t])
                chosen[t, e] = True
    return y.view(batch, tokens, -1), chosen


def reference_soft(layer, x):
    """Soft MoE image by image, slot by slot, from the paper's equations."""
    E, S = layer.num_experts, layer.slots_per_expert
    out = []
    for img in x:
        logits = img @ layer.router.weight.t()  # (N, E*S)
        dispatch, combine = logits.softmax(0), logits.softmax(1)
        slots = torch.stack([_ffn(layer, s // S, dispatch[:, s] @ img) for s in range(E * S)])
        out.append(combine @ slots)
    return torch.stack(out)


def _layer(**kw):
    torch.manual_seed(0)
    layer = MoEMlp(16, 32, num_experts=4, **kw)
    with torch.no_grad():  # larger router weights: distinct probabilities, so top-C has no ties
        layer.router.weight.normal_(0, 1.0)
        layer.b1.normal_(0, 0.1)
        layer.b2.normal_(0, 0.1)
    return layer


def _grads(layer, x, fn):
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    fn(x).square().sum().backward()
    return [x.grad] + [p.grad.clone() for p in (layer.router.weight, layer.w1, layer.b1, layer.w2, layer.b2)]


@pytest.mark.parametrize("group,cf", [("image", 1.0), ("image", 2.0), ("batch", 1.0), ("image", 0.5)])
def test_experts_choose_matches_reference(group, cf):
    layer = _layer(router="experts_choose", capacity_factor=cf, choice_group=group)
    x = torch.randn(3, 10, 16)
    want, chosen = reference_experts_choose(layer, x, group)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    got_g = _grads(layer, x, layer)
    want_g = _grads(layer, x, lambda t: reference_experts_choose(layer, t, group)[0])
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert float(layer.last_drop_rate) == pytest.approx(float(1 - chosen.any(-1).float().mean()))


def test_experts_choose_capacity_and_unchosen_tokens():
    assert ec.capacity(17, 8, 1.0) == 2 and ec.capacity(17, 8, 2.0) == 4 and ec.capacity(10, 4, 1.0) == 3
    assert ec.capacity(3, 8, 1.0) == 1 and ec.capacity(4, 2, 8.0) == 4  # at least 1, at most N
    layer = _layer(router="experts_choose", capacity_factor=1.0)
    layer.capture_routing = True
    x = torch.randn(2, 10, 16)
    layer(x)
    cap = ec.capacity(10, 4, 1.0)
    assert layer.last_load.tolist() == [2.0 * cap] * 4  # every expert takes exactly C tokens per image
    r = layer.last_routing
    kept = r["keep"].sum()
    assert int(kept) == 2 * 4 * cap  # E*C assignments per image, counted once each
    unchosen = ~r["keep"].any(-1)
    assert float(layer.last_drop_rate) == pytest.approx(float(unchosen.float().mean()))
    assert unchosen.any(), "with C*E = 12 slots over 10 tokens and peaked routers some token is left out"
    # the first stored expert is a chosen one with the largest gate wherever the token was chosen
    first_gate = r["gates"][:, 0]
    assert torch.equal(first_gate, r["gates"].max(-1).values)
    assert torch.all(r["keep"][:, 0] == ~unchosen)


@pytest.mark.parametrize("slots", [1, 3])
def test_soft_moe_matches_reference(slots):
    layer = _layer(router="soft", slots_per_expert=slots)
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(layer(x), reference_soft(layer, x), rtol=1e-5, atol=1e-5)
    got_g = _grads(layer, x, layer)
    want_g = _grads(layer, x, lambda t: reference_soft(layer, t))
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert float(layer.last_drop_rate) == 0.0
    assert layer.last_load.tolist() == [2.0 * slots] * 4


def test_soft_moe_normalised_logits_and_capture():
    layer = _layer(router="soft", slots_per_expert=2, soft_normalize=True)
    x = torch.randn(2, 7, 16)
    logits = layer.router(x.reshape(-1, 16))
    want = F.normalize(x.reshape(-1, 16), dim=-1) @ F.normalize(layer.router.weight, dim=-1).t()
    torch.testing.assert_close(logits, want)
    layer(x).sum().backward()
    assert layer.router.scale.grad is not None and layer.router.scale.grad.abs() > 0
    layer.capture_routing = True
    layer(x)
    r = layer.last_routing
    combine = logits.softmax(-1).view(-1, 4, 2).sum(-1)
    torch.testing.assert_close(r["probs"], combine)
    assert torch.equal(r["experts"][:, 0], combine.argmax(-1))  # the dominant expert
    torch.testing.assert_close(r["gates"].sum(-1), torch.ones(14))
    assert r["keep"].all()


def test_router_argument_checks():
    for kw, words in [(dict(router="nope"), "router='nope'"),
                      (dict(router="soft", top_k=2), "top_k applies to router='topk'"),
                      (dict(router="experts_choose", top_k=2), "capacity_factor sets"),
                      (dict(router="soft", routing="image"), "routing='token'"),
                      (dict(router="experts_choose", dispatch="loop"), "dispatch applies"),
                      (dict(router="soft", capacity_factor=1.0), "slots_per_expert"),
                      (dict(router="soft", renormalize=True), "sum to 1"),
                      (dict(router="topk", slots_per_expert=2), "router='soft' only"),
                      (dict(router="topk", choice_group="batch"), "router='experts_choose' only"),
                      (dict(router="soft", load_weight=0.1), "no balance losses")]:
        with pytest.raises(ValueError) as err:
            MoEMlp(8, 16, num_experts=4, **kw)
        assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kw", [dict(router="experts_choose", capacity_factor=2.0),
                                dict(router="soft", slots_per_expert=2, shared_expert="add")])
def test_vimoe_with_router_trains_captures_and_counts_flops(kw):
    torch.manual_seed(0)
    model = timm.create_model("vimoe_micro_patch7_28", moe_layers="last-2", num_experts=8, **kw)
    x = torch.randn(3, 1, 28, 28)
    out = model(x)
    out.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "blocks.3.mlp" in n)
    logits, cache = run_with_routing(model, x)
    torch.testing.assert_close(logits, model.eval()(x))
    assert sorted(cache) == [2, 3] and cache[3].experts.shape == (3, 4, 4, 8)  # every expert, dominant first
    prof = flops.profile(model)
    # by hand, per image: 17 tokens, d = 64, h = 256, E = 8
    d, h, E, N = 64, 256, 8, 17
    if kw["router"] == "experts_choose":
        C = 4  # round(2 * 17 / 8)
        moe = N * d * E + E * C * 2 * d * h
    else:
        S = 2
        moe = N * d * E * S + 2 * N * E * S * d + E * S * 2 * d * h + N * 2 * d * h  # router, mix, slots, shared
    dense_ffn = N * 2 * d * h
    assert prof.macs - prof.dense_macs == pytest.approx(2 * (moe - dense_ffn))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert prof.macs == flops.analytic_macs(model) + len(norms) * N * d * 5


def test_meta_device_and_checkpoint_config():
    with torch.device("meta"):
        model = timm.create_model("vimoe_micro_patch7_28", moe_layers="all", router="soft", slots_per_expert=2)
        assert model(torch.empty(2, 1, 28, 28)).shape == (2, 10)
    layer = _layer(router="experts_choose", choice_group="batch", capacity_factor=1.5)
    again = MoEMlp(16, 32, **layer.config())
    assert again.config() == layer.config()


@pytest.mark.parametrize("kw", [dict(router="experts_choose", capacity_factor=0.5),
                                dict(router="soft", slots_per_expert=2)])
def test_explorer_shows_experts_choose_and_soft_checkpoints(tmp_path, kw):
    import numpy as np

    from workbench.train.checkpoint import model_config, save_model
    from workbench.explorer import Explorer, example_images
    from workbench.viz.palette import SHARED_COLOR, expert_rgb_array, hex_rgb

    torch.manual_seed(0)
    args = dict(moe_layers="last-2", num_experts=4, **kw)
    model = timm.create_model("vimoe_micro_patch7_28", **args)
    save_model(model, model_config("vimoe_micro_patch7_28", args), tmp_path / "m")
    a = Explorer().analyse(example_images()[0], tmp_path / "m")
    assert a.layers == [2, 3] and a.experts[3].shape == (4, 4)
    overlay = a.overlay(3)
    assert overlay.shape[:2] == (4 * 32, 4 * 32)
    load = a.load()[3]
    if kw["router"] == "soft":  # every patch has a dominant expert; combine weights per expert are the 'probs'
        assert (a.experts[3] >= 0).all() and load.sum() == pytest.approx(1.0)
        assert a.probs[3].sum(-1) == pytest.approx(np.ones((4, 4)), abs=1e-5)
    else:  # capacity 0.5: C = round(0.5 * 17 / 4) = 2 per expert, 8 of 17 slots: some patches left out, drawn grey
        left_out = a.experts[3] < 0
        assert left_out.any() and load.sum() == pytest.approx(1 - left_out.mean())
        grey = np.array(hex_rgb(SHARED_COLOR)) / 255
        assert np.allclose(expert_rgb_array(np.array([-1]))[0], grey)
    import app  # the page's main request: the legend names the grey 'no expert' only when a patch was left out

    legend = app.analyse(example_images()[0], str(tmp_path / "m"), None, False)[7]
    assert ("no expert" in legend) == (kw["router"] == "experts_choose")


@pytest.mark.parametrize("flags", [["--router", "soft", "--slots-per-expert", "2"],
                                   ["--router", "experts_choose", "--capacity-factor", "2"]])
def test_cli_trains_resumes_and_evaluates_other_routers(tmp_path, capsys, flags):
    from workbench.cli import main

    out = tmp_path / "run"
    data = ["--dataset", "synthetic", "--train-subset", "128", "--test-subset", "64"]
    tiny = ["--model", "vimoe_micro_patch7_28", "--moe-layers", "all", "--num-experts", "4", *flags]
    assert main(["train", *data, *tiny, "--epochs", "1", "--batch-size", "32", "--output", str(out),
                 "--quiet"]) == 0
    assert main(["train", "--resume", "--output", str(out), "--epochs", "2", "--quiet"]) == 0
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["model_kwargs"]["router"] == flags[1]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--json", "--dataset", "synthetic", "--test-subset", "64"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 64 and set(result["moe"]) == {"0", "1", "2", "3"}
    with pytest.raises(SystemExit) as bad:
        main(["train", "--router", "soft", "--top-k", "2", "--output", str(tmp_path / "bad"), *data])
    assert bad.value.code == 2
    assert "top_k applies to router='topk'" in capsys.readouterr().err


def test_batch_groups_are_counted_at_their_batch_and_image_groups_are_batch_independent():
    torch.manual_seed(0)
    batch = timm.create_model("vimoe_micro_patch7_28", moe_layers="all", router="experts_choose",
                              choice_group="batch").eval()
    # at batch 1 a per-batch group is one image: C = round(17 / 8) = 2, 16 passes; at batch 128, 17 per image
    assert flops.profile(batch, batch=128).macs == flops.analytic_macs(batch) + 9 * 17 * 64 * 5
    assert flops.profile(batch, batch=1).macs < flops.profile(batch, batch=128).macs
    image = timm.create_model("vimoe_micro_patch7_28", moe_layers="all", router="experts_choose").eval()
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(image(x)[:2], image(x[:2]), rtol=0, atol=1e-6)  # per image: batch-independent
        assert (batch(x)[:2] - batch(x[:2])).abs().max() > 1e-4  # per batch: the other images matter


@pytest.mark.parametrize("renormalize", [True, "straight_through"])
def test_experts_choose_renormalised_gates_match_reference(renormalize):
    layer = _layer(router="experts_choose", capacity_factor=2.0, renormalize=renormalize)
    x = torch.randn(2, 10, 16)
    want, chosen = reference_experts_choose(layer, x)
    probs = (x.reshape(-1, 16) @ layer.router.weight.t()).softmax(-1)
    total = (probs * chosen).sum(-1, keepdim=True)  # each token's gates over the experts that took it
    ffn = torch.stack([torch.stack([_ffn(layer, e, t) for e in range(4)]) for t in x.reshape(-1, 16)])
    want = ((probs * chosen / total.clamp(min=1e-12)).unsqueeze(-1) * ffn).sum(1).view(2, 10, -1)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
