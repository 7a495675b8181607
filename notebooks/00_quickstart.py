# %% [markdown]
# # 00 Quickstart: build, upcycle, profile, route
#
# **Question.** How is a ViMoE built, upcycled from a dense model, profiled and inspected here, and what do the
# shipped checkpoints score?

# %%
import os, warnings
os.environ.setdefault("OMP_NUM_THREADS", "2")
warnings.filterwarnings("ignore")
import torch, timm, pandas as pd
import workbench
from workbench.studies import answer
torch.manual_seed(0)
torch.set_num_threads(2)
pd.set_option("display.width", 120)
ROOT = os.path.abspath("..")
answer.checkpoints()

# %% [markdown]
# **What it means.** The shipped ViMoE is the shipped dense model upcycled and fine-tuned; its score is recomputed
# below on the full test set and checked against this record.
#
# A ViMoE is a timm Vision Transformer whose FFN in chosen blocks is a routed mixture of experts. Importing `workbench` registers the `vimoe_*` models.

# %%
model = timm.create_model("vimoe_tiny_patch4_28", moe_layers="last-2", num_experts=8, top_k=1,
                          shared_expert="add")
print("MoE blocks:", model.moe_layer_indices)
print(model.blocks[5].mlp)
print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")

# %% [markdown]
# ## Upcycling
#
# Sparse upcycling turns a dense ViT into a ViMoE: every expert starts as a copy of the dense FFN, the router is new. With gates that sum to 1 the upcycled model computes exactly what the dense one did. We start from the shipped dense tiny ViT (trained on Fashion-MNIST).

# %%
from workbench.train.checkpoint import load_model
dense, dense_config = load_model(os.path.join(ROOT, "experiments/checkpoints/vimoe_tiny_fmnist_dense"))
moe = workbench.upcycle(dense, moe_layers="last-2", num_experts=8, top_k=1, renormalize=True).eval()
x = torch.randn(8, 1, 28, 28)
with torch.no_grad():
    gap = (moe(x) - dense(x)).abs().max().item()
print("upcycled == dense (max abs diff < 1e-5):", gap < 1e-5)

# %% [markdown]
# ## Profile
#
# Parameters and activated MACs per image, against the dense-equivalent model.

# %%
from workbench.analysis.flops import profile
s = profile(moe).summary()
print(f"params {s['params']:,} (x{s['params_x']} dense), active per token {s['active_params']:,}, "
      f"{s['gmacs']:.4f} GMACs (x{s['macs_x']} dense)")

# %% [markdown]
# ## The shipped ViMoE
#
# `experiments/checkpoints/vimoe_tiny_fmnist`: the dense model above, upcycled (last 2 blocks, 8 experts, top-1, shared expert) and fine-tuned (`experiments/default/train.sh`). Its accuracy on the full Fashion-MNIST test set, recomputed here and checked against the record:

# %%
from workbench.train.checkpoint import load_model
from workbench.data.classification import build_datasets
from workbench.train.metrics import evaluate
CKPT = os.path.join(ROOT, "experiments/checkpoints/vimoe_tiny_fmnist")
model, config = load_model(CKPT)
_, test = build_datasets("fashion-mnist", model=model)
labels = model.pretrained_cfg["label_names"]
import json
recorded = json.load(open(os.path.join(CKPT, "config.json")))["shipped_test"]["acc"]
acc = evaluate(model, test)["acc"]
print(f"recorded test accuracy {recorded:.4f}; recomputed here within 0.002 of it: {abs(acc - recorded) < 0.002}")

# %% [markdown]
# ## Route one image
#
# `run_with_routing` returns the logits and a routing cache keyed by block: per patch, the router probabilities, chosen experts and gates, on the 7x7 patch grid.

# %%
from workbench.analysis.routing import run_with_routing
from workbench import viz
images, y = next(test.batches(8, shuffle=False))
logits, cache = run_with_routing(model, images)
print("cached blocks:", cache.layers(), "| probs", tuple(cache[5].probs.shape), "| experts", tuple(cache[5].experts.shape))
print("image 0: label", labels[int(y[0])], "-> predicted", labels[int(logits[0].argmax())])
print("experts used by its patches in block 5:", sorted(set(cache[5].top1()[0].flatten().tolist())))

# %%
viz.patch_overlay(images[0], cache[5], title=f"Block 5: expert per patch ({labels[int(y[0])]})")

# %% [markdown]
# Each colour is one expert, everywhere in the workbench (notebooks and app); opacity follows the gate. `python app.py` shows the same for any uploaded image.
