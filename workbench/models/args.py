"""The model's vocabulary on the command line: the MoE flags, ``--model-arg KEY=VALUE`` (YAML-typed), the forms of
``--moe-layers``, and a one-line check of model keywords against the model's signature.

Imports: yaml at import time; timm and this package's models only inside ``check_model_kwargs`` (so the CLI's
parser builds without torch).  Building a model from the flags (or a ``--checkpoint``) is
``workbench.train.checkpoint.model_from_args``.
"""
from __future__ import annotations

import argparse
import re

import yaml

DEFAULT_MODEL = "vimoe_tiny_patch4_28"
MOE_FLAGS = {  # flag -> (model kwarg, type, choices, help)
    "--moe-layers": ("moe_layers", str, None,
                     "which blocks get experts: none, all, last-L, first-L, every-N, vmoe-last-L, or block indices "
                     "as 1,3 or '1 3' or '[1, 3]' (negative count from the end) (default: last-2)"),
    "--num-experts": ("num_experts", int, None, "routed experts per MoE layer, >= 1 (default: 8)"),
    "--top-k": ("top_k", int, None, "experts per token, 1 <= top_k <= num_experts (default: 1)"),
    "--shared-expert": ("shared_expert", str, ("none", "add", "gated"),
                        "an always-on expert beside the routed ones (default: none)"),
    "--routing": ("routing", str, ("token", "image"), "route each patch, or one choice per image (default: token)"),
    "--router": ("router", str, ("topk", "experts_choose", "soft"),
                 "who chooses: tokens take their top-k experts, experts take their top-C tokens, or Soft MoE's "
                 "token mixtures per slot (default: topk)"),
    "--capacity-factor": ("capacity_factor", float, None,
                          "tokens per expert as a multiple of the even share, > 0 (default: none, dropless; "
                          "experts_choose: 1.0, the mean experts per token)"),
    "--slots-per-expert": ("slots_per_expert", int, None, "Soft MoE slots per expert and image (default: 1)"),
    "--dispatch": ("dispatch", str, ("grouped", "loop", "einsum"),
                   "how tokens reach experts; same numbers, different cost (default: grouped)"),
}
MOE_LAYERS_FORMS = "give block indices as 1,3 or '1 3' or '[1, 3]', or one of none, all, last-L, first-L, " \
                   "every-N, vmoe-last-L"
_INDEX_LIST = re.compile(r"\s*\[?\s*(-?\d+(?:\s*[,\s]\s*-?\d+)*)?\s*,?\s*\]?\s*")


class UsageError(ValueError):
    """Bad command-line input: exit code 2."""


def _parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_model_args(pairs: list[str], flag: str = "--model-arg", example: str = "drop_path_rate=0.1") -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} {pair!r} is invalid: use KEY=VALUE, e.g. {flag} {example}")
        out[key.replace("-", "_")] = _parse_value(value)
    return out


def parse_moe_layers(text):
    """``--moe-layers`` text -> a spec: a list of ints for '1,3', '1 3' or '[1, 3]', else the text (a named spec)."""
    if not isinstance(text, str):
        return text
    match = _INDEX_LIST.fullmatch(text)
    bracketed = text.strip().startswith("[") or text.strip().endswith("]")
    if match and (match.group(1) is not None or bracketed):
        if bracketed and not (text.strip().startswith("[") and text.strip().endswith("]")):
            raise UsageError(f"--moe-layers {text!r} is invalid: {MOE_LAYERS_FORMS}")
        return [int(i) for i in re.split(r"[,\s]+", match.group(1) or "") if i]
    if bracketed or re.fullmatch(r"[\s,\d-]+", text):
        raise UsageError(f"--moe-layers {text!r} is invalid: {MOE_LAYERS_FORMS}")
    return text


def add_moe_args(parser: argparse.ArgumentParser) -> None:
    for flag, (_, kind, choices, text) in MOE_FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, choices=choices, help=text)
    parser.add_argument("--model-arg", action="append", metavar="KEY=VALUE", default=[],
                        help="any other model keyword (timm ViT or MoE switch), YAML-typed, e.g. depth=4, "
                             "drop_path_rate=0.1, renormalize=true; repeat the flag for several")


def model_kwargs_from_args(args) -> dict:
    kwargs = parse_model_args(args.model_arg)
    for flag, (key, *_) in MOE_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            kwargs[key] = value
    if "moe_layers" in kwargs:
        kwargs["moe_layers"] = parse_moe_layers(kwargs["moe_layers"])
    return kwargs


def _kind_ok(value, annotation) -> str | None:
    """None if ``value`` fits a plain annotation (int, float, bool, str or a Literal), else what is wanted; other
    annotations (unions, tuples, classes) are left to the model."""
    import typing

    kind = {"int": int, "float": float, "bool": bool, "str": str}.get(annotation, annotation)
    if typing.get_origin(kind) is typing.Literal:
        options = typing.get_args(kind)
        return None if value in options else f"one of {', '.join(map(repr, options))}"
    if kind is bool:
        return None if isinstance(value, bool) else "true or false"
    if kind is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if kind is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if kind is str:
        return None if isinstance(value, str) else "a string"
    return None


def model_params(name: str) -> dict | None:
    """The keywords a ViT-family model takes (``vimoe_*``, ``vimoe_seg_*`` and timm's ``vit_*``): name -> (default,
    annotation); None for other timm models (left to the model).  A UsageError for a name timm does not know."""
    import inspect

    import timm
    from timm.models.vision_transformer import VisionTransformer

    from ..moe import MoEMlp
    from . import register
    from .segmentation import SegViMoE
    from .vimoe import ViMoE

    register()
    if not timm.is_model(name):
        raise UsageError(f"--model {name!r} is not a timm model: use e.g. {DEFAULT_MODEL} "
                         "(python -c \"import timm, workbench; print(timm.list_models('vimoe_*'))\")")
    entry = timm.models.model_entrypoint(name)
    if entry.__module__ not in ("timm.models.vision_transformer", "workbench.models.vimoe",
                                "workbench.models.segmentation"):
        return None
    params = {}
    extra = (SegViMoE.__init__,) if entry.__module__ == "workbench.models.segmentation" else ()
    for fn in (VisionTransformer.__init__, ViMoE.__init__, *extra, MoEMlp.__init__):
        for key, p in inspect.signature(fn).parameters.items():
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and key != "self":
                params.setdefault(key, (p.default, p.annotation))
    for key in ("in_features", "hidden_features", "out_features", "num_prefix_tokens", "device", "dtype"):
        params.pop(key, None)  # set by the model itself
    return params


def kwarg_problem(params: dict, key: str, value) -> str | None:
    """Why ``key=value`` does not fit a model whose keywords are ``params`` (see :func:`model_params`), or None."""
    if key not in params:
        import difflib

        close = difflib.get_close_matches(key, params, n=1)
        return f"unknown model argument {key!r}" + (f"; did you mean {close[0]!r}?" if close else "")
    default, annotation = params[key]
    wanted = _kind_ok(value, annotation)
    if wanted:
        return f"model argument {key}={value!r} is invalid: {key} takes {wanted}"
    return None


def check_model_kwargs(name: str | None, kwargs: dict) -> None:
    """One-line UsageError for an unknown model keyword or one of the wrong type (instead of a traceback from deep
    inside timm).  Checked for the ViT family (``vimoe_*`` and timm's ``vit_*``); other timm models pass through."""
    name = name or DEFAULT_MODEL
    params = model_params(name)
    if params is None:
        return
    for key, value in kwargs.items():
        problem = kwarg_problem(params, key, value)
        if problem and key not in params:
            raise UsageError(problem.replace(f"{key!r}", f"{key!r} (--model-arg or the config's model_kwargs)", 1)
                             + f" ({name} takes: {', '.join(sorted(params))})")
        if problem:
            default = params[key][0]
            example = str(default).lower() if isinstance(default, bool) else default
            raise UsageError(f"{problem}, e.g. --model-arg {key}={example}")
