# %% [markdown]
# # 01 Layer placement: how many MoE layers, and where?
#
# **Question.** The paper reports that ViMoE's accuracy is sensitive to how many MoE layers there are and where they
# sit: MoE in the last blocks helps, too many early MoE layers hurt.

# %%
import os, warnings
warnings.filterwarnings("ignore")
import torch, pandas as pd
import workbench
from workbench import viz
from workbench.studies import answer, report
pd.set_option("display.width", 140)
from workbench.studies import regime
REGIME = [("transfer regime, claim 1 on 16 new seeds (final claim-1 verdicts)", "experiments/studies/regime/upcycle_half_claim1.yaml"),
          ("transfer regime: base pretrained on 5 classes, 8 seeds", "experiments/studies/regime/upcycle_half.yaml"),
          ("upcycle regime: re-warmed fine-tune, 8 seeds", "experiments/studies/regime/upcycle4.yaml")]
ANSWER = answer.show(["placement"], confirm=[("confirm", "confirm_all")], regime=REGIME,
                     ids=["late-moe-helps", "early-moe-hurts", "all-layers-hurt", "top2-helps-late", "dense-control-keeps-accuracy"])
ANSWER

# %% [markdown]
# **What it means.** The third column (`regime/upcycle4.yaml`) is the study that tests claim 1 in a fine-tune meant to move the upcycled
# arms (re-warmed, 4 epochs; its movement checks were written before its runs). All 56 runs are in, and its claim-1
# verdicts are *void*: the experts moved apart, but the last-2 and first-2 arms' test predictions stayed closer to
# the same seed's dense control than two seeds of that control are to each other (and first-2's routers barely
# moved from their init; the checks table below): their predictions moved less than the 0.8x of the control's
# seed-to-seed share that the file fixed before its runs, so the claims that read them are void; the estimates are
# printed and decide nothing. What that check cannot tell apart: an arm that did not learn, and one that learned the
# control's function (the void estimates all lie within 0.2 points of zero); the rule written before the runs
# reads both as void, and so does this notebook. The earlier records are void
# too, by checks added to their files after their runs with the thresholds the regime files fixed beforehand (a
# check added afterwards can only void a verdict, never make one): trained from scratch for 3 epochs, every arm was
# still gaining 1.8-3.2 validation points in its last epoch (median over seeds; the plateau rule allows 0.3), so
# their estimates (the
# void estimates put the placements the paper says hurt above last-2 on 16 fresh seeds) describe early training
# only; upcycled with the earlier 2-epoch lr 1e-4 fine-tune, the arms' predictions stayed within the dense
# control's seed noise and, in the 4x4-base study (`upcycle_p7` recorded no spread), the experts stayed near-copies
# (spread about 0.02-0.03, the threshold 0.10). So no study here has
# a verdict on claim 1. Two schedule pilots then tried to make the upcycled arms move (8 epochs; a peak lr of 2e-3),
# and both failed their rule written before their runs (the next section), so by the files' limit claim 1 is
# unanswerable in the upcycle protocol under the schedules those files allow; a third pilot, on an avg-pooled twin
# of the base, failed the same way (last-2's predictions moved less than the floor), so claim 1 is unanswerable
# for that model under that schedule too. A fourth pilot changed the kind of regime: a transfer base, pretrained on
# five of the ten classes and fine-tuned on all ten, so that every arm must learn classes its base never saw (as
# the paper's DINOv2-pretrained ViT learns ImageNet labels). There every arm moved, by the pilot's rule written
# before its runs, and its confirmatory study (`regime/upcycle_half.yaml`, the second column above) is complete:
# 56 runs, 8 seeds, every arm passes every check, and **no claim-1 verdict agrees**: MoE in the last two blocks
# against the dense control +0.136 points [-0.011, +0.284], first-2 against last-2 +0.110 [-0.030, +0.250], all
# four blocks against last-2 +0.164 [+0.049, +0.279], all three *inconclusive* after Holm, and the two "hurt"
# estimates lie on the side the paper does not claim (all four blocks, at 24% more MACs than last-2 and 63% more
# than dense, were more accurate than last-2 by an interval that excludes zero but not by Holm in the file, p =
# 0.060; the project-wide BH view reads it *disagrees*). The placement estimates were all under a quarter of a point
# (largest, all minus last-2, +0.164 [+0.049, +0.279]); these intervals do not rule out differences of about
# 0.25-0.3 points. A separate study on 16 new seeds (`regime/upcycle_half_claim1.yaml`, the first column: written
# after those estimates were read, because they were close to deciding, and reviewed before its runs) **gives the
# final claim-1 verdicts in this regime** (two decided, late MoE inconclusive), every arm passing every check: MoE in the last two blocks against the dense control
# +0.105 [+0.001, +0.209], *inconclusive* (not significant after Holm, and a gain of 0.2 points is not excluded);
# first-2 against last-2 +0.059 [-0.023, +0.141], *disagrees* (inside the 0.2-point margin: an effect, if any,
# under 0.2 points); all four blocks against last-2 +0.206 [+0.139, +0.273], *disagrees* (Holm-significant on the
# side the paper does not claim: MoE in every block was more accurate than in the last two, at 24% more MACs and
# 72% more total parameters, 25% more activated). So, for this 4-block 7x7 micro ViT in this Fashion-MNIST transfer
# regime only: first-2 against last-2 shows an effect, if any, under 0.2 points; MoE in all four blocks was more
# accurate than in the last two by 0.14-0.27 points, the side the paper's claim does not expect (not matched on
# compute or capacity, so not placement as such); whether late MoE helps is not decided. The intervals are over
# training seeds, on one base checkpoint and one fixed 10,000-image test set. Scope and deviations follow the method.
#
# ## Method
#
# Two protocols, each a study file in `experiments/studies/` whose claims (and the test that decides
# each) were written before the runs:
#
# * **scratch**: every arm is the micro ViMoE (d=64, 4 blocks, 7x7 patches, 8 experts, top-1 unless named)
#   trained from random initialisation with the identical budget (3 epochs on 50,000 Fashion-MNIST images). The
#   models are not converged (about 80% test accuracy, against 91.3% for the dense model after 120 epochs): these
#   results describe what each arm learns in a fixed short budget, and the plateau check voids their verdicts;
# * **upcycle** (the paper's): every arm starts from one converged dense model, experts = copies of its FFNs,
#   renormalised gates (straight-through, so a top-1 router still learns) so that each arm computes exactly the
#   dense function at step 0 (asserted: step-0 test accuracy and logits equal the base's), then one fine-tune for
#   every arm (the earlier studies: 2 epochs at lr 1e-4, no re-warm; the regime study and its pilots: re-warmed to a
#   peak of 1e-3 or 2e-3); the dense control continues with the identical schedule. All seeds share one base.
#   The protocol asks for a base of at least 90% test accuracy. `upcycle` starts from the micro ViT with 4x4
#   patches (`experiments/upcycle/train_base.sh dense_p4`); its study files refuse to run from a base below 90%
#   (`base_min_test_acc`). `upcycle_p7`, shown beside it, is the same protocol's earlier record from the 7x7-patch
#   base (`vimoe_micro_fmnist_dense`, 88.68%: it plateaued below the bar). Each upcycle header names its base; the
#   clean-start table gives the base's test accuracy as the records measured it.
#
# Seeds pair the arms (same data order and training subset; initial weights differ between architectures, so the
# pairing removes only the data's share of the noise): 5 seeds per arm in the earlier studies, 8 in the regime study, 16
# and 24 in the confirmations. The pre-registered claims (Finding) are
# decided by paired 95% t-intervals with Holm's correction across each study's directional claims; the table of
# every arm against the dense control below is exploratory (Holm across its arms). Layers and thresholds are never
# chosen on the test set (a 10,000-image validation split is held out of training).

# %% [markdown]
# ## First: did the arms learn? (the regime, from the pilots)
#
# A verdict about placement means something only where the compared models learned: scratch arms trained to a
# plateau, upcycled experts moved apart and routers away from their init. The records below were recorded in the
# regimes whose limits they expose (scratch: 3 epochs; upcycle: 2 epochs at lr 1e-4). Before the regime studies,
# pilots (one seed each, `experiments/studies/pilots/`, each file's rule written before its runs; they decide no
# claim) sized the budgets:
#
# * **scratch**: the dense model trained for 20, then 30 and 60, then 120 epochs (the same cosine schedule
#   stretched). The plateau rule (validation gained over the last third of the epochs: `late_gain_pts` below;
#   the 60- and 120-epoch files allowed 0.2 points, 0.3 at most) failed at 20, 60 and 120 epochs, and doubling the
#   budget still paid (validation after 60 epochs minus after 30: 0.90 points; after 120 minus after 60: 0.86), so,
#   by the files' rule (3), the failure is not read as confounded with the lr decay (one seed). The 120-epoch
#   file's rule ends the search there: budgets beyond 120 epochs are more than two CPU workers can spend on a
#   confirmatory study, and only the dense arm was piloted. The 60-epoch file had said the 3-epoch verdicts would
#   stay reported as early-training results; the 120-epoch file, written before its run, reports them void under
#   the plateau standard instead, and the scratch studies read *void* through their own plateau checks (every arm
#   still gaining 1.8-3.2 points in its last epoch).
# * **scratch, data-limited** (`scratch_small5k.yaml`, `scratch_small10k.yaml`): a different design question,
#   written and reviewed together before their runs and departing from the 120-epoch file's rule (4) (no further
#   pilot), as they say: would the model plateau where the training data, not the step count, limits it? 5,000
#   images for 120 epochs or 10,000 for 60 (4,680 steps each), dense first, the same bands. Both dense runs failed
#   (`late_gain_pts` 1.57 and 2.03 in the table below: validation still rose through the cosine's tail on a few
#   thousand images), so by their rule (2) no MoE arm ran and no confirmatory scratch study is written: the scratch
#   claims stay void, and the search for a scratch budget ends here.
# * **upcycle**: a re-warmed fine-tune (4 epochs, peak lr 1e-3). The experts moved apart (median block's
#   `expert_spread` about 0.2, against about 0.02-0.03 in the recorded studies) and the routers moved; the dense
#   control lost about 0.3 test points to the re-warm. `experiments/studies/regime/upcycle4.yaml` is the study
#   run under this schedule, with its movement checks stated beside its claims; it came out void (next section), so
#   two more schedule pilots followed, each with a rule (1) written before its runs (adopt, two more seeds, or fail):
#   `upcycle4_finetune8.yaml` doubled the length (8 epochs, 2 seeds) and `upcycle4_lr2e3.yaml`, the last one the
#   files allow, raises the peak lr to the base's own 2e-3 at 4 epochs. Their rule, evaluated on the records, and
#   each arm's per-seed share of test predictions that differ from the same seed's control are the tables after
#   the pilots' runs.

# %%
answer.Table(report.pilots())

# %%
for pilot in ("pilots/upcycle4_finetune8", "pilots/upcycle4_lr2e3", "pilots/upcycle4_avg"):
    table, line = regime.schedule_rule(regime.load(pilot))
    print(line)
    if len(table):
        display(answer.Table(table.round(4)))
from workbench.studies.checks import checks_by_seed
shares = checks_by_seed(regime.load("pilots/upcycle4_finetune8"))
answer.Table(shares[shares["id"] == "predictions-moved"].drop(columns="id").round(4))

# %% [markdown]
# **The 8-epoch pilot failed its rule outright**: last-2 and last-2-shared changed fewer test predictions against
# their same-seed control than 0.7 times the control's own seed-to-seed share, so `regime/upcycle4_8ep.yaml` was not
# run. The per-seed shares above (`share`) say why: the arms' shares stayed where the 4-epoch study had them (means
# there: last-2 0.0127, first-2 0.0200, last-2-shared 0.0159) and so did the control's seed noise (0.0276 there), so
# twice the length did not move the arms' predictions further; the experts did move apart (`expert_spread` about
# 0.25).
#
# **The 2e-3 pilot failed too**, on two of the four counts its rule names: last-2's predictions-moved stayed below
# the 0.7 floor (0.6928, the lr2e3 table above), and the dense control's mean test accuracy fell below 89.68% (the
# base's 90.18% less the 0.5-point margin; 89.49%): at twice the peak lr the re-warm costs the base more than the
# protocol allows. Both misses are narrow (0.007 under the floor on two seeds whose denominator is one pair of dense
# seeds; 0.19 points on the dense mean), but the rule was fixed before the runs and is applied as written. Beside the
# outcome, as its rule (4) asks: first-2 (0.8946) and last-2-shared (0.7937) were borderline; all, first-2-shared
# and all-shared cleared the 0.9 margin. Every arm's share of changed predictions grew against the 8-epoch pilot
# (last-2's about doubled, to a mean of 0.0230 from 0.0116), and the control's seed-to-seed share grew too (0.0332
# from 0.0258; shares below). By the limit both files state (`upcycle4_8ep.yaml`, adopted by `upcycle4_lr2e3.yaml`'s
# rule (3) before its runs: no further schedule pilot), claims 1 and 2 are **unanswerable in the upcycle protocol
# under the schedules its files allow** (4 or 8 epochs at a peak lr of 1e-3, 4 epochs at 2e-3): at 1e-3 last-2 and
# last-2-shared stayed far below the floor (4 epochs 0.45 / 0.57, 8 epochs 0.45 / 0.60) and first-2 reached at most
# borderline (0.73, 0.83); at 2e-3 most arms moved, but last-2 did not and the control lost accuracy. That is an
# outcome of the rules, not evidence that the arms cannot move: only the length and the peak lr were tried. The
# pilots decide no claim, and their test accuracies are not read as results about placement.

# %%
shares = checks_by_seed(regime.load("pilots/upcycle4_lr2e3"))
answer.Table(shares[shares["id"] == "predictions-moved"].drop(columns="id").round(4))

# %% [markdown]
# **The avg-pooled base's pilot failed outright as well** (`pilots/upcycle4_avg.yaml`, the rule table headed
# `pilot-upcycle4-avg` above). Its file changed the model, not the schedule: the same architecture with
# `global_pool='avg'` (92.28% test; trained in one 80-epoch cosine, where the CLS-pooled base had warm restarts), so
# that every patch token's routing in every block reaches the prediction, fine-tuned on upcycle4-regime's 4-epoch
# schedule. The experts moved apart in every arm (spread 0.13-0.16) and the dense control stayed within the
# 0.5-point margin (mean 92.08% against a floor of 91.78%), but last-2 (0.4569) and last-2-shared (0.6235) changed
# fewer test predictions than 0.7 times the control's seed-to-seed share; first-2, all and first-2-shared were
# borderline (0.75-0.85), and only all-shared cleared 0.9. Router-choices-moved was borderline (0.005-0.015) in four
# arms (last-2-shared, all, first-2-shared, all-shared). Per seed (below), last-2 changed 1.07% and 1.26% of test
# predictions against the control's seed-to-seed 2.55%, and, as the pilot's rule (6) asks, beside upcycle4-regime's
# 4-epoch means on the CLS-pooled base (last-2 0.0127, first-2 0.0200, last-2-shared 0.0159, all 0.0222,
# first-2-shared 0.0256, all-shared 0.0282; dense seed-to-seed 0.0276): the control's seed noise here is not larger,
# so the failure is not a larger denominator's. (The two bases differ in pooling, training schedule and accuracy,
# so this pilot does not say why last-2 moved so little on either.) By the pilot's rule (3),
# `regime/upcycle4_avg.yaml` (written, reviewed and committed before any of the pilot's records was read) is not
# run, and claims 1 and 2 are unanswerable for the avg-pooled ViMoE under this schedule too. Its test accuracies are
# not read as results about placement or shared experts (rule (5)).

# %%
shares = checks_by_seed(regime.load("pilots/upcycle4_avg"))
answer.Table(shares[shares["id"] == "predictions-moved"].drop(columns="id").round(4))

# %% [markdown]
# **The transfer pilot adopted its schedule** (`pilots/upcycle_half.yaml`, the first line below). Its file changed
# the kind of regime: the base (`vimoe_micro_fmnist_dense_half`, `experiments/upcycle/dense_half.yaml`) is the
# 7x7-patch dense micro ViT pretrained on five classes only (T-shirt/top, Trouser, Pullover, Dress, Coat: 90.96% of
# their test images; 45.48% of all ten, since it cannot name the other five), and every arm, upcycled from it, is
# fine-tuned on all ten classes with upcycle4-regime's 4-epoch schedule and seven arms. It also changed the model
# (7x7 patches, 17 tokens, against the 4x4 base's 50), so a pass does not show that the transfer, rather than the
# patch size, made the arms move. On seeds 940-941 the rule read borderline (router-choices-moved 0.0077 for first-2
# and 0.0127 for all-shared, between the 0.005 floor and the 0.015 adopt mark), so seeds 942-943 were appended, as
# the rule prescribes, in a commit made before their runs; on four seeds every arm passes the checks' own
# thresholds (experts-moved 0.35-0.51, router-choices-moved 0.0135-0.0626, predictions-moved 0.885-1.207, last-2
# 0.9457) and the dense control's mean test accuracy, 85.595%, clears the file's 80.00% floor: **adopted**. The
# adoption rests on the 4-seed decision using the checks' own thresholds, looser than the 2-seed adopt marks, as the
# rule fixed in advance: first-2's router-choices-moved passes on its median only because seeds 942-943 came in at
# 0.0174 and 0.0193 (940-941: 0.0057 and 0.0096), and, as rule (4) asks, the values that would sit in the
# 2-seed borderline band are reported beside the outcome: router-choices-moved 0.0135 (first-2) and 0.0136
# (all-shared), under 0.015; predictions-moved 0.8851 (first-2), under 0.9; one seed below 0.8 (last-2-shared,
# seed 942: 0.780). As rule (6) asks, the shares below: each arm changed 3.4-5.2% of test predictions against its same-seed control, against
# the control's seed-to-seed 4.1-4.5% (last-2: 3.8-4.3%, where on the 4x4 base's regime study it changed 1.1-1.5% per seed, mean 1.27% (`checks_by_seed`), against a seed
# noise of 2.6-2.8%), and about equally on the base's classes and on the new ones (last-2: 4.03% on each), so the
# movement is not confined to the new classes; no arm's mean test accuracy is below 80% (85.6-86.0%), so none moved
# by failing to learn. Every arm's median ratio is 0.885-1.207 (per seed 0.780-1.214): the arms differ from their same-seed control about as much as
# one control seed differs from another, and a ratio near 1 could also come from training runs drifting apart on
# the new classes (the even split over old and new classes speaks against that, without excluding it). By rule (2), `regime/upcycle_half.yaml` (written, reviewed and committed while the pilot ran,
# before any of its records was read) runs; its verdicts concern this transfer regime and this 7x7 model only.
# The pilot's test accuracies are not read as results about placement or shared experts (rule (5)).

# %%
from workbench.studies.checks import shares_by_classes
half = regime.load("pilots/upcycle_half")
table, line = regime.floor_rule(half, 80.0)  # the file's rule (1): its own 80% dense floor
print(line)
print(regime.schedule_rule(half)[1].split(";")[0] + " (schedule_rule's own floor, the base's accuracy less 0.5 "
      "points: vacuous for a base that cannot name five of the classes)")
display(answer.Table(table.round(4)))
shares = checks_by_seed(half)
display(answer.Table(shares[shares["id"] == "predictions-moved"].drop(columns="id").round(4)))
by_class = shares_by_classes(half, {"old (0-4)": [0, 1, 2, 3, 4], "new (5-9)": [5, 6, 7, 8, 9]})
answer.Table(by_class.pivot_table(index=["config", "seed"], columns="group", values="share").round(4).reset_index())

# %%
# the scratch pilots, one seed each: the plateau rule reads the shaded last third (the upcycle pilots are judged by
# their movement checks, the tables above)
curves = report.pilot_curves()
viz.accuracy_by_epoch(curves[curves["pilot"].str.startswith("pilot-scratch")],
                      title="Scratch pilots: validation accuracy by epoch (shaded: the last third)")

# %% [markdown]
# ## Claims 1 and 2 in the transfer regime: `upcycle-half-regime`
#
# The confirmatory study the transfer pilot called for (`experiments/studies/regime/upcycle_half.yaml`): the pilot's
# base, schedule, seven arms and checks, upcycle4-regime's claims 1 and 2 (without its dense-control and routing
# claims), 8 seeds fixed before its runs (950-957), every run from one clean commit (6204652), resumable across
# sessions (two runs, last-2 and first-2 of seed 954, were stopped with the session and resumed from their
# checkpoints, which on the CPU continues a run exactly and re-checks its clean start; `provenance.resumed`). Its
# verdicts are read only with all 56 runs in (its reading rule (b)); they are. Below: its checks, each
# run's test accuracy, the per-seed shares of test predictions that differ from the same seed's control split into
# the base's classes and the new ones (rule (c)) beside the dense control's own seed-to-seed shares (rule (e)), and
# the claims with the interval widths reached.

# %%
h = regime.load("upcycle_half")
OLD_NEW = {"old (0-4)": [0, 1, 2, 3, 4], "new (5-9)": [5, 6, 7, 8, 9]}
line, tables = regime.learned(h, OLD_NEW)
print(line)
for table in tables:
    display(answer.Table(table))
from workbench.studies import evaluate_claims
claims_half = evaluate_claims(h)
display(answer.Table(claims_half.assign(width=claims_half["high"] - claims_half["low"])[
    ["id", "estimate", "low", "high", "width", "p_holm", "verdict"]].round(3)))

# %% [markdown]
# **What it shows.** Every arm learned by the file's checks (experts-moved 0.35-0.51, router-choices-moved
# 0.011-0.053, predictions-moved 0.86-1.16 times the control's seed-to-seed share; first-2-shared's routers, 0.0111,
# pass closest to the 0.01 mark), and every arm's mean test accuracy lies between 85.64% and 86.01%, far above the
# 80% floor of rule (d). Each arm changed 3.5-5.4% of test predictions against its same-seed control, about equally
# on the base's five classes and the five new ones (last-2: 4.01% old, 3.81% new), while two seeds of the dense
# control differ on 3.98-4.72% (4.64% old, 4.33% new): the ratios near 1 that pass the check carry rule (e)'s
# caveat that runs drifting apart could produce them, and the even split speaks against drift on the new classes
# alone. The claim-1 intervals are 0.23-0.30 points wide (full width), inside the 0.5-point standard. None agrees:
# late-moe-helps is inconclusive (+0.136 [-0.011, +0.284]); early-moe-hurts and all-layers-hurt have their
# estimates on the other side (first-2 +0.110 and all +0.164 points above last-2), and all-layers-hurt's interval
# [+0.049, +0.279] excludes zero without passing Holm in the file (p = 0.060; the project-wide BH view reads it
# *disagrees*, Holm *inconclusive*). These verdicts concern this transfer regime and this 7x7 model only (rule
# (a)); nothing is pooled with the other bases' studies. Claim 2's half of the file is notebook 02's.

# %% [markdown]
# ## Claim 1 again in the transfer regime, on 16 new seeds: `upcycle-half-claim1`
#
# A separate study (`experiments/studies/regime/upcycle_half_claim1.yaml`), written after the one above was read,
# because its claim-1 estimates were close to deciding (a choice made on its results, as the file says), and
# reviewed before its runs: the same base, schedule, checks and claim-1 claims, the dense control and the last-2,
# first-2 and all arms only, 16 new seeds (1100-1115) fixed in advance, every run from one clean commit. Its
# verdicts stand alone (Holm over its own three claims) and nothing is pooled with the study above; whatever it
# finds, no further seeds or studies for claim 1 follow on this base. By its reading rule (c) both files' rows
# are shown together, the decision is this file's verdict, and each of its rows says whether its estimate lies
# inside the earlier 95% interval. Below: its checks, each arm's test accuracy, the per-seed shares of changed
# predictions split into old and new classes (rule (g)), the joint table and its figure.

# %%
r1 = regime.load("upcycle_half_claim1")
line, tables = regime.learned(r1, OLD_NEW)
print(line)
for table in tables:
    display(answer.Table(table))
joint = regime.joint_claims(r1, h)
display(answer.Table(joint.assign(width=joint["high"] - joint["low"]).round(3).assign(p_holm=joint["p_holm"].map("{:.2g}".format))))
viz.forest_plot({f"{name} ({int(t['n'].iloc[0])} seeds)": t.rename(columns={"claim": "config", "estimate": "delta"})
                 for name, t in joint.groupby("study", sort=False)},
                title="Claim 1 in the transfer regime: each claim's paired difference (95% CI), per study",
                unit="test accuracy points", margin=0.2, shared_x=True)

# %% [markdown]
# **What it shows.** Every arm moved by the file's checks (experts-moved 0.39-0.51, router-choices-moved
# 0.0159-0.0517, first-2 closest to the 0.01 mark; predictions-moved 0.92-1.15 times the dense control's own
# seed-to-seed share), and every arm's mean test accuracy lies between 85.77% and 86.08%, far above rule (e)'s 80%
# floor. Each MoE arm changed 3.7-4.9% of test predictions against its same-seed control, about equally on the
# base's classes and the new ones (last-2: 3.89% old, 3.74% new; two dense seeds differ on 4.21% of the old
# classes' test images and 4.07% of the new ones'). The
# intervals are 0.13-0.21 points wide (full width), inside the 0.5-point standard and narrower than the earlier
# study's 0.23-0.30, and each estimate lies inside the earlier study's interval. The verdicts, the decision for
# claim 1 in this regime by the file's rule (c): late-moe-helps *inconclusive* (+0.105 [+0.001, +0.209]: the
# unadjusted interval excludes zero, but not after Holm, p_holm 0.097, and its upper end does not exclude a gain
# of 0.2 points); early-moe-hurts *disagrees* (+0.059 [-0.023, +0.141], inside the
# margin: by rule (f) an effect, if any, under 0.2 points, not the opposite effect); all-layers-hurt *disagrees*
# (+0.206 [+0.139, +0.273], p_holm 2.8e-05, significant on the other side: the all-MoE arm, at 5.86 M MACs per image
# against last-2's 4.72 M and 1.27 M total parameters against 0.74 M, was the more accurate; the intervals are
# over training seeds on one base and one fixed test set, and +0.206 points is about 21 of its 10,000 images). The earlier study's
# verdicts (all *inconclusive*) are shown unchanged beside them; nothing is pooled. Adding these three claims to the
# project-wide family (99 directional claims) changed no other study's verdict, and each reads the same under
# project-wide Holm and BH (`study claims --all`). These verdicts concern this transfer regime and this 7x7 model
# only (rule (a)); by the file, no further seeds or studies for claim 1 follow on this base.

# %% [markdown]
# ## Claim 1 in the paper's regime: `upcycle4-regime`
#
# **Regime.** Every arm is upcycled from the 4x4-patch dense base (90.18% test) with function-preserving starts
# (asserted at step 0), then fine-tuned 4 epochs with a warm-up to a peak lr of 1e-3 and cosine decay; the dense
# control runs the identical schedule. Placements last-2, first-2 and all use top-2 of 9 experts (their twins with a
# shared expert are notebook 02's). Seeds 300-307 pair the arms. Its checks (experts moved apart, routers moved from
# their init, predictions moved beyond the control's seed noise) and claims were written before its runs, in
# `experiments/studies/regime/upcycle4.yaml`. All 56 runs are recorded, from one commit; a claim that reads an arm
# failing a check is void, and its numbers below describe without deciding.

# %%
s = regime.load("upcycle4")
print(regime.status(s))
answer.Table(regime.checks_table(s))

# %% [markdown]
# **Did the arms learn?** The table above is each pre-registered check per arm: the median over the recorded seeds
# against its threshold (the prediction check needs at least two seeds of the dense control before it can pass).
# Below, validation accuracy per epoch, averaged over the recorded seeds, and each run's final test accuracy.

# %%
viz.accuracy_by_epoch(regime.curves(s, mean=True), group=("config",), shade=False,
                      title="upcycle4-regime: validation accuracy by epoch (mean over recorded seeds)")

# %%
answer.Table(regime.accuracy_table(s))

# %% [markdown]
# ## Results
#
# Mean test accuracy and seed standard deviation per arm, parameters and activated GMACs per image beside, then
# the paired differences from the dense control.

# %%
contrasts = report.show_summary("placement")

# %% [markdown]
# **Clean starts.** Every upcycled arm must start exactly where its base is. Per arm, over its seeds: the base's
# test accuracy, the step-0 test accuracy (before any fine-tuning; the run refuses to start if it differs), the
# largest step-0 logit difference from the base, and the final test accuracy after the fine-tune. The dense
# control's row shows whether continuing the base with the fine-tune's schedule loses accuracy.

# %%
display(answer.Table(report.clean_starts("placement")))

# %% [markdown]
# **How far the fine-tune moves each arm.** An accuracy difference near zero can mean "placement does not matter"
# or "the fine-tune barely changed anything". Per arm: the share of the 10,000 test images whose predicted class
# differs from the dense control's on the same seed (same data order), beside the share that differs between two
# seeds of the dense control itself (seed noise). Where an upcycled arm's changes are below the control's
# seed-to-seed changes, its fine-tune is a small perturbation of the base: these earlier upcycle studies now carry
# that as a check (predictions moved at least 0.8 times the control's seed-to-seed share, and the experts' spread
# at least 0.10: the regime's thresholds, added after their runs), every arm below fails one, and their claims read
# *void*; notebook 03 shows how little the experts and routers moved. The estimates are also conditional on one
# base (seed 0) and one test set, and the base's stopping rule (20-epoch chunks until 90% test accuracy) read that
# test set.

# %%
for protocol in report.protocols("placement"):
    print(f"== {report.label(protocol)}")
    display(answer.Table(report.prediction_changes("placement", protocol)))

# %% [markdown]
# The forest plot puts the protocols side by side: each point is an arm's mean paired difference from the dense
# control (the dashed zero line), the bar its 95% interval; the label carries its activated GMACs, so arms that buy
# accuracy with compute (top-2) can be told from those that do not.

# %%
viz.forest_plot(contrasts, title="Layer placement: paired difference from the dense control (95% CI)")

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
# Each claim below was stated in the study file before its runs, with its direction (and, for "no difference"
# claims, a margin). *agrees*: significant after Holm and the 95% interval on the claimed side; *disagrees*:
# significant on the other side, or the interval beyond the margin; *inconclusive*: neither; *void*: the claim
# reads an arm that failed one of its study's checks that the arms learned (plateau or movement), so its estimate
# describes and decides nothing (the reason is printed beside it). The `upcycle`
# studies (4x4-patch base) also give their directional claims a margin, the smallest effect that matters (0.2 points,
# 0.01 NMI), fixed before their runs: an interval inside it reads *disagrees* (no effect worth having), where the
# margin-free claims of `upcycle_p7` could only stay *inconclusive*. Beside each verdict:
# which side the point estimate is on, and about how many seeds would make the interval +/-0.5 points at the
# observed spread. One deviation from the plan, made after the scratch records existed: the Holm family is the
# directional claims only ('equal' claims are decided by interval and margin); with all claims in the family no
# verdict changes. A second, made after every study here was recorded: spread claims (seed SD) were decided by
# their bootstrap interval alone, outside the Holm family; they are now decided by the Pitman-Morgan test of equal
# paired variances, inside it (notebook 02). Stricter, and applied to every study: two verdicts moved, both away
# from the paper (segmentation's spread claim and upcycle_p7's shared-beats-top2-all, agrees -> inconclusive; both
# now void under the added checks).
# A third, made after `upcycle4-shared-expert` was recorded: a directional claim whose interval lies inside its
# margin reads *disagrees* even when it is significant (the upcycle study files said so; the code had checked
# agreement first). No recorded verdict changed.

# %%
tables = report.show_claims("placement")
print("verdicts:", report.verdict_counts(tables))
print(report.half_widths(tables))

# %% [markdown]
# ## Confirmation: the headline contrasts on 16 fresh seeds
#
# Five seeds decided none of the scratch claims above (the half-widths printed above). The five-seed studies
# therefore served as a pilot. From its paired standard deviations the confirmatory study
# (`experiments/studies/scratch/confirm.yaml`, claims committed before its runs) fixed its sample size in advance:
# 16 fresh seeds (100-115) for every arm. That was aimed at +/-0.5 points if the pilot's spread held. Two limits
# of that sizing: the pilot's SDs are point estimates from 4 degrees of freedom, and the size was chosen for the
# interval's width, not for power against a stated smallest effect. Its verdicts use those 16 seeds only; the
# pilot's seeds are not pooled, so the pilot cannot pick the outcome. Same model, budget and defaults as the
# pilot. `all-layers-hurt` (about 20 seeds) was tested separately, in `confirm_all.yaml`, on the same 16 seeds
# (below). In the table and the forest plot every arm is compared with dense; that comparison is exploratory. The
# pre-registered contrasts are the claims further down.

# %%
confirmation = report.show_summary("confirm")
viz.forest_plot(confirmation, title="Confirmation (16 fresh seeds): paired difference from the dense control")

# %% [markdown]
# ### Finding (confirmation)
#
# Each confirmatory claim beside the pilot's estimate of the same claim, then the verdicts. The verdict rule is the
# one used above:
# - *agrees*: significant after Holm, with the interval on the paper's side;
# - *disagrees*: significant after Holm, with the interval on the other side;
# - *inconclusive*: neither.
#
# - *void*: an arm the claim reads failed its study's plateau check (every claim of this 3-epoch study does).
#
# A directional claim has no margin, so a true null effect can only come out inconclusive. The `half_width`
# column shows whether the +/-0.5 target was met.

# %%
display(answer.Table(report.pilot_vs_confirmation().round(3), formats={"half_width": "{:.3f}"}))
tables = report.show_claims("confirm")
print("verdicts:", report.verdict_counts(tables))
print(report.half_widths(tables))

# %% [markdown]
# **What the void `early-moe-hurts` estimate describes.** A 3-epoch budget from random initialisation, with models
# at about 79-80% test accuracy and still improving (the plateau check above). It is not the paper's setting: the
# paper upcycles a converged model, which is what the regime study above tests. Below, the first-2 minus last-2 gap
# after each epoch, over the same 16 seeds: the void gap shrank from epoch to epoch; where it would end at a
# plateau was not measured, so it says nothing about which placement ends up better.

# %%
display(answer.Table(report.gap_by_epoch("confirm", "scratch", "first-2", "last-2").round(3)))

# %% [markdown]
# ### All MoE layers: `all-layers-hurt` on the same 16 seeds
#
# A second confirmatory file (`experiments/studies/scratch/confirm_all.yaml`, written after `scratch-confirm` was
# recorded and before its own runs) adds the all-MoE arm on seeds 100-115, paired with `scratch-confirm`'s last-2
# and dense arms. The pilot's spread asked for about 20 seeds here; 16 exist (the half-width reached is printed).

# %%
_ = report.show_claim_kinds("confirm_all", claim_kinds=["paired"])
print(report.half_widths({"scratch": report.claims("confirm_all", "scratch")}))

# %% [markdown]
# **What the void `all-layers-hurt` estimate describes.** The same scope as above: the scratch protocol (micro
# ViMoE, 7x7 patches, 3 epochs from random initialisation, about 80% test accuracy). There the void estimate put
# MoE in all four blocks above MoE in the last two, at equal activated FLOPs (it decides nothing); the all-MoE arm also carries more parameters
# (1.13M vs 0.67M) and sums its balance loss over four layers instead of two. It says nothing about converged
# models or upcycling (the upcycle studies above). The gap after each epoch, over the same 16 seeds:

# %%
display(answer.Table(report.gap_by_epoch("confirm_all", "scratch", "all", "scratch-confirm/last-2").round(3)))

# %% [markdown]
# ## Live regeneration check
#
# The recorded runs took minutes each; here one arm is re-run at a tiny budget (2,000 images, one epoch, one
# thread), from scratch, in this kernel. Runs are deterministic on the CPU, so these digits are compared exactly
# by `pytest --nbval`: a code change that moves results shows here. They are a regression check, not a result.

# %% jupyter={"source_hidden": true} tags=["live-check"]
slice_ = report.live_slice("placement", "scratch", "last-2", seed=0)
print(f"scratch last-2 seed 0, tiny budget: test acc {slice_['test_acc']:.4f}, val acc {slice_['val_acc']:.4f}, "
      f"train loss {slice_['history'][-1]['train_loss']:.6f}")
print("first 40 test predictions:", slice_["test_predictions"][:40])
