import json
import sys
import types
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import workbench
from workbench.train import checkpoint as ckpt
from workbench.analysis.flops import profile
from workbench.moe import moe_modules
from workbench.analysis.routing import run_with_routing
from workbench.models.segmentation import SegViMoE
from workbench.train.metrics import confusion_matrix, evaluate_segmentation, segmentation_scores
from workbench.train.config import TrainConfig
from workbench.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(img_size=28, depth=2, embed_dim=32, num_heads=2)  # 4x4 patch grid with the micro's 7x7 patches


# -- a tiny, fast stand-in for workbench.segdata (its SegTensorData / build_seg_splits interface), with ignored
# pixels and absent classes on purpose; test_real_fmnist_scenes runs the real one --------------------------------
class FakeScenes:
    """Squares whose brightness is their class (1-4) on a dark background; a square's outline is ignore_index."""

    def __init__(self, n, seed, size=28):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.zeros(n, 1, size, size)
        self.y = torch.zeros(n, size, size, dtype=torch.long)
        for i in range(n):
            for _ in range(2):
                c = int(torch.randint(1, 5, (1,), generator=g))
                s = int(torch.randint(8, 14, (1,), generator=g))
                r, q = (int(v) for v in torch.randint(0, size - s, (2,), generator=g))
                self.x[i, 0, r:r + s, q:q + s] = c / 4
                self.y[i, r:r + s, q:q + s] = 255
                self.y[i, r + 1:r + s - 1, q + 1:q + s - 1] = c
        self.x = (self.x - 0.2) / 0.3 + 0.05 * torch.randn(self.x.shape, generator=g)
        self.num_classes, self.ignore_index = 11, 255
        self.class_names = ("background",) + tuple(f"square {c}" for c in range(1, 11))

    def __len__(self):
        return len(self.y)

    def to(self, device):
        self.x, self.y = self.x.to(device), self.y.to(device)
        return self

    def subset(self, n, seed=0):
        if n is not None and n < len(self):
            keep = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
            self.x, self.y = self.x[keep], self.y[keep]
        return self

    def num_batches(self, batch_size, world=1, drop_last=False):
        share = len(self) // world if drop_last else -(-len(self) // world)
        return share // batch_size if drop_last else -(-share // batch_size)

    def batches(self, batch_size, *, seed=0, epoch=0, shuffle=True, start=0, rank=0, world=1, drop_last=False):
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed * 1000 + epoch)) \
            if shuffle else torch.arange(len(self))
        order = order[rank::world]
        for i in range(start, self.num_batches(batch_size, world, drop_last)):
            idx = order[i * batch_size:(i + 1) * batch_size]
            yield self.x[idx], self.y[idx]


def fake_build_seg_splits(name, *, val_size=0, root=None, model=None, train_subset=None, test_subset=None,
                          augment=True, seed=0, **options):
    if name not in ("fmnist-scenes", "ade"):
        raise ValueError(f"dataset={name!r} is not known")
    size = model.pretrained_cfg["input_size"][-1] if model is not None else 28
    val = FakeScenes(val_size, 3, size) if val_size else None
    return FakeScenes(train_subset or 256, 1, size), val, FakeScenes(test_subset or 64, 2, size)


@pytest.fixture
def fake_segdata(monkeypatch):
    module = types.ModuleType("workbench.data.scenes")
    module.SEG_DATASETS, module.build_seg_splits = ("fmnist-scenes", "ade"), fake_build_seg_splits
    module.check_data_options = lambda name, options: None
    monkeypatch.setitem(sys.modules, "workbench.data.scenes", module)
    return module


def _seg(head="linear", **kw):
    return timm.create_model("vimoe_seg_micro_patch7_56", head=head, **{**SMALL, **kw})


# -- the model ----------------------------------------------------------------------------------------------------
def test_registered_with_timm_and_looks_like_a_vimoe():
    for name in workbench.SEG_MODEL_NAMES:
        model = timm.create_model(name)
        cfg = model.pretrained_cfg
        assert (cfg["num_classes"], tuple(cfg["input_size"])) == (11, (1, 56, 56)) and len(cfg["label_names"]) == 11
        assert cfg["label_names"][0] == "background" and cfg["mean"] == (0.2860,)
        assert isinstance(model, VisionTransformer) and model.task == "segmentation" and model.num_classes == 11
        assert model.moe_layer_indices == [len(model.blocks) - 2, len(model.blocks) - 1]
        assert set(moe_modules(model)) == set(model.moe_layer_indices)
    assert timm.create_model("vimoe_seg_micro_patch7_56").patch_embed.grid_size == (8, 8)
    assert getattr(timm.create_model("vimoe_micro_patch7_28"), "task", "classification") == "classification"


@pytest.mark.parametrize("head", ["linear", "progressive"])
@pytest.mark.parametrize("moe", [dict(moe_layers="none"), dict(moe_layers="last-2", num_experts=4),
                                 dict(moe_layers="all", num_experts=4, top_k=2, shared_expert="add"),
                                 dict(moe_layers=[0], num_experts=4, routing="image"),
                                 dict(moe_layers="every-2", num_experts=4, capacity_factor=1.0)])
def test_output_shape(head, moe):
    model = _seg(head, **moe)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 11, 28, 28)
    assert model.eval()(torch.randn(1, 1, 28, 28)).shape == (1, 11, 28, 28)


def test_full_size_models_output_shape():
    x = torch.randn(2, 1, 56, 56)
    assert timm.create_model("vimoe_seg_micro_patch7_56")(x).shape == (2, 11, 56, 56)
    tiny = timm.create_model("vimoe_seg_tiny_patch4_56", depth=2, moe_layers="last-1", num_classes=5)
    assert tiny.head_blocks == [0, 1] and tiny(x).shape == (2, 5, 56, 56)
    probe = _seg("linear", head_blocks=[-2, -1])  # DINOv2's multi-layer linear probe: blocks concatenated
    assert probe.seg_head.classifier.in_channels == 64 and probe(torch.randn(2, 1, 28, 28)).shape == (2, 11, 28, 28)
    assert _seg("progressive", depth=1, moe_layers="none").head_blocks == [0]


@pytest.mark.parametrize("head", ["linear", "progressive"])
def test_gradients_reach_router_experts_and_head(head):
    model = _seg(head, moe_layers="last-1", num_experts=4, top_k=2)
    y = torch.randint(0, 11, (4, 28, 28))
    torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), y).backward()
    layer = moe_modules(model)[1]
    for p in (layer.router.weight, layer.w1, layer.w2, model.seg_head.classifier.weight, model.patch_embed.proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(head="mlp"), "head='mlp' is not a known segmentation head"),
    (dict(head="progressive", head_blocks=[0, 9]), "head_blocks=[0, 9] is invalid"),
    (dict(head="progressive", head_blocks=[1, -1]), "head_blocks=[1, -1] is invalid"),  # the same block twice
    (dict(head="progressive", head_blocks=[]), "head_blocks=[] is invalid"),
    (dict(head="progressive", head_blocks=[True]), "head_blocks=[True] is invalid"),
    (dict(head="linear", head_blocks=[0]), "leaves out the last block \\(1\\).*depth=1"),
    (dict(up_stages=7), "up_stages=7 is invalid"),
    (dict(num_classes=0), "num_classes=0 is invalid"),
    (dict(decoder_dim=0), "decoder_dim=0 is invalid"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        _seg(**kwargs)
    assert "\n" not in str(err.value)


def test_upcycling_a_dense_seg_model_preserves_its_function():
    dense = _seg("progressive", moe_layers="none").eval()
    for module in dense.modules():  # non-trivial BN statistics, so the head's eval path matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2)
    moe = workbench.upcycle(dense, "all", num_experts=4, top_k=1, renormalize=True).eval()
    assert isinstance(moe, SegViMoE) and moe.moe_layer_indices == [0, 1] and dense.moe_layer_indices == []
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-5)


def test_routing_capture_gives_expert_maps_on_the_patch_grid():
    model = timm.create_model("vimoe_seg_micro_patch7_56", moe_layers="last-2", num_experts=4, top_k=2)
    logits, cache = run_with_routing(model, torch.randn(2, 1, 56, 56))
    assert logits.shape == (2, 11, 56, 56) and cache.layers() == [2, 3]
    for routing in cache.values():
        assert routing.experts.shape == (2, 8, 8, 2) and routing.probs.shape == (2, 8, 8, 4)
        assert routing.prefix_experts.shape == (2, 1, 2) and routing.top1().max() < 4


def test_flops_profile_counts_backbone_experts_and_head():
    model = _seg("progressive", moe_layers="last-1", num_experts=4, top_k=2)
    prof = profile(model, torch.zeros(1, 1, 28, 28))
    assert list(prof.blocks["kind"]) == ["dense", "moe"] and prof.params == sum(p.numel() for p in model.parameters())
    head_macs = prof.macs - prof.blocks["macs"].sum()
    convs = 8 * 8 * 9 * 64 * 32 + 16 * 16 * 9 * 32 * 16  # the decoder's 3x3 convs at 8x8 and 16x16
    assert convs < head_macs < 1.2 * convs  # + patch embed, 1x1 convs, norms
    assert prof.macs > prof.dense_macs  # top-2 of 4 experts: twice the dense FFN work in block 1


def test_checkpoint_rebuilds_the_seg_model(tmp_path):
    model = _seg("progressive", moe_layers="last-1", num_experts=4, shared_expert="add").eval()
    config = ckpt.model_config("vimoe_seg_micro_patch7_56", {"head": "progressive", "moe_layers": "last-1",
                                                             "num_experts": 4, "shared_expert": "add", **SMALL})
    ckpt.save_model(model, config, tmp_path / "m")
    loaded, _ = ckpt.load_model(tmp_path / "m", task="segmentation")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    with pytest.raises(ckpt.CheckpointError, match="holds a segmentation model .* but a classification model"):
        ckpt.load_model(tmp_path / "m", task="classification")


# -- metrics ------------------------------------------------------------------------------------------------------
def test_confusion_matrix_and_scores_exact():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 1]])
    conf = confusion_matrix(pred, target, num_classes=5, ignore_index=255)
    expected = torch.zeros(5, 5, dtype=torch.long)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 2], expected[2, 0] = 1, 1, 2, 1, 1
    assert torch.equal(conf, expected)  # the two ignored pixels (predicted 3 and 1) are not counted
    s = segmentation_scores(conf)
    # class 0: TP 1, FP 1 (a 2 predicted 0), FN 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 1/2
    # class 3 is predicted only on an ignored pixel and class 4 never occurs: both absent, left out of the mean
    assert s["iou"] == [round(1 / 3, 6), round(2 / 3, 6), 0.5, None, None]
    assert s["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert s["pixel_acc"] == pytest.approx(4 / 6)
    # a class only in the prediction counts (IoU 0) and pulls the mean down
    s2 = segmentation_scores(confusion_matrix(torch.tensor([3, 1]), torch.tensor([1, 1]), 5))
    assert s2["iou"] == [None, 0.5, None, 0.0, None] and s2["miou"] == pytest.approx(0.25)
    # logits are accepted too (argmax over dim 1)
    logits = torch.nn.functional.one_hot(pred.clamp(max=4), 5).permute(2, 0, 1).unsqueeze(0).float()
    assert torch.equal(confusion_matrix(logits, target.unsqueeze(0), 5), expected)


def test_evaluate_accumulates_over_the_whole_set():
    model = _seg(moe_layers="last-1", num_experts=4)
    data = FakeScenes(20, 5)
    whole = evaluate_segmentation(model, data, batch_size=20)
    pieces = evaluate_segmentation(model, data, batch_size=3)  # 7 uneven batches
    assert whole["confusion"] == pieces["confusion"] and whole["miou"] == pieces["miou"]
    assert whole["loss"] == pytest.approx(pieces["loss"], rel=1e-6)
    assert whole["n"] == 20 and whole["pixels"] == int((data.y != 255).sum()) == sum(map(sum, whole["confusion"]))
    assert whole["acc"] == whole["pixel_acc"] and len(whole["iou"]) == 11 and set(whole["moe"]) == {"1"}
    with pytest.raises(ValueError, match="not a segmentation model"):
        evaluate_segmentation(timm.create_model("vimoe_micro_patch7_28"), data)


# -- training -----------------------------------------------------------------------------------------------------
def _cfg(tmp_path, **kw):
    base = dict(dataset="fmnist-scenes", model="vimoe_seg_micro_patch7_56", train_subset=192, test_subset=48,
                epochs=3, batch_size=32, lr=5e-3, warmup_epochs=0.5, label_smoothing=0.0,
                output=str(tmp_path / "run"), quiet=True,
                model_kwargs=dict(SMALL, moe_layers="last-1", num_experts=4, top_k=2, head="progressive",
                                  decoder_dim=32))
    base.update(kw)
    return TrainConfig(**base)


def _strip_timing(history):
    return [{k: v for k, v in row.items() if k not in ("img_per_s", "wall_time")} for row in history]


def test_training_improves_miou_and_resumes_exactly(tmp_path, fake_segdata, crash_training):
    full = train(_cfg(tmp_path, output=str(tmp_path / "full"), eval_at_start=True))
    h = full["history"]
    assert h[-1]["test_miou"] > full["step0"]["test_miou"] + 0.1 and h[-1]["train_loss"] < h[0]["train_loss"]
    assert h[-1]["test_acc"] == h[-1]["test_pixel_acc"] and len(h[-1]["test_iou"]) == 11
    assert h[-1]["test_iou"][5] is None  # no square of class 5 anywhere: absent, not a zero
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1]["test_miou"] == h[-1]["test_miou"]
    assert set(rows[-1]["moe_train"]) == {"1"} and rows[-1]["img_per_s"] > 0

    with crash_training(9):  # killed after epoch 1 (6 steps per epoch), in the middle of epoch 2
        train(_cfg(tmp_path, output=str(tmp_path / "part"), eval_at_start=True))
    assert ckpt.read_checkpoint(tmp_path / "part" / "checkpoint.pt")["epoch"] == 1
    resumed = train(_cfg(tmp_path, output=str(tmp_path / "part"), eval_at_start=True), resume=True)
    assert _strip_timing(resumed["history"]) == _strip_timing(h) and resumed["step0"] == full["step0"]
    a = ckpt.load_model(tmp_path / "full" / "model")[0].state_dict()
    b = ckpt.load_model(tmp_path / "part" / "model")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validation_split_and_upcycled_start(tmp_path, fake_segdata):
    dense = train(_cfg(tmp_path, output=str(tmp_path / "dense"), epochs=1,
                       model_kwargs=dict(SMALL, moe_layers="none", head="linear")))
    assert "val_miou" not in dense["history"][-1]
    up = train(_cfg(tmp_path, output=str(tmp_path / "up"), model=None, epochs=1, val_size=32, eval_at_start=True,
                    init_from=str(tmp_path / "dense" / "model"), shared_init="zero",
                    model_kwargs=dict(moe_layers="last-1", num_experts=4, top_k=1, renormalize=True)))
    assert up["step0"]["test_miou"] == dense["history"][-1]["test_miou"]  # function-preserving upcycled start
    row = up["history"][-1]
    assert {"val_miou", "val_pixel_acc", "val_iou", "test_miou"} <= set(row) and row["val_acc"] == row["val_pixel_acc"]


def test_ddp_two_gloo_processes(tmp_path, torchrun):
    """Replicas stay identical, and the sharded evaluation (confusion matrices summed over ranks) equals a
    single-process evaluation of the saved model."""
    script = tmp_path / "ddp_seg.py"
    script.write_text(f"""
import sys, types, pathlib, torch, torch.distributed as dist
sys.path.insert(0, r"{Path(__file__).parent}")
import test_segmentation as t
module = types.ModuleType("workbench.data.scenes")
module.SEG_DATASETS, module.build_seg_splits = ("fmnist-scenes", "ade"), t.fake_build_seg_splits
sys.modules["workbench.data.scenes"] = module
from workbench.train.metrics import evaluate_segmentation
from workbench.train.trainer import Trainer
trainer = Trainer(t._cfg(pathlib.Path(r"{tmp_path}"), output=r"{tmp_path / 'ddp'}", epochs=1, device="cpu"))
trainer.run()
flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()] +
                 [b.detach().flatten().float() for b in trainer.model.buffers()])
gathered = [torch.zeros_like(flat) for _ in range(2)]
dist.all_gather(gathered, flat)
assert torch.equal(gathered[0], gathered[1]), "replicas diverged"
if dist.get_rank() == 0:
    row, single = trainer.history[-1], evaluate_segmentation(trainer.model, trainer.test_data)
    assert (row["test_miou"], row["test_n"]) == (round(single["miou"], 6), 48), (row, single)
    print("DDP_SEG_OK", row["test_n"])
dist.destroy_process_group()
""")
    out = torchrun(script)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "DDP_SEG_OK 48" in out.stdout


@pytest.mark.parametrize("kw, message", [
    (dict(model="vimoe_micro_patch7_28", model_kwargs={}), "is a classification model but the dataset is a "
                                                           "segmentation dataset"),
    (dict(dataset="synthetic"), "is a segmentation model but the dataset is a classification dataset"),
    (dict(task="classification"), "task='classification' does not fit dataset='fmnist-scenes'"),
    (dict(task="detection"), "task='detection' is invalid"),
])
def test_task_mismatch_is_a_clear_error(tmp_path, fake_segdata, kw, message):
    with pytest.raises(ValueError, match=message) as err:
        train(_cfg(tmp_path, **kw))
    assert "\n" not in str(err.value)


def test_upcycling_a_classifier_for_segmentation_is_refused(tmp_path, fake_segdata):
    classifier = timm.create_model("vimoe_micro_patch7_28", moe_layers="none")
    ckpt.save_model(classifier, ckpt.model_config("vimoe_micro_patch7_28", {"moe_layers": "none"}), tmp_path / "c")
    with pytest.raises(ckpt.CheckpointError, match="is a classification checkpoint .* fmnist-scenes is a segmentation"):
        train(_cfg(tmp_path, model=None, init_from=str(tmp_path / "c"), model_kwargs={"moe_layers": "last-1"}))


@pytest.mark.gpu
def test_gpu_training_bf16(tmp_path, fake_segdata):
    h = train(_cfg(tmp_path, device="cuda", epochs=2))["history"]
    assert h[-1]["train_loss"] < h[0]["train_loss"] and 0 < h[-1]["test_miou"] <= 1


def test_data_options_belong_to_segmentation_datasets(tmp_path):
    with pytest.raises(ValueError, match="data_options \\['train_size'\\] are options of the segmentation datasets"):
        train(_cfg(tmp_path, dataset="synthetic", model="vimoe_micro_patch7_28", model_kwargs={},
                   data_options={"train_size": 10}))


def test_real_fmnist_scenes(tmp_path):
    """The real scenes (workbench.segdata, Fashion-MNIST on disk) at the model's input size, through the trainer."""
    segdata = pytest.importorskip("workbench.data.scenes")
    from workbench.data.classification import DatasetNotFound, find_fashion_mnist

    assert segdata.build_seg_splits is not fake_build_seg_splits

    try:
        find_fashion_mnist()
    except DatasetNotFound:
        pytest.skip("Fashion-MNIST is not installed")
    result = train(_cfg(tmp_path, epochs=1, train_subset=64, test_subset=32, data_options={"train_size": 200}))
    row = result["history"][-1]
    assert row["test_n"] == 32 and 0 <= row["test_miou"] <= 1 and len(row["test_iou"]) == 11


def test_cli_train_and_eval(tmp_path, fake_segdata, capsys):
    from workbench.cli import main

    out = tmp_path / "cli"
    assert main(["train", "--model", "vimoe_seg_micro_patch7_56", "--dataset", "fmnist-scenes", "--epochs", "1",
                 "--batch-size", "32", "--train-subset", "64", "--test-subset", "16", "--quiet", "--output", str(out),
                 "--moe-layers", "last-1", "--num-experts", "4", "--model-arg", "depth=2", "--model-arg",
                 "embed_dim=32", "--model-arg", "img_size=28", "--model-arg", "head=progressive",
                 "--data-arg", "max_items=2"]) == 0
    assert ckpt.read_checkpoint(out / "checkpoint.pt")["train_config"]["data_options"] == {"max_items": 2}
    assert "done: test mIoU" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(out), "--quiet", "--test-subset", "16"]) == 0
    text = capsys.readouterr().out
    assert "on fmnist-scenes (16 images)" in text and "mIoU" in text and "pixel accuracy" in text
    assert "background" in text and "square 4" in text  # the per-class IoU table names the data's classes
    with pytest.raises(SystemExit) as err:
        main(["eval", "--checkpoint", str(out), "--quiet", "--dataset", "fashion-mnist"])
    assert err.value.code == 2
    assert "is a segmentation model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["info", "--model", "vimoe_seg_micro_patch7_56", "--model-arg", "heads=linear"])
    assert "did you mean 'head'?" in capsys.readouterr().err


# -- the upcycle protocol on segmentation (a transfer study's checks read these) ------------------------------------
def test_pixel_predictions_are_the_class_at_each_patch_centre():
    from workbench.studies.analyse import predict_pixels

    class Stripes(torch.nn.Module):
        """Predicts, at pixel (r, c), class (r + 2c) % 11 for every image: a known answer at every patch centre."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.patch_embed, self.num_classes = types.SimpleNamespace(grid_size=(4, 4)), 11

        def forward(self, x):
            r, c = torch.meshgrid(torch.arange(x.shape[-2]), torch.arange(x.shape[-1]), indexing="ij")
            return torch.nn.functional.one_hot((r + 2 * c) % 11, 11).permute(2, 0, 1).float().expand(len(x), -1, -1, -1)

    data = FakeScenes(6, 0)
    centres = [3, 10, 17, 24]  # 28 px, 4 patches of 7: the centre pixel of each
    want = "".join("0123456789a"[(r + 2 * c) % 11] for r in centres for c in centres)
    assert predict_pixels(Stripes(), data) == want * 6
    assert predict_pixels(Stripes(), data, scenes=2) == want * 2


def test_patch_centre_pixels_carry_the_heads_patch_logits():
    """Bilinear upsampling (align_corners=False) by the patch size puts pixel p*i + p//2 on grid point i, so the
    predictions a segmentation record keeps are the head's own per-patch decisions (up to float rounding)."""
    model = _seg("linear", moe_layers="last-1", num_experts=4).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        full, patches = model(x), model.seg_head(model.forward_maps(x))
    assert torch.allclose(full[..., 3::7, 3::7], patches, atol=1e-5)
    assert torch.equal(full[..., 3::7, 3::7].argmax(1), patches.argmax(1))


def test_upcycle_study_on_segmentation_records_what_its_checks_read(tmp_path, fake_segdata):
    """A segmentation base upcycled by a study: the clean start measured in pixel accuracy, and per run the expert
    spread, the routers' patch-class NMI against their init and the pixel predictions that the upcycle checks
    read, so that a segmentation transfer study can be checked like a classification one."""
    import yaml

    from workbench.studies.checks import evaluate_checks
    from workbench.studies.records import load_record
    import pandas as pd

    from workbench.studies.spec import StudyError, load_study
    from workbench.studies.runner import run_study

    kw = {"moe_layers": "none", "head": "linear", **SMALL}
    ckpt.save_model(timm.create_model("vimoe_seg_micro_patch7_56", **kw),
                    ckpt.model_config("vimoe_seg_micro_patch7_56", kw), tmp_path / "dense")
    checks = [{"id": i, "says": i, "metric": m, "at_least": 0.0}
              for i, m in (("spread", "expert_spread"), ("router", "router_nmi_moved"), ("moved", "prediction_change"))]
    study = {"name": "segup", "protocol": "upcycle", "metric": "test_miou", "base": str(tmp_path / "dense"),
             "train": {"dataset": "fmnist-scenes", "val_size": 16, "train_subset": 32, "epochs": 1, "batch_size": 16,
                       "lr": 1e-3},
             "analysis": {"regions": True, "random_routers": 3, "max_images": 16}, "seeds": [0, 1],
             "control": "dense", "common": {"renormalize": "straight_through"},
             "configs": {"dense": {"moe_layers": "none"}, "last-1": {"moe_layers": "last-1", "num_experts": 3,
                                                                     "top_k": 2}},
             "checks": checks}
    path = tmp_path / "segup.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    results = tmp_path / "results"
    run_study(path, results=results, allow_dirty=True)
    base = json.loads((results / "segup" / "_base.json").read_text())
    assert 0 < base["test_miou"] < base["test_acc"] <= 1  # pixel accuracy, with the mIoU beside it
    for seed in (0, 1):
        rec = load_record(path, "last-1", seed, results)
        assert rec["clean_start"] and rec["step0_test_acc"] == base["test_acc"]
        assert len(rec["test_predictions"]) == 64 * 16  # every fake test scene, 4 x 4 patch centres
        assert set(rec["expert_spread"]) == set(rec["router_init"]) == set(rec["regions"]) == {"1"}
        assert rec["router_init"]["1"]["router_shift"] > 0 and rec["expert_spread"]["1"] > 0
        assert len(load_record(path, "dense", seed, results)["test_predictions"]) == 64 * 16
    table = evaluate_checks(path, results=results)
    assert table["n"].tolist() == [2, 2, 2] and table["value"].notna().all() and table["passed"].all()
    # the transfer rule's class groups: labels 5-9 (mask 6-10) against 0-4 (mask 1-5), background left out
    from workbench.studies import regime

    iou = regime.class_iou(load_study(path), results=results).set_index("config")
    assert iou["seeds"].tolist() == [2, 2]
    recs = [load_record(path, "last-1", s, results) for s in (0, 1)]

    def group_mean(r, lo, hi):
        values = [v for v in r["test_iou"][lo:hi] if v is not None]
        return sum(values) / len(values)

    assert iou.loc["last-1", "base_iou"] == pytest.approx(sum(group_mean(r, 1, 6) for r in recs) / 2)
    assert iou.loc["last-1", "test_miou"] == pytest.approx(50 * sum(r["test_miou"] for r in recs))
    # the pilot's rule (1): the floor is the base's mIoU + points, read against the dense control's mean mIoU (a
    # floor between its mean mIoU and its mean pixel accuracy fails it: pixel accuracy would pass)
    dense = [load_record(path, "dense", s, results) for s in (0, 1)]
    between = 50 * sum(r["test_miou"] + r["test_acc"] for r in dense) / 2
    points = between - 100 * base["test_miou"]
    _, line = regime.seg_transfer_rule(load_study(path), results=results, points=points, ratio=0)
    assert f"(floor {between:.2f}: the base's + {points:g})" in line and "dense mean below" in line
    _, line = regime.seg_transfer_rule(load_study(path), results=results, points=-100, ratio=0)
    assert "dense mean below" not in line and "class IoU" not in line.split("rule (1)")[1]
    _, line = regime.seg_transfer_rule(load_study(path), results=results, points=-100, ratio=1e9)
    assert "below 1000000000.0" in line.split("rule (1)")[1]
    # the ratio fails the rule on its own: every band adopting, the dense floor met
    adopt = pd.DataFrame({"config": ["last-1"], "band": ["adopt"]})
    assert regime._outcome(adopt, 50.0, 10.0) == "adopted"
    assert regime._outcome(adopt, 50.0, 10.0, ("ratio low",)) == "fails outright (ratio low): the schedule is not adopted"
    (results / "segup" / "_base.json").unlink()
    with pytest.raises(StudyError, match="_base.json is missing"):
        regime.seg_transfer_rule(load_study(path), results=results)
