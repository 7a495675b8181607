"""ViMoE: timm's VisionTransformer with the FFN of chosen blocks replaced by ``MoEMlp``; registered with timm.

    import workbench, timm
    model = timm.create_model("vimoe_tiny_patch4_28", moe_layers="last-2", num_experts=8, top_k=1,
                              shared_expert="add")

``moe_layers`` places the MoE blocks: ``"none"``, ``"all"``, ``"last-L"``, ``"first-L"``, ``"every-N"`` (blocks
N-1, 2N-1, ...), ``"vmoe-last-L"`` (the last L odd-indexed blocks, as V-MoE places them) or a list of block indices
(negative indices count from the end).  Every other MoE keyword (see ``MoEMlp``) passes straight through.
"""
from __future__ import annotations

import copy
import inspect
from typing import Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn

from ..moe import MoEMlp, moe_modules

FASHION_MNIST_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                        "Bag", "Ankle boot")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)

MOE_ARGS = tuple(name for name, p in inspect.signature(MoEMlp.__init__).parameters.items()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY
                 and name not in ("num_prefix_tokens", "device", "dtype"))  # device/dtype: the whole model's
SHARED_INITS = ("copy", "zero", "random", "split")


def resolve_moe_layers(spec: str | Sequence[int], depth: int) -> list[int]:
    """Turn a ``moe_layers`` spec into sorted block indices; a ValueError names what is allowed."""
    allowed = ("use 'none', 'all', 'last-L', 'first-L', 'every-N', 'vmoe-last-L' or a list of block indices "
               f"in [-{depth}, {depth - 1}]")
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "none":
            return []
        if text == "all":
            return list(range(depth))
        kind, _, number = text.rpartition("-")
        if kind in ("last", "first", "every", "vmoe-last") and number.isdigit():
            n = int(number)
            if kind == "every":
                if not 1 <= n <= depth:
                    raise ValueError(f"moe_layers={spec!r}: N must be in 1..{depth} for a {depth}-block model")
                return list(range(n - 1, depth, n))
            odd = list(range(1, depth, 2))
            limit = len(odd) if kind == "vmoe-last" else depth
            if not 1 <= n <= limit:
                raise ValueError(f"moe_layers={spec!r}: L must be in 1..{limit} for a {depth}-block model "
                                 "(use 'none' for a dense model)")
            if kind == "last":
                return list(range(depth - n, depth))
            if kind == "first":
                return list(range(n))
            return odd[-n:]
        raise ValueError(f"moe_layers={spec!r} is not a known spec: {allowed}")
    try:
        indices = [int(i) for i in spec]
    except (TypeError, ValueError):
        raise ValueError(f"moe_layers={spec!r} is not a known spec: {allowed}") from None
    if any(isinstance(i, bool) or not -depth <= i < depth for i in spec):
        raise ValueError(f"moe_layers={list(spec)!r} has an index out of range for a {depth}-block model: {allowed}")
    normalised = sorted(i % depth for i in indices)
    if len(set(normalised)) != len(normalised):
        raise ValueError(f"moe_layers={list(spec)!r} names a block twice; list each block once")
    return normalised


def split_moe_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """(MoE keyword arguments, the rest) of a create_model kwargs dict."""
    moe = {k: kwargs[k] for k in kwargs if k in MOE_ARGS}
    return moe, {k: v for k, v in kwargs.items() if k not in MOE_ARGS}


def moe_from_mlp(mlp: nn.Module, num_prefix_tokens: int, **moe_kwargs) -> MoEMlp:
    """An (untrained) MoEMlp with the shape of a timm ``Mlp`` (fc1, act, fc2)."""
    fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)):
        raise ValueError(f"cannot turn {type(mlp).__name__} into experts: only timm's Mlp layout (fc1, act, fc2) "
                         "is supported (gated/SwiGLU FFNs are not)")
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise ValueError("cannot turn an Mlp with an inner norm (scale_mlp_norm) into experts")
    drop = getattr(getattr(mlp, "drop1", None), "p", 0.0)
    act = type(mlp.act) if hasattr(mlp, "act") else nn.GELU
    return MoEMlp(fc1.in_features, fc1.out_features, fc2.out_features, act_layer=act, bias=fc1.bias is not None,
                  drop=drop, num_prefix_tokens=num_prefix_tokens, **moe_kwargs)


def validate_moe_kwargs(moe_kwargs: dict) -> None:
    """Run MoEMlp's checks without allocating real weights."""
    with torch.device("meta"):
        MoEMlp(8, 8, **moe_kwargs)


class ViMoE(VisionTransformer):
    """A VisionTransformer whose blocks in ``moe_layers`` carry an ``MoEMlp`` instead of the dense FFN."""

    def __init__(self, *, moe_layers: str | Sequence[int] = "last-2", **kwargs):
        moe_kwargs, vit_kwargs = split_moe_kwargs(kwargs)
        validate_moe_kwargs(moe_kwargs)
        super().__init__(**vit_kwargs)
        indices = resolve_moe_layers(moe_layers, len(self.blocks))
        for i in indices:
            mlp = self.blocks[i].mlp  # the MoE layer lands where the ViT put its layers (timm's device=, dtype=)
            self.blocks[i].mlp = moe_from_mlp(mlp, self.num_prefix_tokens, device=mlp.fc1.weight.device,
                                              dtype=mlp.fc1.weight.dtype, **moe_kwargs)
        self.moe_layers_spec = moe_layers
        self.moe_kwargs = moe_kwargs

    @property
    def moe_layer_indices(self) -> list[int]:
        return sorted(k for k in moe_modules(self) if isinstance(k, int))


def upcycle(dense: VisionTransformer, moe_layers: str | Sequence[int] = "last-2", *, shared_init: str = "copy",
            expert_noise: float = 0.0, inplace: bool = False, **moe_kwargs) -> VisionTransformer:
    """Sparse upcycling (arXiv 2212.05055): every expert starts as a copy of the block's dense FFN, the router
    is new (random).  Works for any timm ViT with ``Mlp`` FFNs, including DINOv2 and our own dense checkpoints.

    With ``shared_expert='none'`` and gates that sum to 1 (top-1 with ``renormalize=True``, or renormalised
    top-k) the result computes exactly the dense function.  Unnormalised gates scale the FFN output by the
    gate (V-MoE's convention), so the function changes until the router learns.

    Shared expert (``shared_expert='add'|'gated'``), by ``shared_init``:
      * ``'copy'`` (default): the shared expert is a copy of the dense FFN too, so the block initially computes
        ``FFN(x) * (1 + sum of gates)`` ('gated' starts its gate at sigmoid(0) = 0.5);
      * ``'zero'``: the shared expert is a copy whose output projection is zeroed: the function is preserved
        exactly (with gates summing to 1) and the shared expert grows from zero during fine-tuning;
      * ``'random'``: freshly initialised (also used when the shared width differs from the dense width).
      * ``'split'`` (fine-grained, DeepSeekMoE-style, at the dense FLOPs): the dense FFN's hidden units are split
        in two; the shared expert takes the first ``shared_hidden`` units and every routed expert (width
        ``expert_hidden`` = the rest) a copy of the others.  With gates summing to 1 the block computes exactly
        the dense FFN, since an FFN is a sum over its hidden units.  Needs ``shared_hidden + expert_hidden``
        equal to the dense width.
    ``expert_noise`` adds Gaussian noise (relative to each weight's std) to the expert copies to break symmetry.

    Other routers (``router=``) upcycle the same way (experts are copies), but do not start at the dense function:
    experts-choose leaves some tokens to no expert and weights the others by router probabilities that need not sum
    to 1 (with ``renormalize`` a token any expert took gets exactly the dense FFN; the rest still get nothing), and
    Soft MoE runs the FFN on mixtures of tokens, not on the tokens.
    """
    if shared_init not in SHARED_INITS:
        raise ValueError(f"shared_init={shared_init!r} is invalid: use one of {SHARED_INITS}")
    if not isinstance(dense, VisionTransformer):
        raise ValueError(f"upcycle expects a timm VisionTransformer, got {type(dense).__name__}")
    validate_moe_kwargs(moe_kwargs)
    model = dense if inplace else copy.deepcopy(dense)
    indices = resolve_moe_layers(moe_layers, len(model.blocks))
    for i in indices:
        mlp = model.blocks[i].mlp
        if isinstance(mlp, MoEMlp):
            raise ValueError(f"block {i} is already an MoE layer; upcycle a dense model or choose other moe_layers")
        hidden = mlp.fc1.out_features
        if shared_init == "split":
            _check_split(moe_kwargs, hidden)
            moe = moe_from_mlp(mlp, model.num_prefix_tokens, **moe_kwargs).to(mlp.fc1.weight.device,
                                                                               mlp.fc1.weight.dtype)
            split_dense_into_moe(moe, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
            model.blocks[i].mlp = moe
            continue
        if moe_kwargs.get("expert_hidden") not in (None, hidden):
            raise ValueError(f"expert_hidden={moe_kwargs['expert_hidden']} differs from the dense FFN width "
                             f"{hidden}: upcycled experts are copies, leave expert_hidden unset")
        moe = moe_from_mlp(mlp, model.num_prefix_tokens, **moe_kwargs).to(mlp.fc1.weight.device,
                                                                           mlp.fc1.weight.dtype)
        copy_dense_into_moe(moe, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, shared_init,
                            expert_noise)
        model.blocks[i].mlp = moe
    if isinstance(model, ViMoE) and not model.moe_kwargs:
        model.moe_kwargs = moe_kwargs
        model.moe_layers_spec = indices
    return model


@torch.no_grad()
def copy_dense_into_moe(moe: MoEMlp, fc1_w, fc1_b, fc2_w, fc2_b, shared_init: str = "copy",
                        expert_noise: float = 0.0) -> None:
    """Tile one dense FFN (nn.Linear layout: weight (out, in)) into every expert (and the shared expert)."""
    moe.w1.copy_(fc1_w.t().unsqueeze(0).expand_as(moe.w1))
    moe.w2.copy_(fc2_w.t().unsqueeze(0).expand_as(moe.w2))
    if moe.b1 is not None:
        moe.b1.copy_(fc1_b.unsqueeze(0).expand_as(moe.b1))
        moe.b2.copy_(fc2_b.unsqueeze(0).expand_as(moe.b2))
    if expert_noise > 0:
        for w in (moe.w1, moe.w2):
            w.add_(torch.randn_like(w) * w.std() * expert_noise)
    shared = moe.shared
    if shared is None or shared_init == "random" or shared.fc1.out_features != fc1_w.shape[0]:
        return
    shared.fc1.weight.copy_(fc1_w)
    shared.fc2.weight.copy_(fc2_w)
    if shared.fc1.bias is not None:
        shared.fc1.bias.copy_(fc1_b)
        shared.fc2.bias.copy_(fc2_b)
    if shared_init == "zero":
        shared.fc2.weight.zero_()
        if shared.fc2.bias is not None:
            shared.fc2.bias.zero_()


def _check_split(moe_kwargs: dict, hidden: int) -> None:
    shared, routed = moe_kwargs.get("shared_hidden"), moe_kwargs.get("expert_hidden")
    if moe_kwargs.get("shared_expert", "none") != "add" or shared is None or routed is None \
            or shared + routed != hidden:
        raise ValueError(f"shared_init='split' needs shared_expert='add' and shared_hidden + expert_hidden equal to "
                         f"the dense FFN width {hidden} (e.g. shared_hidden={hidden // 2}, "
                         f"expert_hidden={hidden - hidden // 2}); got shared_hidden={shared}, expert_hidden={routed}")


@torch.no_grad()
def split_dense_into_moe(moe: MoEMlp, fc1_w, fc1_b, fc2_w, fc2_b) -> None:
    """Fine-grained upcycling: hidden units [0, s) to the shared expert, [s, h) to every routed expert; the
    output bias goes to the shared expert (always on), so shared(x) + expert(x) = FFN(x) for a gate of 1."""
    s = moe.shared.fc1.out_features
    moe.shared.fc1.weight.copy_(fc1_w[:s])
    moe.shared.fc2.weight.copy_(fc2_w[:, :s])
    moe.w1.copy_(fc1_w[s:].t().unsqueeze(0).expand_as(moe.w1))
    moe.w2.copy_(fc2_w[:, s:].t().unsqueeze(0).expand_as(moe.w2))
    if moe.b1 is not None:
        moe.shared.fc1.bias.copy_(fc1_b[:s])
        moe.shared.fc2.bias.copy_(fc2_b)
        moe.b1.copy_(fc1_b[s:].unsqueeze(0).expand_as(moe.b1))
        moe.b2.zero_()


def checkpoint_filter_fn(state_dict: dict, model: ViMoE, **kwargs) -> dict:
    """timm's ViT filter (pos-embed resampling, patch-embed adaption), then upcycling of dense FFN weights
    found where the model has MoE layers: loading a dense checkpoint into a ViMoE *is* upcycling."""
    state_dict = vit_checkpoint_filter_fn(state_dict, model, **kwargs)
    own = model.state_dict()
    for i, moe in moe_modules(model).items():
        prefix = f"blocks.{i}.mlp."
        if prefix + "fc1.weight" not in state_dict or prefix + "w1" in state_dict:
            continue
        dense = {name: state_dict.pop(prefix + name, None) for name in ("fc1.weight", "fc1.bias", "fc2.weight",
                                                                          "fc2.bias")}
        scratch = moe_from_mlp(_DenseShape(dense), model.num_prefix_tokens, **moe.config())
        scratch.load_state_dict({k[len(prefix):]: v for k, v in own.items() if k.startswith(prefix)})
        copy_dense_into_moe(scratch, dense["fc1.weight"], dense["fc1.bias"], dense["fc2.weight"], dense["fc2.bias"])
        state_dict.update({prefix + k: v for k, v in scratch.state_dict().items()})
    return state_dict


class _DenseShape(nn.Module):
    """Just enough of a timm Mlp, built from a state dict, for ``moe_from_mlp`` to read its shape."""

    def __init__(self, dense: dict):
        super().__init__()
        out_h, in_d = dense["fc1.weight"].shape
        self.fc1 = nn.Linear(in_d, out_h, bias=dense["fc1.bias"] is not None, device="meta")
        self.fc2 = nn.Linear(out_h, dense["fc2.weight"].shape[0], bias=dense["fc2.bias"] is not None, device="meta")
        self.act = nn.GELU()


# -- timm registration ----------------------------------------------------------------------------------------
def _cfg(**kwargs) -> dict:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
            "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head",
            "license": "apache-2.0", **kwargs}


# the 28x28 grayscale models: Fashion-MNIST's preprocessing and labels, 4x4 patches
FMNIST_CFG = dict(num_classes=10, input_size=(1, 28, 28), crop_pct=1.0, interpolation="bilinear",
                  mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, label_names=FASHION_MNIST_LABELS)
FMNIST_ARGS = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10)

default_cfgs = generate_default_cfgs({
    "vimoe_tiny_patch4_28.untrained": _cfg(
        **FMNIST_CFG, description="Tiny ViMoE for 28x28 grayscale images (the Fashion-MNIST scale)"),
    "vimoe_micro_patch7_28.untrained": _cfg(
        **FMNIST_CFG, description="Micro ViMoE for 28x28 grayscale images: the studies' fast protocol models"),
    "vimoe_micro_patch4_28.untrained": _cfg(
        **FMNIST_CFG, description="Micro ViMoE with 4x4 patches: the upcycle protocol's converged base (>= 90%)"),
    "vimoe_small_patch4_28.untrained": _cfg(
        **FMNIST_CFG, description="ViT-S width and depth on 28x28 grayscale images (the studies' gpu profile)"),
    "vimoe_small_patch16_224.untrained": _cfg(description="ViT-S/16 shape with MoE layers"),
    "vimoe_base_patch14_dinov2.untrained": _cfg(
        crop_pct=1.0, description="DINOv2 ViT-B/14 shape (the paper's backbone); DINOv2 weights load through "
                                  "pretrained_cfg_overlay=dict(file=...) and are upcycled on load"),
})


def _create_vimoe(variant: str, pretrained: bool = False, **kwargs) -> ViMoE:
    strict = kwargs.pop("pretrained_strict", True)
    return build_model_with_cfg(ViMoE, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                pretrained_strict=strict,
                                feature_cfg=dict(out_indices=kwargs.pop("out_indices", 3), feature_cls="getter"),
                                **kwargs)


@register_model
def vimoe_tiny_patch4_28(pretrained: bool = False, **kwargs) -> ViMoE:
    """Tiny ViMoE: 28x28x1 input, 4x4 patches (7x7 grid + CLS = 50 tokens), d=192, 6 blocks, 3 heads."""
    args = dict(FMNIST_ARGS, embed_dim=192, depth=6, num_heads=3)
    return _create_vimoe("vimoe_tiny_patch4_28", pretrained, **dict(args, **kwargs))


@register_model
def vimoe_micro_patch7_28(pretrained: bool = False, **kwargs) -> ViMoE:
    """Micro ViMoE: 28x28x1 input, 7x7 patches (4x4 grid + CLS = 17 tokens), d=64, 4 blocks, 2 heads: one
    Fashion-MNIST epoch in about 20-40 s on one CPU thread, so a study's runs take minutes."""
    args = dict(FMNIST_ARGS, patch_size=7, embed_dim=64, depth=4, num_heads=2)
    return _create_vimoe("vimoe_micro_patch7_28", pretrained, **dict(args, **kwargs))


@register_model
def vimoe_micro_patch4_28(pretrained: bool = False, **kwargs) -> ViMoE:
    """Micro ViMoE with 4x4 patches (7x7 grid + CLS = 50 tokens), d=64, 4 blocks, 2 heads: about 3x the cost of
    the 7x7-patch micro model per image, and the finer patches it needs to pass 90% on Fashion-MNIST."""
    args = dict(FMNIST_ARGS, patch_size=4, embed_dim=64, depth=4, num_heads=2)
    return _create_vimoe("vimoe_micro_patch4_28", pretrained, **dict(args, **kwargs))


@register_model
def vimoe_small_patch4_28(pretrained: bool = False, **kwargs) -> ViMoE:
    """ViT-S width and depth (d=384, 12 blocks, 6 heads) on 28x28x1 input with 4x4 patches: the gpu profile."""
    args = dict(FMNIST_ARGS, embed_dim=384, depth=12, num_heads=6)
    return _create_vimoe("vimoe_small_patch4_28", pretrained, **dict(args, **kwargs))


@register_model
def vimoe_small_patch16_224(pretrained: bool = False, **kwargs) -> ViMoE:
    """ViT-S/16 with MoE layers; upcycles from ``vit_small_patch16_224`` weights."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_vimoe("vimoe_small_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def vimoe_base_patch14_dinov2(pretrained: bool = False, **kwargs) -> ViMoE:
    """DINOv2 ViT-B/14 with MoE layers (LayerScale, 224x224 input: DINOv2's 518 pos-embed is resampled on load)."""
    args = dict(img_size=224, patch_size=14, embed_dim=768, depth=12, num_heads=12, init_values=1e-5)
    return _create_vimoe("vimoe_base_patch14_dinov2", pretrained, **dict(args, **kwargs))


MODEL_NAMES = ("vimoe_micro_patch7_28", "vimoe_tiny_patch4_28", "vimoe_small_patch4_28", "vimoe_small_patch16_224",
               "vimoe_base_patch14_dinov2")
