"""Checkpoints: written atomically, rebuilt from the architecture they record, refused clearly when they do not fit.

A training checkpoint (``.pt``) holds the model config, weights, optimizer, scheduler, epoch/step, RNG states and
the metric history.  It is about three times the size of the weights: fp32 weights (a third) and AdamW's two
moment buffers per weight (two thirds, needed for an exact resume); the rest is tens of kB.  Measured for the
default ``vimoe_tiny_patch4_28`` (6.8M parameters): 82 MB, of which 27 MB weights and 55 MB optimizer state.  Once
a run is finished, its ``model/`` folder (weights only) is all the other commands need.

A shipped model is a folder with ``model.safetensors`` and ``config.json``.  The model config is
``{"model": <timm name>, "model_kwargs": {...}, "upcycle": {...} | None}``: ``upcycle`` is set when a plain timm ViT
(not a ``vimoe_*`` model) was turned into a ViMoE, and replays ``workbench.upcycle`` after creation.

Imports: timm, ``workbench.moe``, ``workbench.models`` (to rebuild a model), ``workbench.atomic``.
"""
from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
import torch.nn as nn

from ..atomic import atomic_write, atomic_write_text  # noqa: F401  (re-exported)
from ..moe import moe_modules


WHERE = " (give a model folder, a run folder or a weights file; the shipped models are in experiments/checkpoints/)"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; the message says which and what to do."""


def save_checkpoint(path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


WHAT_A_CHECKPOINT_IS = ("a workbench checkpoint is a run's checkpoint.pt (written by `python -m workbench train`, "
                        "next to metrics.jsonl and train_config.json) or a model folder holding model.safetensors "
                        "and config.json")
_KNOWN_KINDS = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
                (b"%PDF", "a PDF"), (b"\x1f\x8b", "a gzip file"), (b"{", "JSON text"))


def _file_kind(path: Path) -> str | None:
    """None for what torch.save may have written (a zip archive, or a legacy pickle), else what the file looks like."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return None
    if not head:
        return "an empty file"
    for magic, kind in _KNOWN_KINDS:
        if head.startswith(magic):
            return kind
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "not a file torch.save wrote"


def read_checkpoint(path) -> dict:
    """The state dict a trainer saved, or a one-line CheckpointError: missing, not a checkpoint at all (say a text
    file or an image), or a checkpoint that is truncated or corrupt (an interrupted copy)."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist{WHERE}")
    kind = _file_kind(path)
    if kind is not None:
        raise CheckpointError(f"{path} is not a workbench checkpoint ({kind}); {WHAT_A_CHECKPOINT_IS}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist()):
                raise CheckpointError(f"{path} is not a workbench checkpoint (a zip archive, but not one torch.save "
                                      f"wrote); {WHAT_A_CHECKPOINT_IS}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated/corrupt zips and pickles
        if "weights_only" in str(err) or "Weights only load failed" in str(err):
            raise CheckpointError(f"{path} is not a workbench checkpoint (a torch file holding Python objects that "
                                  f"a workbench checkpoint never has, so it is not loaded); "
                                  f"{WHAT_A_CHECKPOINT_IS}") from None
        first = str(err).strip().splitlines()[0].split(". ")[0][:120] if str(err).strip() else ""
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt and cannot be read ({type(err).__name__}"
                              f"{': ' + first if first else ''}); delete it to start over or point to an earlier "
                              "copy") from None
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise CheckpointError(f"{path} is not a workbench checkpoint (a torch file without model/model_config "
                              f"entries); {WHAT_A_CHECKPOINT_IS}")
    return state


def model_config(name: str, model_kwargs: dict | None = None, upcycle: dict | None = None) -> dict:
    return {"model": name, "model_kwargs": dict(model_kwargs or {}), "upcycle": dict(upcycle) if upcycle else None}


def build_model(config: dict) -> nn.Module:
    """Create the model a config describes (no weights loaded)."""
    from ..models import register

    register()  # the vimoe_* models, by name
    from ..models.vimoe import upcycle

    if not timm.is_model(config["model"]):
        raise CheckpointError(f"timm has no model {config['model']!r}: use one of timm.list_models('vimoe_*') (or "
                              "any timm ViT); a checkpoint naming it was written by another version")
    model = timm.create_model(config["model"], **config.get("model_kwargs", {}))
    if config.get("upcycle"):
        model = upcycle(model, inplace=True, **config["upcycle"])
    return model


def describe(config: dict) -> str:
    kw = ", ".join(f"{k}={v!r}" for k, v in sorted({**config.get("model_kwargs", {}),
                                                   **(config.get("upcycle") or {})}.items()))
    return f"{config['model']}({kw})"


def load_state_into(model: nn.Module, state_dict: dict, config: dict, source) -> None:
    """load_state_dict with an error that names both architectures instead of a key dump."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or shapes:
        detail = "; ".join(filter(None, [
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}" if missing else "",
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}" if unexpected else "",
            f"shape mismatch {shapes[:3]}" if shapes else ""]))
        raise CheckpointError(f"{source} holds weights of another architecture ({describe(config)}) than the model "
                              f"being loaded ({detail}); build the model from the checkpoint's own config "
                              "(workbench.load_model) or pick a checkpoint of this architecture")
    model.load_state_dict(state_dict)


def save_model(model: nn.Module, config: dict, folder, extra: dict | None = None) -> Path:
    """A shippable model: ``model.safetensors`` + ``config.json`` (weights only), both written atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(state, tmp))
    atomic_write_text(folder / "config.json", json.dumps({**config, **(extra or {})}, indent=2) + "\n")
    return folder


def load_model(path, device="cpu", task: str | None = None) -> tuple[nn.Module, dict]:
    """(model in eval mode, its config) from a shipped folder, a ``model.safetensors`` file or a training ``.pt``;
    a run folder works too (its finished ``model/``, else its ``checkpoint.pt``).  ``task`` ('classification' |
    'segmentation'): refuse, in one line, a model built for the other task."""
    path = typed = Path(path)
    if path.is_dir():
        if not (path / "model.safetensors").exists() and (path / "model" / "model.safetensors").is_file():
            path = path / "model" / "model.safetensors"  # a finished run folder
        elif not (path / "model.safetensors").exists() and (path / "checkpoint.pt").is_file():
            path = path / "checkpoint.pt"  # a run folder still training
        else:
            path = path / "model.safetensors"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        cfg_path = path.with_name("config.json")
        if not path.exists() and (typed.suffix == ".safetensors" or not path.parent.exists()):
            raise CheckpointError(f"checkpoint {typed} does not exist{WHERE}")
        if not path.is_file() or not cfg_path.is_file():
            raise CheckpointError(f"{path.parent} must hold model.safetensors and config.json (or be a run folder "
                                  "with model/ or checkpoint.pt)")
        try:
            config = json.loads(cfg_path.read_text())
        except Exception as err:
            raise CheckpointError(f"{cfg_path} is not valid JSON ({type(err).__name__}: {str(err)[:120]}); "
                                  f"{WHAT_A_CHECKPOINT_IS}") from None
        if not isinstance(config, dict) or "model" not in config:
            raise CheckpointError(f"{cfg_path} does not name a model (no 'model' entry); {WHAT_A_CHECKPOINT_IS}")
        try:
            weights = load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"{path} is not a readable safetensors file, truncated or of another kind "
                                  f"({type(err).__name__}: {str(err)[:120]}); {WHAT_A_CHECKPOINT_IS}") from None
    else:
        state = read_checkpoint(path)
        config, weights = state["model_config"], state["model"]
    model = build_model(config)
    found = getattr(model, "task", None) or "classification"
    if task is not None and found != task:
        raise CheckpointError(f"{path} holds a {found} model ({config['model']}) but a {task} model is needed "
                              f"here; pick a {task} checkpoint (segmentation: a vimoe_seg_* run)")
    load_state_into(model, weights, config, path)
    model.workbench_config = config
    return model.to(device).eval(), config


def architecture_summary(model: nn.Module) -> list[dict]:
    """One row per block: kind (dense/MoE) and parameters; used by ``info``."""
    rows = []
    moe = moe_modules(model)
    for i, block in enumerate(getattr(model, "blocks", [])):
        layer = moe.get(i)
        rows.append({"block": i, "ffn": "moe" if layer is not None else "dense",
                     "experts": layer.num_experts if layer is not None else "",
                     "top_k": layer.top_k if layer is not None else "",
                     "shared": layer.shared_expert_mode if layer is not None else "",
                     "params": sum(p.numel() for p in block.parameters())})
    return rows


def model_from_args(args, with_config: bool = False):
    """(model, name): the model of ``--checkpoint`` if given, else ``--model`` built with the MoE flags.
    ``with_config``: (model, name, the checkpoint's config or None)."""
    import timm

    from ..models import register
    from ..models.args import UsageError, check_model_kwargs, model_kwargs_from_args

    register()
    kwargs = model_kwargs_from_args(args)
    if getattr(args, "checkpoint", None):
        if kwargs:
            flags = ", ".join(sorted(f"--{k.replace('_', '-')}" for k in kwargs))
            raise UsageError(f"{flags} describe a new model, but --checkpoint {args.checkpoint} is built as it was "
                             "saved: drop them, or drop --checkpoint to build --model with them")
        model, config = load_model(args.checkpoint)
        return (model, config["model"], config) if with_config else (model, config["model"])
    check_model_kwargs(args.model, kwargs)
    model = timm.create_model(args.model, **kwargs)
    return (model, args.model, None) if with_config else (model, args.model)


def pruned_line(pruned: dict) -> str:
    """One line on what ``python -m workbench prune`` did to a checkpoint, from its config's ``pruned`` record."""
    if pruned.get("keep_experts"):
        what = f"{pruned.get('from_experts', '?')} -> {pruned['keep_experts']} experts per MoE layer"
    else:
        what = f"blocks {pruned.get('layers')} made dense"
    ft = pruned.get("finetune")
    return (f"pruned by {pruned.get('method')} ({what}) from {pruned.get('from', 'an earlier checkpoint')}"
            + (f", then fine-tuned {ft['epochs']} epoch{'s' if ft['epochs'] != 1 else ''} at lr {ft['lr']:g}"
               if ft else ", not fine-tuned"))
