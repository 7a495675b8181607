"""Model cards: what a checkpoint is and whether its routing means anything.

A card holds the facts of a checkpoint (architecture, which blocks are MoE, experts E, top-k, router, routing,
shared expert, parameters, accuracy from its config) and, per MoE layer, the project's own specialisation verdict:
the random-router test of :mod:`workbench.analysis.specialisation` (classifiers: class NMI of the first-choice
experts of patch tokens) or of :mod:`workbench.analysis.regions` (segmentation: NMI with the patches' majority
class), each against ``draws`` random routers of the trained router's norm on the same layer inputs, Holm-corrected
across the model's layers, on the first images of the fixed validation split.

The verdicts take minutes on a CPU, so they are computed once and cached as ``model_card.json`` beside the weights
(written atomically; a folder that cannot be written caches in ``$TMPDIR/vimoe-model-cards/``), keyed by the
SHA-256 of the weights file: changed weights are tested again.  A cached card tested with at least the requested
draws and images serves a request for fewer.  :class:`ModelCards` runs the tests one at a time in a background
thread on a model of its own, so the app stays responsive while a card is being made.  Long because a card's
life is one piece: its facts (a pruned checkpoint's lineage among them), the test, the cache and the background
runner the app polls; split, each part would import the others.

Imports: ``workbench.atomic``, ``workbench.data``, ``workbench.moe``, ``workbench.train.checkpoint`` and this
package's ``specialisation`` / ``regions`` / ``stats``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import tempfile
import threading
import time
from concurrent.futures import Future, wait as futures_wait
from dataclasses import dataclass, replace
from pathlib import Path

from ..atomic import atomic_write_text

CARD_FILE = "model_card.json"
CARD_VERSION = 1
DRAWS = 100  # random routers per layer
IMAGES = {"classification": 2000, "segmentation": 1000}  # first images of the validation split
VAL_SIZE = {"fashion-mnist": 10000, "fmnist-scenes": 2000}  # the studies' validation splits
ALPHA = 0.05
NOT_SPECIALISED = ("this layer's routing is not distinguishable from random routers: do not read class structure "
                   "into it")


class CardUnavailable(RuntimeError):
    """The verdicts cannot be computed here (no dataset, image routing on a segmentation model, ...)."""


def weights_file(path) -> Path:
    """The weights file of a checkpoint: a model folder's (or a run folder's model/) ``model.safetensors``, a run's
    ``checkpoint.pt``, or the file itself."""
    p = Path(path).expanduser()
    if p.is_dir():
        for candidate in (p / "model.safetensors", p / "model" / "model.safetensors", p / "checkpoint.pt"):
            if candidate.is_file():
                return candidate.resolve()
    return p.resolve()


_HASHES: dict[tuple, str] = {}
_HASH_LOCK = threading.Lock()


def weights_hash(path) -> str:
    """SHA-256 of the weights file (remembered per path, size and modification time)."""
    f = weights_file(path)
    st = f.stat()
    key = (str(f), st.st_size, st.st_mtime_ns)
    with _HASH_LOCK:
        if key in _HASHES:
            return _HASHES[key]
    with open(f, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    with _HASH_LOCK:
        _HASHES[key] = digest
    return _HASHES[key]


def card_locations(path, sha: str) -> list[Path]:
    """Where a card may be cached: beside the weights, then in the temp dir (by the weights' hash)."""
    f = weights_file(path)
    beside = f.with_name(CARD_FILE) if f.name == "model.safetensors" else f.with_name(f"{f.name}.{CARD_FILE}")
    return [beside, Path(tempfile.gettempdir()) / "vimoe-model-cards" / f"{sha[:24]}.json"]


def read_card(path, sha: str, draws: int, max_images: int) -> dict | None:
    """A cached card for these weights, tested with at least ``draws`` random routers and ``max_images`` images."""
    for loc in card_locations(path, sha):
        try:
            card = json.loads(loc.read_text())
        except (OSError, ValueError):
            continue
        test = card.get("test") or {}
        if (card.get("version") == CARD_VERSION and card.get("weights_sha256") == sha
                and test.get("draws", 0) >= draws and test.get("max_images", 0) >= max_images):
            card["cached_at"] = str(loc)
            return card
    return None


def write_card(path, card: dict) -> Path:
    """Write ``card`` atomically beside the weights, or in the temp dir where the folder cannot be written."""
    text = json.dumps({k: v for k, v in card.items() if k != "cached_at"}, indent=1) + "\n"
    beside, temp = card_locations(path, card["weights_sha256"])
    if os.access(beside.parent, os.W_OK):
        try:
            atomic_write_text(beside, text)
            return beside
        except OSError:  # read-only file system, or permissions that os.access did not see
            pass
    atomic_write_text(temp, text)
    return temp


def config_summary(config: dict) -> dict:
    """What a checkpoint is from its config alone (no weights read): task, whether it routes, experts."""
    kwargs = config.get("model_kwargs") or {}
    name = str(config.get("model", ""))
    if config.get("upcycle"):
        moe, experts = True, (config["upcycle"] or {}).get("num_experts", kwargs.get("num_experts"))
    else:
        layers = kwargs.get("moe_layers", "last-2" if name.startswith("vimoe") else "none")
        moe = name.startswith("vimoe") and layers not in ("none", [], ())
        experts = kwargs.get("num_experts", 8) if moe else None
    task = "segmentation" if name.startswith("vimoe_seg") or kwargs.get("task") == "segmentation" else \
        "classification"
    top_k = (config.get("upcycle") or {}).get("top_k", kwargs.get("top_k", 1)) if moe else None
    return {"model": name, "moe": moe, "num_experts": experts, "top_k": top_k, "task": task}


def checkpoint_name(path) -> str:
    """A short name: the model folder's name (a run folder's name for its model/)."""
    p = Path(path)
    if p.suffix in (".safetensors", ".pt"):
        p = p.parent
    if p.name == "model":
        p = p.parent
    return p.name or str(path)


def _label_extras(path, summary: dict, config: dict | None) -> list[str]:
    """['89.8%', '2/2 specialised']: accuracy from the config; layers a card cached for these weights calls
    specialised."""
    out = []
    try:
        acc = _accuracy(config or {}, summary["task"])  # an unreadable config: no accuracy, and no MoE to count
        out += [f"{acc['test_acc']:.1%}"] if "test_acc" in acc else [f"mIoU {acc['test_miou']:.2f}"] if \
            "test_miou" in acc else []
        if summary["moe"] and weights_file(path).with_name(CARD_FILE).is_file():
            card = read_card(path, weights_hash(path), 1, 1)
            if card and card.get("layers"):
                out.append(f"{sum(bool(v.get('specialised')) for v in card['layers'].values())}/{len(card['layers'])}"
                           " specialised")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return out


def checkpoint_choices(paths) -> list[tuple[str, str]]:
    """(short label, path) for each checkpoint: MoE classifiers first, then MoE segmentation models, then dense
    ones; each label is the folder's name (with its parent's where two names clash) and what the model is."""
    rows = []
    for path in map(str, paths):
        try:
            config = json.loads(weights_file(path).with_name("config.json").read_text())
            summary = config_summary(config)
        except (OSError, ValueError):
            config, summary = None, {"moe": False, "num_experts": None, "task": "classification", "model": ""}
        rows.append((path, checkpoint_name(path), summary, config))
    counts: dict[str, int] = {}
    for _, name, _, _ in rows:
        counts[name] = counts.get(name, 0) + 1
    out = []
    for path, name, s, config in rows:
        if counts[name] > 1:
            name = f"{Path(path).parent.name}/{name}"
        what = " · ".join(([] if s["task"] == "classification" else ["segmentation"]) +
                          [f"top-{s['top_k']}/{s['num_experts']}" if s["moe"] else "dense"] +
                          _label_extras(path, s, config))
        rank = (1 if s["task"] == "segmentation" else 0) if s["moe"] else 2
        out.append((rank, name, f"{name} · {what}", path))
    return [(label, path) for _, _, label, path in sorted(out)]


def _accuracy(config: dict, task: str) -> dict:
    shipped = config.get("shipped_test") or {}
    metrics = config.get("metrics") or {}
    out = {}
    if task == "segmentation":
        for key in ("miou", "pixel_acc"):
            value = shipped.get(key, metrics.get(f"test_{key}"))
            if value is not None:
                out[f"test_{key}"] = value
    else:
        value = shipped.get("acc", metrics.get("test_acc"))
        if value is not None:
            out["test_acc"] = value
    n = shipped.get("n", metrics.get("test_n"))
    if out and n:
        out["test_n"] = n
    for key in ("val_acc", "val_miou"):
        if metrics.get(key) is not None and (key == "val_acc") == (task == "classification"):
            out[key] = metrics[key]
    return out


def facts(model, config: dict) -> dict:
    """The card's facts from the loaded model and its config."""
    from ..moe import moe_modules

    task = getattr(model, "task", None) or "classification"
    moe = {k: m for k, m in moe_modules(model).items() if isinstance(k, int)}
    blocks = len(getattr(model, "blocks", []))
    embed = getattr(model, "patch_embed", None)
    train = config.get("train_config") or {}
    out = {"model": config.get("model"), "task": task, "blocks": blocks,
           "embed_dim": getattr(model, "embed_dim", None),
           "params": sum(p.numel() for p in model.parameters()),
           "input": list(getattr(embed, "img_size", ()) or ()), "patch": list(getattr(embed, "patch_size", ()) or ()),
           "in_chans": getattr(getattr(embed, "proj", None), "in_channels", None),
           "classes": getattr(model, "num_classes", None), "moe_blocks": sorted(moe)}
    if moe:
        first = moe[min(moe)]
        out.update({"num_experts": first.num_experts, "top_k": first.top_k, "router": first.router_type,
                    "routing": first.routing, "shared_expert": first.shared_expert_mode if first.shared_expert_mode not in (None, "", "none") else None,
                    "same_in_every_layer": len({(m.num_experts, m.top_k, m.router_type, m.routing)
                                                for m in moe.values()}) == 1})
    out["accuracy"] = _accuracy(config, task)
    out["dataset"] = train.get("dataset") or _guess_dataset(model)
    out["epochs"] = train.get("epochs")
    out["trained_with_val_size"] = train.get("val_size") or 0
    out["pruned"] = config.get("pruned")
    if (config.get("pretrain") or {}).get("from") or train.get("init_from"):
        pre = ((config.get("pretrain") or {}).get("metrics") or {}).get("test_acc")
        out["upcycled_from_dense"] = {"test_acc": pre}
    return out


def _guess_dataset(model) -> str | None:
    """The dataset a model without a training config was built for, from its shape."""
    embed = getattr(model, "patch_embed", None)
    chans = getattr(getattr(embed, "proj", None), "in_channels", None)
    size = tuple(getattr(embed, "img_size", ()) or ())
    if getattr(model, "task", None) == "segmentation":
        return "fmnist-scenes" if chans == 1 and getattr(model, "num_classes", None) == 11 else None
    return "fashion-mnist" if chans == 1 and size == (28, 28) and getattr(model, "num_classes", None) == 10 else None


def _validation(model, dataset: str | None, task: str, max_images: int):
    """The first ``max_images`` images of the fixed validation split, and the split's description."""
    from ..data.classification import DatasetNotFound

    if dataset not in VAL_SIZE or (dataset == "fmnist-scenes") != (task == "segmentation"):
        what = (f"dataset {dataset!r} has no validation split the card knows" if dataset else
                "the checkpoint records no dataset and its shape is not a Fashion-MNIST model's")
        raise CardUnavailable(f"{what} (the card tests Fashion-MNIST classifiers and Fashion-MNIST scene "
                              "segmenters)")
    val_size = VAL_SIZE[dataset]
    try:
        if task == "segmentation":
            from ..data.scenes import build_seg_splits

            _, val, _ = build_seg_splits(dataset, val_size=val_size, model=model, augment=False, train_size=1)
            n = min(max_images, len(val))
            return replace(val, images=val.images[:n], masks=val.masks[:n]), val_size
        from ..data.classification import build_splits

        _, val, _ = build_splits(dataset, val_size=val_size, model=model, augment=False, num_workers=0)
        n = min(max_images, len(val))
        return replace(val, images=val.images[:n], labels=val.labels[:n]), val_size
    except DatasetNotFound as err:
        raise CardUnavailable(f"the validation split needs Fashion-MNIST, which is not here: {err}") from None


def _round(v):
    return round(float(v), 6) if isinstance(v, float) and math.isfinite(v) else v


def verdicts(model, config: dict, *, draws: int = DRAWS, max_images: int | None = None, seed: int = 0) -> dict:
    """The ``test`` and ``layers`` parts of a card: per MoE layer, the random-router test's NMI, the random
    routers' mean, p, Holm's p across the layers and the verdict (``specialised``: p_holm < 0.05), with the
    balanced test's p beside it."""
    from ..moe import moe_modules

    task = getattr(model, "task", None) or "classification"
    max_images = max_images or IMAGES[task]
    info = facts(model, config)
    if not [k for k in moe_modules(model) if isinstance(k, int)]:
        raise CardUnavailable("a dense checkpoint has no routing to test")
    data, val_size = _validation(model, info["dataset"], task, max_images)
    started = time.perf_counter()
    if task == "segmentation":
        from .regions import region_report

        table = region_report(model, data, max_images=len(data), draws=draws, seed=seed, alpha=ALPHA)
        p_col, bal_col, kind = "p_nmi", "p_bal_nmi", "regions"
    else:
        from .specialisation import specialisation_report

        table, _ = specialisation_report(model, data, draws=draws, max_images=len(data), seed=seed, alpha=ALPHA)
        p_col, bal_col, kind = "p_random", "p_balanced", "classes"
    layers = {}
    for row in table.to_dict("records"):
        layers[str(int(row["block"]))] = {
            "nmi": _round(row.get("router_nmi", row.get("nmi"))), "random_nmi": _round(row["random_nmi"]),
            "p": _round(row[p_col]), "p_holm": _round(row["p_holm"]), "specialised": bool(row["specialised"]),
            "p_balanced": _round(row.get(bal_col))}
    test = {"kind": kind, "dataset": info["dataset"], "split": f"validation (val_size={val_size})",
            "images": len(data), "max_images": max_images, "draws": draws, "seed": seed, "alpha": ALPHA,
            "correction": "holm", "seen_in_training": not info["trained_with_val_size"],
            **_chosen_on(info.get("pruned"), len(data)),
            "seconds": round(time.perf_counter() - started, 1), "threads": _threads()}
    return {"test": test, "layers": layers}


def _chosen_on(pruned: dict | None, images: int) -> dict:
    """How many of the test's images (the validation split's first ones) chose a pruned model's experts."""
    method = (pruned or {}).get("method")
    if method == "densify":  # the merge weighs experts by their use on the whole validation split
        return {"chosen_on": images, "pruned_by": method}
    if method in (None, "reinit") or not pruned.get("calibration_images"):
        return {}
    return {"chosen_on": min(int(pruned["calibration_images"]), images), "pruned_by": method}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def model_card(path, *, draws: int = DRAWS, max_images: int | None = None, compute: bool = True,
               model=None, config: dict | None = None) -> dict:
    """The card of a checkpoint: the cached one when its weights and test still fit, else computed (``compute``)
    and cached.  Without ``compute`` a missing verdict is ``None`` under ``layers``.  ``model``: a loaded copy to
    read the facts from (never run: the test loads a model of its own, so a shared model's routing state is
    left alone)."""
    from ..train.checkpoint import load_model

    sha = weights_hash(path)
    own = None
    if model is None:
        own, config = load_model(weights_file(path))
        model = own
    task = getattr(model, "task", None) or "classification"
    want = max_images or IMAGES[task]
    card = read_card(path, sha, draws, want)
    if card is not None:
        card["facts"] = facts(model, config)  # always from the checkpoint as it is now
        return card
    card = {"version": CARD_VERSION, "checkpoint": checkpoint_name(path), "weights_sha256": sha,
            "facts": facts(model, config), "test": None, "layers": None}
    if not card["facts"]["moe_blocks"] or not compute:
        return card
    if own is None:
        own, config = load_model(weights_file(path))
    card.update(verdicts(own, config, draws=draws, max_images=want))
    card["cached_at"] = str(write_card(path, card))
    return card


@dataclass
class CardState:
    """A card as far as it is known: ``card`` (facts always; verdicts once tested), ``pending`` while its test
    runs, ``error`` when it cannot run."""

    card: dict | None
    pending: bool = False
    error: str | None = None


class ModelCards:
    """Cards for the app: facts at once, verdicts from the cache or from a background test (one at a time), so
    that no request waits minutes.  ``draws`` / ``max_images`` default to DRAWS / IMAGES, or to the environment's
    ``WORKBENCH_CARD_DRAWS`` / ``WORKBENCH_CARD_IMAGES`` (quick cards for tests)."""

    def __init__(self, draws: int | None = None, max_images: int | None = None):
        self.draws = draws or int(os.environ.get("WORKBENCH_CARD_DRAWS", DRAWS))
        env_images = os.environ.get("WORKBENCH_CARD_IMAGES")
        self.max_images = max_images or (int(env_images) if env_images else None)
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._jobs: dict[tuple, Future] = {}
        self._lock = threading.Lock()

    def _submit(self, fn, *args, **kwargs) -> Future:
        """Run ``fn`` on the one worker thread, a daemon (unlike a ThreadPoolExecutor's, which the interpreter
        waits for at exit: stopping the app must not wait minutes for a card)."""
        job: Future = Future()
        self._queue.put((job, fn, args, kwargs))
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="model-card", daemon=True)
            self._worker.start()
        return job

    def _work(self) -> None:
        try:  # Linux: a thread's own niceness; the app's requests come first while a card is tested
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        while True:
            job, fn, args, kwargs = self._queue.get()
            if not job.set_running_or_notify_cancel():
                continue
            try:
                job.set_result(fn(*args, **kwargs))
            except BaseException as err:  # noqa: BLE001 (handed to whoever waits for the card)
                job.set_exception(err)

    def _images(self, task: str) -> int:
        return self.max_images or IMAGES[task]

    def state(self, path, model, config: dict, start: bool = True) -> CardState:
        """The card of ``path`` now: cached, pending (its test started unless ``start`` is False) or failed."""
        try:
            sha = weights_hash(path)
        except OSError as err:
            return CardState(None, error=f"cannot read the weights: {err}")
        task = getattr(model, "task", None) or "classification"
        key = (str(weights_file(path)), sha, self.draws, self._images(task))
        with self._lock:
            job = self._jobs.get(key)
        if job is not None and job.done():
            err = job.exception()
            if err is None:
                return CardState(job.result())
            return CardState({"facts": facts(model, config), "layers": None, "test": None}, error=_reason(err))
        card = read_card(path, sha, self.draws, self._images(task))
        if card is not None:
            card["facts"] = facts(model, config)
            return CardState(card)
        bare = {"checkpoint": checkpoint_name(path), "weights_sha256": sha, "facts": facts(model, config),
                "layers": None, "test": None}
        if not bare["facts"]["moe_blocks"]:
            return CardState(bare)
        if job is None and start:
            with self._lock:
                if key not in self._jobs:
                    self._jobs[key] = self._submit(model_card, path, draws=self.draws,
                                                   max_images=self._images(task))
                job = self._jobs[key]
        return CardState(bare, pending=job is not None)

    def wait(self, path, model, config: dict, timeout: float | None = None) -> CardState:
        """:meth:`state`, after waiting (up to ``timeout`` seconds) for a running test."""
        task = getattr(model, "task", None) or "classification"
        key = (str(weights_file(path)), weights_hash(path), self.draws, self._images(task))
        with self._lock:
            job = self._jobs.get(key)
        futures_wait([job] if job is not None else [], timeout=timeout)
        return self.state(path, model, config, start=False)

    def join(self, timeout: float | None = None) -> bool:
        """Wait (up to ``timeout`` seconds) for every card test started so far; True when none still runs."""
        with self._lock:
            jobs = list(self._jobs.values())
        return not futures_wait(jobs, timeout=timeout).not_done


def _reason(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if isinstance(err, CardUnavailable) else f"{type(err).__name__}: {text}"[:300]
