# %% [markdown]
# # 06 Semantic segmentation: placement, shared expert, and routing against ground-truth regions
#
# **Question.** The paper studies ViMoE on image classification and semantic segmentation. Do its placement and
# shared-expert findings hold when every pixel must be labelled? And since every patch here has a true class,
# does routing follow *what* is in a patch (its class, object vs background) or *where* it is, and at which depth?

# %%
import json, warnings
warnings.filterwarnings("ignore")
import pandas as pd
import workbench
from workbench import studies as st, viz
from workbench.studies import answer, report
from workbench.train.checkpoint import load_model
from workbench.data.scenes import SCENE_CLASSES, example_scenes
pd.set_option("display.width", 160)
REGIME = [("transfer regime: base pretrained on 5 classes, 8 seeds", "experiments/studies/regime/seg_transfer.yaml"),
          ("claim 3's premise: its all arm, 8 new seeds", "experiments/studies/regime/seg_transfer_routing.yaml")]
ANSWER = answer.show(["segmentation"], regime=REGIME)
ANSWER

# %% [markdown]
# **What it means.** The first column is the study that decides claims 1 and 2 for segmentation: every arm upcycled
# from a dense base that had seen five of the ten classes and fine-tuned on all ten, each arm's experts, routers and
# pixel predictions checked to have moved (last-2's predictions only about as much as two dense seeds differ), the
# dense control checked to have learned the new classes, all 56 runs in. There neither claim holds: MoE in the last
# two blocks did not beat the dense control (a gain of 0.2 points of mIoU is excluded), MoE in the first two blocks
# or in all four segmented *better* than in the last two (+0.81 and +0.61 points), and a shared expert changed
# neither how much placement mattered nor the worst placement by 0.2 points or more (per-claim 95% intervals; the
# worst-placement one ends 0.013 short of the margin). The columns after the second are the earlier scratch study: every arm
# gained 0.40-0.60 points of validation pixel accuracy in the last of its 3 epochs (median over seeds; validation
# mIoU rose 1.6-2.5 points, medians over seeds from each record's per-epoch history), so it fails the plateau check (added to its file after its runs with the threshold the
# classification regime files fixed beforehand, at most 0.3 points over the last third; a check added afterwards can
# only void a verdict) and its claims read *void*. Its estimates describe early training with a linear head.
# The second column tests claim 3's premise on the first column's all-MoE arm, 8 new seeds, 100 random routers per
# block: the last block's class NMI is below random routers' (-0.169, partly NMI's favour for unevenly loaded
# routers) and, at equal loads, -0.029 [-0.050, -0.007], significant in its file only (project-wide Holm
# *inconclusive*): no sign of class specialisation; no block passes the random-router test in any seed, and the routing follows patch position instead; so the premise
# is not shown in segmentation and claim 3 itself is not tested here (the section at the end).
#
# ## Method
#
# Fashion-MNIST scenes: 56x56 canvases with 1-4 Fashion-MNIST items at random positions and scales,
# occluding each other, on plain or lightly textured backgrounds; the label of a pixel is its item's class + 1
# (0 = background). Train scenes draw items only from the training images (minus the validation hold-out), test
# scenes only from the test set; 2,000 fixed test scenes. The model is the segmentation micro ViMoE (d = 64,
# 4 blocks, 7x7 patches: an 8x8 grid) with DINOv2's linear head on the last block's patch tokens. Scored by test
# mIoU over the 11 classes. Routing against regions: each patch's majority label, its expert in each MoE block,
# NMI/AMI between them, against random routers of the trained norm on the same layer inputs (the baseline an
# untrained router must fail), and the same at equal expert loads (the balanced test).
#
# * **Transfer regime (the decisive columns)**: every arm upcycled from a dense segmentation model pretrained on
#   scenes of labels 0-4 only (`experiments/checkpoints/vimoe_seg_micro_scenes_dense_half`), function-preserving
#   starts, then fine-tuned on scenes of all ten with the dense control on the identical schedule; checks that the
#   experts, routers and pixel predictions moved, written before the runs. Claims 1 and 2:
#   `experiments/studies/regime/seg_transfer.yaml` (8 seeds, 20 random routers per block); claim 3's premise:
#   `regime/seg_transfer_routing.yaml` (8 new seeds, 100 random routers per block).
# * **Scratch (the earlier study, void)**: trained from random initialisation with the identical budget and data
#   order per seed (3 epochs), 50 random routers per block; `experiments/studies/scratch/segmentation.yaml`,
#   written before its runs.

# %% [markdown]
# ## Data: scenes and their masks

# %%
images, masks = example_scenes(4)
viz.segmentation_panels([{"image": images[i, 0].numpy(), "ground truth": masks[i].numpy()} for i in range(4)],
                        SCENE_CLASSES, title="Fashion-MNIST scenes (test set) and their ground truth")

# %% [markdown]
# ## The shipped segmentation ViMoE
#
# `experiments/checkpoints/vimoe_seg_micro_scenes`: MoE in the last two blocks, 8 experts, top-1 + a shared expert,
# the progressive decode head, 5 epochs on 20,000 scenes (`experiments/segmentation/train.sh`). Its test scores as
# recorded when it was shipped (after the fp16 round trip):

# %%
shipped = json.load(open("../experiments/checkpoints/vimoe_seg_micro_scenes/config.json"))["shipped_test"]
print(f"test mIoU {shipped['miou']:.4f}, pixel accuracy {shipped['pixel_acc']:.4f} over {shipped['n']} scenes")
print(pd.Series(shipped["iou"], index=SCENE_CLASSES, name="IoU").round(4).to_string())

# %%
model, _ = load_model("../experiments/checkpoints/vimoe_seg_micro_scenes")
viz.segmentation_panels(report.scene_rows(model, 4), SCENE_CLASSES,
                        title="Shipped model: ground truth, prediction, and the expert of each patch per MoE block")

# %% [markdown]
# ## Placement and shared expert
#
# Means over seeds (mIoU), parameters and activated GMACs per image, then each config paired by seed against the
# dense model.

# %%
contrasts = report.show_summary("segmentation")

# %%
viz.forest_plot(contrasts, title="Segmentation: paired difference in mIoU from the dense model (95% CI)",
                unit="mIoU points")

# %% [markdown]
# ## Routing against ground-truth regions
#
# Per config and MoE block, over seeds: the class NMI of the trained routers beside the random routers' (`nmi`,
# `random_nmi`), AMI, how many seeds beat the random routers after Holm (`specialised`), object vs background,
# class among object patches only, interior vs boundary patches, and position.

# %%
regions = report.region_table("segmentation", "scratch")
regions

# %%
viz.regions_by_depth(st.load_regions(report.study_file("segmentation", "scratch"), ["all"]),
                     title="All-MoE model: routing vs patch class, object/background and position, by depth")

# %% [markdown]
# ### A check of the baseline on the shipped model
#
# NMI divides the mutual information by the mean of the class and expert entropies. The trained routers are kept
# evenly loaded by the balance loss (expert entropy near ln 8 = 2.08 nats), random routers are not, so for the same
# information a random router gets the higher NMI. The study recorded NMI only (its weights are not kept), so here is
# the shipped segmentation model on the first 500 validation scenes with the raw mutual information (nats) and the
# expert entropies beside NMI, against 200 random routers (enough for a layer to be able to pass Holm's correction):

# %%
from workbench.analysis.regions import region_report
from workbench.data.scenes import build_seg_splits
_, val_scenes, _ = build_seg_splits("fmnist-scenes", val_size=2000, model=model, augment=False)
check = region_report(model, val_scenes, max_images=500, draws=200)
print(check.set_index("block")[["nmi", "random_nmi", "p_nmi", "mi", "random_mi", "p_mi", "expert_entropy",
                                 "random_expert_entropy", "object_only_nmi", "random_object_only_nmi",
                                 "position_nmi", "random_position_nmi", "p_position_nmi"]].round(4).T.to_string())

# %% [markdown]
# The same comparison at equal loads (the balanced test, see notebook 03): the trained router and each random one
# get per-expert biases that give every expert the same number of patches, so NMI and MI rank alike.

# %%
print(check.set_index("block")[["bal_nmi", "bal_random_nmi", "p_bal_nmi", "bal_mi", "bal_random_mi", "p_bal_mi",
                                 "p_holm_balanced", "specialised_balanced"]].round(4).T.to_string())
above = check["bal_nmi"] > check["bal_random_nmi"]
print(f"at equal loads the trained routers' NMI is above the random routers' mean in {int(above.sum())} of "
      f"{len(check)} blocks (by {(check['bal_nmi'] - check['bal_random_nmi']).min():+.4f} to "
      f"{(check['bal_nmi'] - check['bal_random_nmi']).max():+.4f}); specialised after Holm: "
      f"{int(check['specialised_balanced'].sum())} of {len(check)}")

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
# Each pre-registered claim with its interval and verdict.

# %%
tables = report.show_claims("segmentation")
print("verdicts:", report.verdict_counts(tables))
print(report.half_widths(tables))

# %% [markdown]
# How to read these verdicts. The paired-contrast table and forest plot above are exploratory (Holm across all six
# configs); the verdicts are the pre-registered claims (Holm across their directional members), so a config can look
# significant there and be inconclusive here. The shared-expert claims compare at equal activated FLOPs (top-1 +
# shared against top-2, the GMACs column) but not at equal parameters: the shared arms carry one more FFN per MoE
# layer (the params column). The spread claim is decided by the Pitman-Morgan test of equal variances for paired
# seeds (in the Holm family), its interval a percentile bootstrap of the SD difference; until that test was used
# the bootstrap interval alone decided it and read *agrees*, which with 5 seeds runs narrow. The budget is short and the head the lightest (the linear head on the
# 8x8 grid, 3 epochs on 10,000 scenes, label smoothing 0.1 per pixel; mIoU about 0.2, against the shipped model's
# 0.39 with the progressive head after 5 epochs on 20,000), so the placement and shared-expert estimates are
# statements about early training with a linear head, and the plateau check voids their verdicts.
#
# Routing against regions: the recorded baseline compares NMIs, and NMI favours the unevenly loaded random routers
# (see the check on the shipped model: there the raw mutual information of the trained routers is about that of
# random ones while their NMI is lower). So the study's NMI table cannot say that trained routers carry *less* class
# information than random ones. The balanced test on the shipped model compares at equal loads, like for like; its
# printed Holm-adjusted p decides there. Two more limits: with 50 random routers the smallest
# p-value is 1/51, which Holm's correction over four blocks lifts above 0.05, so `specialised` could not come out
# true in the all-MoE arms (the check above uses 200); and a patch's label is mostly object vs background (class
# NMI among object patches alone, `object_only_nmi`, is at the random level). The depth-trend claim's void estimate
# has the NMI excess over random routers rises with depth; in the all-MoE arm that is a deficit shrinking, while
# the trained NMI itself falls with depth. Position: `position_nmi` exceeds `random_position_nmi` in every block,
# most in the first; the check above shows the same beyond 200 random routers. So, descriptively, the trained
# routers carry more about the patch's position than random ones do, and this test does not show more about its
# class (with 50 draws no block could pass Holm); NMIs over 64 positions and 11 classes are not comparable in size,
# only each against its own baseline. The transfer regime below tests both, with 100 draws, as claims.

# %% [markdown]
# ## A regime whose arms are checked: the segmentation transfer pilot
#
# **Question.** Every verdict above is void because the scratch arms had not finished learning. Is there a
# segmentation regime in which upcycled arms are checked to have learned, as the classification transfer regime's
# are (notebook 01)? **Regime.** `pilots/seg_transfer.yaml` (written and reviewed before its runs): a dense
# segmentation micro ViT (linear head) trained 20 epochs on 20,000 scenes whose items are labels 0-4 only
# (`experiments/segmentation/dense_half.yaml`, shipped as `vimoe_seg_micro_scenes_dense_half`); every arm upcycled
# from it (function-preserving starts, asserted) and fine-tuned 4 epochs on 20,000 scenes of all ten classes, so it
# must learn to segment five classes its base never saw. The seven arms of the classification regime (dense;
# last-2, first-2, all with top-2 of 9; the same with top-1 of 8 + a shared expert), seeds 980-981. **Rule (1)**:
# every arm's experts, routers and pixel predictions moved (the classification thresholds), the dense control
# beats the base's all-class test mIoU by 5 points and its new-class IoU reaches half its base-class IoU. If adopted,
# `regime/seg_transfer.yaml` (8 seeds, claims 1 and 2 on test mIoU) runs; if not, claims 1 and 2 stay unanswerable
# for segmentation in this regime. The pilot's test scores are not results about placement or shared experts.

# %%
from workbench.studies import regime
from workbench.studies.checks import checks_by_seed, shares_by_classes
pilot = regime.load("pilots/seg_transfer")
print(regime.status(pilot))
table, line = regime.seg_transfer_rule(pilot)
print(line)
display(answer.Table(table.round(4)))
display(answer.Table(regime.class_iou(pilot).round(4)))
shares = checks_by_seed(pilot)
display(answer.Table(shares[shares["id"] == "predictions-moved"].drop(columns="id").round(4)))
by_class = shares_by_classes(pilot, regime.SCENE_GROUPS, labels=regime.pixel_labels(pilot))
answer.Table(by_class.pivot_table(index=["config", "seed"], columns="group", values="share").round(4).reset_index())

# %% [markdown]
# **What it shows.** Rule (1) **adopts** the regime on seeds 980-981 (14 runs from one clean commit, 245-395 s each
# on one thread): every arm's experts moved apart (expert spread 0.147-0.332 against the 0.10 mark), its routers'
# patch-class NMI moved 0.087-0.170 from their init (0.015 mark), and its pixel predictions moved 1.010-1.998 times
# the dense control's seed-to-seed share (0.9 mark; last-2 at 1.015 and last-2-shared at 1.010 pass closest). The
# dense control's mean test mIoU, 39.95 points, clears the floor of 29.37 (the base's 24.37 on the same all-class
# test scenes, + 5), and its new-class IoU, 0.301, is 0.775 times its base-class IoU, 0.389 (floor 0.5). As rule
# (6) asks: the last-2 arms changed 1.8-2.0% of the checked pixels against their same-seed control, about the dense
# pair's own 1.88%, so their ratios near 1 carry the caveat that training runs drifting apart could produce them;
# the first-2 and all arms changed 3.1-3.8%. Every arm changed about as much on the new classes' pixels as on the
# base's (last-2: 7.1-7.5% of base-class pixels, 8.3-8.7% of new-class ones; the dense pair 7.7% and 8.1%), so the
# movement is not confined to the new classes; no arm's new-class IoU is more than 5 points below the dense
# control's (0.300-0.314 against 0.301), so none moved by not learning. The base scored 0.5510 test mIoU on its own
# classes' scenes after 20 epochs (`experiments/checkpoints/vimoe_seg_micro_scenes_dense_half/metrics.jsonl`). By rule (2), `regime/seg_transfer.yaml` runs (8 seeds, 990-997, from the same
# commit); its verdicts concern this segmentation transfer regime only. The pilot's test mIoUs are not read as
# results about placement or shared experts (rule (5)).

# %% [markdown]
# ## Claims 1 and 2 on segmentation: `seg-transfer-regime`
#
# The confirmatory study the pilot called for (`experiments/studies/regime/seg_transfer.yaml`, written and reviewed
# with the pilot, before any run of either): the pilot's base, schedule, seven arms and checks, claims 1 and 2 on
# test mIoU (paired by seed, points, 95% intervals, Holm across its six directional claims, margin 0.2 points), 8
# seeds fixed in advance (990-997), resumable across sessions. Its verdicts are read only with all 56 runs in (its
# reading rule (b)); they are. **One deviation from the file**, which says every run comes from one clean commit:
# the first 30 runs come from the pilot's commit (9ee1cb9); then seed 994's first-2 start scored 0.839092 pixel
# accuracy against the base's 0.839091 (one test pixel of 6.27 million flipped at an fp32 tie; logit gap 7.4e-6) and
# the exact clean-start check refused it, so the other 26 come from fd0268b, whose only code change is that check's
# rounding tolerance (`run.starts_clean`: logits within 1e-3, score within 1e-5; a test compares the two commits'
# code). Rerun in a fresh process from fd0268b, the same arm and seed started at exactly the base's 0.839091 (logit
# gap 6.6e-6), as all 56 recorded starts do: the step-0 logits vary at the 1e-6 level between processes, which is
# what a tie needs. So the tolerance (1e-5 of 6.27 million pixels is about 63 pixels, looser than the one pixel that
# prompted it) decided no recorded start; seed 994's dense and last-2 runs come from 9ee1cb9, its other five from
# fd0268b. Below: the checks, each run's test mIoU, the new- and base-class IoU per arm (rule (c)), the dense
# control's own seed-to-seed shares and the arms' shares split by the true label (rule (f)), and the claims with the
# interval widths reached.

# %%
from workbench.studies import evaluate_claims
t = regime.load("seg_transfer")
print(regime.status(t))
display(answer.Table(regime.checks_table(t)))
display(answer.Table(regime.accuracy_table(t), caption="Test mIoU (points) of every run, and the mean over seeds"))
display(answer.Table(regime.class_iou(t).round(4), caption="Means over seeds: IoU of the five classes the base never "
                     "saw (new) and of its own five (base), their ratio, and test mIoU (points)"))
shares_t = checks_by_seed(t)
shares_t = shares_t[shares_t["id"] == "predictions-moved"]
display(answer.Table(shares_t[shares_t["config"] == "dense seed-to-seed"].drop(columns="id").round(4),
                     caption="The dense control's consecutive seed pairs: share of checked pixels that differ"))
by_class_t = shares_by_classes(t, regime.SCENE_GROUPS, labels=regime.pixel_labels(t))
display(answer.Table(by_class_t.groupby(["config", "group"])["share"].agg(["mean", "min", "max"]).round(4)
                     .reset_index(), caption="Share of checked pixels whose class differs from the same seed's "
                     "dense control (the control: its consecutive seed pairs), by the true label at the pixel"))
claims_t = evaluate_claims(t)
answer.Table(claims_t.assign(width=claims_t["high"] - claims_t["low"])[
    ["id", "estimate", "low", "high", "width", "p_holm", "verdict"]].round(3))

# %% [markdown]
# **What it shows.** Every arm learned by the file's checks: experts-moved 0.148-0.332 (mark 0.10),
# router-choices-moved 0.068-0.155 (0.01), predictions-moved 0.987-2.001 times the control's seed-to-seed share
# (0.8; last-2 passes closest, 0.919-1.107 per seed). No arm's new-class IoU is more than 5 points below the dense
# control's (0.2996-0.3142 against 0.3018), so none moved by not learning (rule (d)). The last-2 arms changed
# 1.7-2.1% of the checked pixels against their same-seed control, about the dense control's own seed-to-seed
# 1.79-1.93%, so their ratios near 1 carry rule (f)'s caveat that runs drifting apart could produce them; first-2
# and all changed 2.8-3.6% (with a shared expert 3.3-3.8%). Split by the true label, every arm changed more of the
# new classes' pixels than of the base's (last-2: 6.92% of base-class pixels, 8.44% of new-class ones), where two
# seeds of the dense control differ about equally (7.64% and 7.86%). **Claim 1 does not hold here.** Upcycling the
# last two blocks did not beat the dense control: -0.071 points of mIoU [-0.165, +0.022], *disagrees* (the interval
# lies inside the 0.2-point margin, so a gain of 0.2 points is excluded). Placement mattered, the other way round:
# first-2 segmented better than last-2 by +0.809 points [+0.692, +0.926] and all by +0.610 [+0.456, +0.763], both
# significant after Holm (p < 0.001) on the side the paper does not claim: *disagrees*. First-2 and last-2 cost the
# same activated MACs; all costs more (+56% against +28% over dense). The intervals are 0.19-0.31 points wide,
# inside the 0.5-point standard; they are per-claim 95% intervals (Holm adjusts the p-values only), as the file's
# rule decides. The project-wide Holm and BH views (`study claims --all`) read the same; adding these six claims to
# the family changed no other study's project-wide verdict. These verdicts concern this segmentation transfer regime
# and this model only (rule (a)).

# %% [markdown]
# ### Claim 2 as an interaction across placements
#
# Each placement trained twice at equal total and activated expert parameters: top-2 of 9 routed experts, and top-1
# of 8 plus a zero-initialised shared expert of the same width. Thin lines: one seed; thick: the mean and its 95%
# t-interval; dashed: the dense control's mean.

# %%
grid_t = regime.placement_grid(t)
viz.placement_interaction(grid_t, reference=regime.control_mean(t), reference_name="dense control (mean)",
                          names=("top-2 of 9, no shared expert", "top-1 of 8 + shared expert"), score="test mIoU (points)",
                          title="Test mIoU per placement, without and with a shared expert")

# %%
ranges_t = regime.placement_ranges(grid_t)
display(answer.Table(ranges_t, caption="Per seed: range of test mIoU (points) across the three placements and the "
                     "worst placement's test mIoU, without and with a shared expert"))
answer.Table(ranges_t.groupby("shared")[["range", "worst"]].mean().round(3).reset_index(), caption="Means over the seeds")

# %% [markdown]
# **What it shows.** Claim 2 does not hold here either. Without a shared expert the three placements' per-seed range
# of test mIoU was 0.809 points on average (0.583-0.970); with one, 0.770 (0.560-0.876):
# shared-narrows-placement-range -0.039 [-0.161, +0.084], *disagrees* (a narrowing of 0.2 points is excluded), and
# by the range rule this file takes over from upcycle-half-regime it could not have been read as "less sensitive to
# placement" anyway, since neither of claim 1's "hurt" claims agrees. The profile has the same shape with and
# without a shared expert: last-2 the worst placement in all 8 seeds of both halves, first-2 the best in 8 and 5 of
# them. So the worst-placement claim (secondary, by that rule) and the last-2 pair at equal expert parameters
# compare the same runs: +0.092 [-0.003, +0.187], both *disagrees*: the interval's upper end, 0.187, is 0.013 under
# the 0.2-point margin, and a 90% interval would exclude zero, so a small lift is not ruled out, only one of 0.2
# points or more. The shared-expert arms also route top-1 instead of top-2 and add the shared branch instead of
# averaging two routed ones, which this design cannot separate.

# %% [markdown]
# ### Routing against regions (descriptive)
#
# Per arm and MoE block, means over the 8 seeds, on the first 500 validation scenes' patch tokens labelled by their
# majority class: the trained routers' class NMI beside 20 random routers' of the trained norm, and its excess over
# them; the same at equal loads (`bal_`); the position NMI beside the random routers'. The file makes no routing
# claim (reading rule (e)): with 20 draws the smallest p-value is 1/21, so `specialised` cannot come out true on any
# block after Holm (at least 4/21 over four blocks); only the NMIs and their excess are read. The next section tests
# claim 3's premise on new seeds with 100 draws.

# %%
answer.Table(regime.regions_by_block(t))

# %% [markdown]
# **What it shows** (descriptive). In every arm and block the trained routers' class NMI is below the random
# routers' mean (excess -0.035 to -0.233), which NMI's preference for unevenly loaded random routers can produce
# (the check on the shipped model above); at equal loads the excess is small either way (-0.088 to +0.034), and
# negative in every arm's last block (-0.009 to -0.088). The position NMI is above the random routers' in every
# block (0.105-0.254 against 0.028-0.136); the raw position NMI is highest in the first blocks. As in the scratch
# study, the routers' position NMI exceeds random routers' where their class NMI does not; no routing claim is made.

# %% [markdown]
# ### Claim 3's premise: does routing show which layers specialise? (`seg-transfer-routing`)
#
# `experiments/studies/regime/seg_transfer_routing.yaml`, written and reviewed before its runs: the `all` arm above
# (top-2 of 9 in every block) on 8 new seeds (1000-1007), its routing tested against 100 random routers per block,
# so that a block can pass after Holm (only by beating every draw: 4/101 = 0.0396). The file was written after the
# 20-draw table above had been read, so it is a replication, not a discovery, and it says what it expected. Four
# claims (Holm over all four; margin 0.01 NMI, 0.01 per block for the slope): block 3's class-NMI excess over the
# random routers; the same under the balanced test (equal expert loads for the trained router and every draw; the
# one that decides, since a random router's uneven loads raise its NMI); the per-seed slope of the balanced excess
# over depth; and the position-NMI excess (not a paper claim). The premise count, the run rule for a segmentation
# guided-placement file: per seed, the blocks the balanced test flags; a median of 2 or more over the seeds.

# %%
u = regime.load("seg_transfer_routing")
print(regime.status(u))
display(answer.Table(regime.checks_table(u)))
blocks_u, seeds_u, rule_u = regime.regions_premise(u)
display(answer.Table(blocks_u, caption="Per block, means over seeds: class-NMI excess over the random routers "
                     "(unbalanced; balanced; among object patches only), position-NMI excess, the router's class NMI "
                     "at its upcycling init and trained, and in how many seeds each Holm test flags the block"))
display(answer.Table(seeds_u, caption="Per seed: the blocks each test flags"))
print(rule_u)
claims_u = evaluate_claims(u)
answer.Table(claims_u.assign(width=claims_u["high"] - claims_u["low"])[
    ["id", "estimate", "low", "high", "width", "p_holm", "verdict"]].round(4))

# %% [markdown]
# **What it shows.** Both movement checks pass (experts-moved 0.2234, router-choices-moved 0.1083). The last
# block's class NMI is below random routers': -0.169 [-0.188, -0.150], partly NMI's favour for unevenly loaded
# routers (the caveat above); at equal expert loads, the like-for-like test, -0.029 [-0.050, -0.007], below them in
# its file (Holm p 0.032) but *inconclusive* under project-wide Holm: both *disagree* in the file, and neither shows
# class specialisation. The balanced excess does not rise with depth (-0.003 [-0.012, +0.005] per block, *inconclusive*), and
# the routing carries more about where a patch is than random routers do (+0.100 [+0.093, +0.107], *agrees*; not
# contrasted with class). No block is flagged by either test in any of the 8 seeds, so by the file's run rule
# claim 3's premise is not shown in segmentation and no guided-placement or densify study is written for it: the
# layer-level claim 3 has no verdict here, a failure to show rather than evidence of absence. Descriptively: among
# object patches alone the routers' mean class NMI exceeded random ones' in blocks 2 and 3 (+0.088 and +0.075; not
# tested), so part of the deficit may be the object-against-background part of the label; and training lowered every block's class NMI below its
# router's at the upcycling init. As the file expected, this replicates the 20-draw reading above on new seeds;
# adding its four claims changed no other study's project-wide verdict (the balanced claim itself reads
# *inconclusive* under project-wide Holm, *disagrees* under BH).

# %% [markdown]
# ## Live regeneration check
#
# The last-2 arm at a tiny budget, from scratch, one thread: digits `pytest --nbval` compares exactly (a
# regression check, not a result).

# %% jupyter={"source_hidden": true} tags=["live-check"]
s = report.live_slice("segmentation", "scratch", "last-2", seed=0)
print(f"scratch last-2 seed 0, tiny budget: test mIoU {s['test_miou']:.4f}, pixel acc {s['test_pixel_acc']:.4f}, "
      f"train loss {s['history'][-1]['train_loss']:.6f}, GMACs {s['gmacs']:.6f}")
