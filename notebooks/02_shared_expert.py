# %% [markdown]
# # 02 Shared expert: better, and stable across configurations?
#
# **Question.** The paper says an always-on shared expert (DeepSeekMoE: `y = shared(x) + sum_j g_j E_j(x)`)
# makes ViMoE stable, so no repeated trials are needed to find a good configuration.

# %%
import os, warnings
warnings.filterwarnings("ignore")
import pandas as pd
import workbench
from workbench import viz
from workbench.studies import answer, report
pd.set_option("display.width", 140)
from workbench.studies import regime
REGIME = [("transfer regime: base pretrained on 5 classes, equal parameters, 8 seeds", "experiments/studies/regime/upcycle_half.yaml"),
          ("upcycle regime: re-warmed fine-tune, equal parameters, 8 seeds", "experiments/studies/regime/upcycle4.yaml")]
ANSWER = answer.show(["shared_expert"], confirm=["confirm", "confirm_shared"], regime=REGIME,
                     ids=["shared-narrows-placement-range", "shared-lifts-worst-placement", "shared-beats-top2-last2", "shared-beats-top2-all", "fine-grained-beats-top1-last2",
                          "fine-grained-beats-top1-all", "shared-makes-placement-matter-less", "shared-init-copy-vs-zero",
                          "shared-lowers-seed-spread"])
ANSWER

# %% [markdown]
# **What it means.** The paper's claim is about stability *across configurations*: the second column (`regime/upcycle4.yaml`) tests it as an
# interaction (per seed, the spread of accuracy over three placements with a shared expert against without, at equal
# total and activated parameters), in a fine-tune meant to move the arms. All 56 runs are in, and its claim-2
# verdicts are *void*: three of the six arms every claim-2 test reads (last-2, first-2, last-2 with a shared expert)
# failed a pre-registered check that they learned (notebook 01), so the figure that follows describes and decides
# nothing. The earlier records are void too, by checks added to their files after their runs with the regime's
# thresholds (a check added afterwards can only void a verdict): trained from scratch for 3 epochs, every arm was
# still gaining 1.8-3.2 validation points in its last epoch (the plateau rule allows 0.3); upcycled with the
# earlier low-lr fine-tune, the arms' predictions stayed within the dense control's seed noise and, in the 4x4-base
# study (`upcycle_p7` recorded no spread), the experts stayed near-copies.
# Their estimates (top-1 with a shared expert ahead of top-2 in the last two blocks on the larger scratch
# confirmation, for one) describe those regimes and decide nothing: no study here has a verdict on claim 2. Two
# schedule pilots (8 epochs; a peak lr of 2e-3) then failed their pre-registered rules (notebook 01), so by the
# files' limit claim 2 is unanswerable in the upcycle protocol under the schedules those files allow. A third pilot
# on an avg-pooled twin of the base (every patch token reaches the prediction) failed its rule the same way
# (last-2's predictions-moved 0.4569, last-2-shared's 0.6235; notebook 01), so its confirmatory file was not run and
# claim 2 is unanswerable for that model under that schedule too. A fourth pilot, in a transfer regime (a base
# pretrained on five of the ten classes, every arm fine-tuned on all ten; 7x7 patches), adopted its schedule: every
# arm moved (notebook 01). Its confirmatory study, `regime/upcycle_half.yaml`, tests claim 2 there as the same
# interaction across placements at equal parameters. All 56 of its runs are in, every arm passes every check, and
# **no evidence that the shared expert made placement matter less**: per seed, the range of test accuracy across the three
# placements was 0.135 points *wider* with a shared expert [-0.117, +0.387] (*inconclusive*), the worst placement
# with a shared expert was 0.289 points *less* accurate than the worst without [-0.461, -0.116] (*disagrees* in the
# file, Holm p = 0.033; the project-wide Holm view reads it *inconclusive*, BH *disagrees*), and in the last two
# blocks the shared expert did not differ detectably from top-2 of 9 at equal parameters (-0.009 [-0.220, +0.202],
# *inconclusive*: differences of 0.2 points either way are not excluded). The
# section *Claim 2 in the transfer regime* below has the figure and the limits.
#
# ## Method
#
# A shared expert adds a full FFN of activated compute per MoE layer, so "with vs without" is unfair
# unless FLOPs are matched. The claims compare at **equal activated FLOPs** (the regime studies also at equal
# total and activated expert parameters; the earlier studies below do not: last-2 with a shared expert holds 0.735M
# parameters against top-2's 0.669M, and they are void anyway):
#
# * top-1 + shared expert against top-2 without (both run two FFN-widths per token);
# * the fine-grained split (DeepSeekMoE-style: a shared expert of half width + routed experts of half width, top-1)
#   against plain top-1, which has the dense model's FLOPs.
#
# Under the upcycle protocol the shared expert must start function-preserving: `zero` (a copy of the FFN with a
# zeroed output projection) or `split` (the FFN's hidden units divided between shared and routed experts); the
# `copy` initialisation (the block starts at twice the FFN) is the ablation. "Stability" is the seed standard
# deviation: a paired bootstrap interval of the SD difference, decided by the Pitman-Morgan test of equal variances
# for paired samples. Controls come from the placement study (same seeds, same schedule).

# %% [markdown]
# ## Claim 2 in the transfer regime (`upcycle-half-regime`)
#
# **Regime** (notebook 01 shows its checks, each run's accuracy and the shares of changed predictions): every arm
# upcycled from the 7x7 dense base pretrained on five of the ten classes, fine-tuned on all ten for 4 epochs
# (re-warmed to a peak lr of 1e-3), seeds 950-957, every run from one clean commit. Each placement is trained twice
# at equal total and activated parameters, as below for upcycle4-regime: top-2 of 9 routed experts, and top-1 of 8
# plus a zero-initialised shared expert of the same width. The file's reading rules, fixed before its runs: range is
# read as "less sensitive to placement" only if claim 1's early-moe-hurts or all-layers-hurt agrees; the worst
# placement is secondary; "agrees" needs a Holm-significant interval on the claimed side.

# %%
h = regime.load("upcycle_half")
print(regime.status(h))
grid_half = regime.placement_grid(h)
viz.placement_interaction(grid_half, reference=regime.control_mean(h), reference_name="dense control (mean)",
                          names=("top-2 of 9, no shared expert", "top-1 of 8 + shared expert"),
                          title="Transfer regime: test accuracy per placement, without and with a shared expert")

# %%
ranges_half = regime.placement_ranges(grid_half)
display(answer.Table(ranges_half, caption="Per seed: range of test accuracy (points) across the three placements "
                     "and the worst placement's accuracy (%), without and with a shared expert"))
answer.Table(ranges_half.groupby("shared")[["range", "worst"]].mean().round(3).reset_index(),
             caption="Means over the 8 seeds")

# %% [markdown]
# **What it shows.** Every arm learned by the file's checks (notebook 01). Without a shared expert the three
# placements' per-seed range of test accuracy was 0.242 points on average (largest 0.48); with a shared expert,
# 0.377 on average (largest 0.90): the range claim's estimate (+0.135 [-0.117, +0.387]) is on the side the paper
# does not claim and inconclusive, and its interval, 0.503 points wide, is just over the 0.5-point standard. By
# rule (a) it could not have been read as "less sensitive to placement" anyway: neither of claim 1's "hurt" claims
# agrees in this regime (notebook 01). The worst placement was worse with a shared expert (85.52% against 85.81%
# on average; with a shared expert first-2 was the worst on 5 of 8 seeds), so the secondary claim disagrees in the
# file (-0.289 [-0.461, -0.116], Holm p = 0.033; the project-wide Holm view reads it *inconclusive*, BH
# *disagrees*). That mostly reflects a lower level rather than more sensitivity to placement: averaged over the
# three placements the shared arms were lower by 0.214 points [-0.333, -0.095] (exploratory, not a claim), and
# two of them varied more from seed to seed (SD 0.31 and 0.28 against 0.16-0.19), which pulls a worst-of-three
# down further. At equal parameters in the last two blocks, a shared expert beside top-1 of 8 did not differ
# detectably from top-2 of 9 (-0.009 [-0.220, +0.202], inconclusive, 0.42 points wide: differences of 0.2 points
# either way are not excluded). What this design cannot separate: the shared-expert arms also route top-1 instead
# of top-2, and add the shared branch instead of averaging two routed ones. These verdicts concern this transfer
# regime and this 7x7 model only.

# %% [markdown]
# ## Claim 2 as stated: the interaction across placements (`upcycle4-regime`)
#
# **Regime** (notebook 01 shows its checks and curves): upcycled from the 4x4 base with function-preserving starts,
# a re-warmed 4-epoch fine-tune, seeds 300-307. Each placement (last-2, first-2, all) is trained twice at equal total
# and activated parameters: top-2 of 9 routed experts, and top-1 of 8 plus a shared expert of the same width
# (initialised with a zero output projection, so the start is the base). "Stable across configurations" reads as
# the flatter profile below; the pre-registered test is the per-seed range across the three placements, with minus
# without a shared expert (`shared-narrows-placement-range`), read as "less sensitive to placement" only if
# placement matters without a shared expert (claim 1's `early-moe-hurts` or `all-layers-hurt` agrees). The checks
# void these claims here, so the figure and table describe the 8 seeds and decide nothing.

# %%
s = regime.load("upcycle4")
print(regime.status(s))
grid = regime.placement_grid(s)
viz.placement_interaction(grid, reference=regime.control_mean(s, seeds=sorted(set(grid["seed"]))),
                          names=("top-2 of 9, no shared expert", "top-1 of 8 + shared expert"))

# %%
answer.Table(regime.placement_ranges(grid), caption="Per seed: range of test accuracy (points) across the three "
             "placements and the worst placement's accuracy (%), without and with a shared expert")

# %% [markdown]
# ## Results of the earlier studies

# %%
contrasts = report.show_summary("shared_expert")

# %% [markdown]
# Clean starts of the upcycled arms (see notebook 01): `zero` and `split` must start at the base; `copy` is the
# ablation that does not, and its step-0 accuracy shows how far from the base it starts.

# %%
display(answer.Table(report.clean_starts("shared_expert")))

# %%
viz.forest_plot(contrasts, title="Shared expert: paired difference from the dense control (95% CI)")

# %% [markdown]
# Why the earlier upcycle claims read void: the share of test images whose predicted class differs from the dense
# control's on the same seed, beside the share that differs between two seeds of the dense control itself. An
# arm that changes fewer predictions than 0.8 times seed noise fails its predictions-moved check (notebook 01
# shows the same for placement); the copy ablation moves past it and fails experts-moved in the 4x4 study (in
# `upcycle_p7` it passes its only check; copy-vs-zero is void there through the zero arm).

# %%
for protocol in ("upcycle", "upcycle_p7"):
    print(f"{report.label(protocol)}:")
    display(answer.Table(report.prediction_changes("shared_expert", protocol)))

# %% [markdown]
# ## Finding
#
# In words: each claim of the table at the top, one sentence per study, generated from the records (so the words
# cannot drift from the numbers). How the verdicts are decided, and how far they reach, follows.

# %%
ANSWER.findings()

# %% [markdown]
# ### How the verdicts are decided
#
# Pre-registered claims, each with its interval and verdict (paired by seed; Holm across the study's directional claims;
# the spread claim by the Pitman-Morgan test, in the same Holm family, beside a bootstrap interval of the SD difference).
# That test replaced, after these studies were recorded, a rule that decided the spread claim by its bootstrap
# interval alone and kept it out of the Holm family: `upcycle_p7`'s shared-beats-top2-all (+0.074 points, about 7
# of 10,000 test images) went from *agrees* to *inconclusive* because the family grew (now void under the added
# checks). With 5 seeds the test has
# little power and one outlying seed can sway it. *void*: the claim reads an arm that failed a check that it learned
# (plateau or movement); its estimate is printed and decides nothing.

# %%
tables = report.show_claims("shared_expert")
print("verdicts:", report.verdict_counts(tables))

# %% [markdown]
# What the void upcycle estimates describe. The arms changed fewer test predictions against the dense control than
# two seeds of the dense control differ by (printed above; the copy ablation is the exception), and in the 4x4
# study (`upcycle_p7` recorded no spread) their experts stayed near-copies (notebook 03): this fine-tune (2 epochs, lr 1e-4 to 1e-5 from a converged base) barely moved
# any arm, which is why these claims are void rather than evidence about shared experts. The copy-vs-zero estimate
# measures recovery from the copy's damaged start (its step-0 accuracy is in the clean-start table) within that
# schedule. The regime study at the top is the test in a fine-tune meant to move the arms.

# %% [markdown]
# ## Confirmation on 16 fresh seeds
#
# The equal-FLOP pair in the last two blocks (top-1 + shared vs top-2) is a headline claim. It was repeated with
# 16 fresh seeds in the confirmatory study, whose sample size was fixed from this pilot (see notebook 01). Like
# every 3-epoch scratch study it fails the plateau check, so its verdicts read void:

# %%
_ = report.show_claim_kinds("confirm", ids=["shared-beats-top2-last2"])

# %% [markdown]
# ### A second confirmation, sized for +/-0.5 points
#
# On those 16 seeds the interval was wider than the +/-0.5 points the protocol asks of a headline contrast. From
# their paired SD (1.147 points) a second study, `experiments/studies/scratch/confirm_shared.yaml` (claim and
# sample size committed before its runs), trains both arms on 24 fresh seeds. Its verdict uses those 24 seeds only.
# The 16-seed estimate (also void) stands beside it, and there is no third run. Since this is the claim's second test, it is
# read by the two confirmations taken as one Holm family (each study's Holm p adjusted again across the two), so
# that repeating a test cannot make a claim agree more often than 5% of the time: `family_verdict` below.

# %%
_ = report.show_summary("confirm_shared")
tables = report.show_claims("confirm_shared")
print(report.half_widths(tables) or "no interval yet")
repeated = report.repeated_claim("shared-beats-top2-last2", kinds=("confirm", "confirm_shared"))
display(answer.Table(repeated.drop(columns=["expect", "margin"]).round(4)))

# %% [markdown]
# ## Live regeneration check
#
# The fine-grained arm at a tiny budget, from scratch, one thread: digits `pytest --nbval` compares exactly
# (a regression check, not a result).

# %% jupyter={"source_hidden": true} tags=["live-check"]
slice_ = report.live_slice("shared_expert", "scratch", "last-2-fine", seed=0)
print(f"scratch last-2-fine seed 0, tiny budget: test acc {slice_['test_acc']:.4f}, "
      f"train loss {slice_['history'][-1]['train_loss']:.6f}, GMACs {slice_['gmacs']:.6f}")
