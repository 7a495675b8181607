import math

import pytest
import torch

from workbench.moe import Router, assign_slots, expert_capacity
from workbench.moe.losses import balance_loss, importance_loss, load_loss, z_loss


def test_gates_are_topk_softmax_probabilities():
    router = Router(6, num_experts=5, top_k=2)
    x = torch.randn(7, 6)
    logits, probs, experts, gates = router(x)
    expected = torch.softmax(x @ router.weight.t(), dim=-1)
    torch.testing.assert_close(probs, expected)
    top = expected.topk(2, dim=-1)
    torch.testing.assert_close(gates, top.values)
    assert torch.equal(experts, top.indices)
    assert (gates.sum(-1) < 1).all()


def test_renormalised_gates_sum_to_one():
    router = Router(6, num_experts=5, top_k=3, renormalize=True)
    _, _, _, gates = router(torch.randn(9, 6))
    torch.testing.assert_close(gates.sum(-1), torch.ones(9))


def test_router_is_fp32_under_autocast():
    router = Router(8, num_experts=4, top_k=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, probs, _, gates = router(torch.randn(5, 8).bfloat16())
    assert logits.dtype == probs.dtype == gates.dtype == torch.float32


def test_noise_only_in_training():
    router = Router(8, num_experts=4, noise_std=1.0)
    x = torch.randn(50, 8)
    router.eval()
    assert torch.equal(router(x)[3], router(x)[3])
    router.train()
    assert not torch.equal(router(x)[1], router(x)[1])


@pytest.mark.parametrize("k", [1, 2])
def test_balance_loss_is_one_under_uniform_routing(k):
    num_experts, units = 4, 8
    probs = torch.full((units, num_experts), 1.0 / num_experts)
    experts = torch.stack([(torch.arange(units) + j) % num_experts for j in range(k)], dim=1)
    assert balance_loss(probs, experts).item() == pytest.approx(1.0)


def test_balance_loss_penalises_collapse():
    probs = torch.zeros(8, 4)
    probs[:, 0] = 1.0
    experts = torch.zeros(8, 1, dtype=torch.long)
    assert balance_loss(probs, experts).item() == 4.0  # E: every unit to one expert with probability 1


@pytest.mark.parametrize("num_experts, k", [(2, 1), (4, 1), (4, 2), (8, 2), (8, 8)])
def test_balance_loss_is_exactly_one_for_uniform_routing_and_e_for_collapse(num_experts, k):
    units = 2 * num_experts
    uniform = torch.full((units, num_experts), 1.0 / num_experts)
    spread = torch.stack([(torch.arange(units) + j) % num_experts for j in range(k)], dim=1)
    assert balance_loss(uniform, spread).item() == 1.0
    collapsed = torch.zeros(units, num_experts)
    collapsed[:, 0] = 1.0
    assert balance_loss(collapsed, torch.zeros(units, 1, dtype=torch.long)).item() == num_experts


def test_balance_loss_can_be_below_one():
    """Not an invariant that it is >= 1: 3 experts, unit 0 has probabilities (.4, .3, .3) and goes to expert 0,
    unit 1 has (0, .5, .5) and goes to expert 1.  f = (1/2, 1/2, 0), P = (.2, .4, .4):
    3 * (1/2 * .2 + 1/2 * .4) = 0.9."""
    probs = torch.tensor([[0.4, 0.3, 0.3], [0.0, 0.5, 0.5]])
    experts = torch.tensor([[0], [1]])
    assert balance_loss(probs, experts).item() == pytest.approx(0.9, abs=1e-6)
    assert balance_loss(probs, experts).item() < 1


def test_importance_and_load_are_zero_when_balanced_and_positive_when_not():
    assert importance_loss(torch.full((6, 3), 1 / 3)).item() == pytest.approx(0.0, abs=1e-7)
    skewed = torch.tensor([[0.9, 0.05, 0.05]] * 6)
    assert importance_loss(skewed).item() > 0.5
    torch.manual_seed(0)
    balanced_logits = torch.eye(4).repeat(25, 1) * 5
    collapsed_logits = torch.zeros(100, 4)
    collapsed_logits[:, 0] = 5
    assert load_loss(balanced_logits, 1, 0.25).item() < 0.01
    assert load_loss(collapsed_logits, 1, 0.25).item() > 1.0


def test_z_loss_value():
    logits = torch.zeros(3, 4)
    assert z_loss(logits).item() == pytest.approx(math.log(4) ** 2)


def test_capacity_formula():
    assert expert_capacity(100, 8, 1, None) is None
    assert expert_capacity(100, 8, 1, 1.0) == 13
    assert expert_capacity(100, 8, 2, 1.05) == 27
    assert expert_capacity(3, 8, 1, 0.1) == 1


def test_slots_first_choices_before_second_choices():
    experts = torch.tensor([[0, 1], [0, 1], [1, 0]])
    gates = torch.tensor([[0.6, 0.3], [0.5, 0.4], [0.7, 0.2]])
    keep = assign_slots(experts, gates, num_experts=2, capacity=2)
    # expert 0: first choices of units 0 and 1 fill it; unit 2's second choice is dropped
    # expert 1: first choice of unit 2, then second choice of unit 0; unit 1's second choice dropped
    assert keep.tolist() == [[True, True], [True, False], [True, False]]


def test_batch_prioritized_routing_keeps_confident_units():
    experts = torch.zeros(4, 1, dtype=torch.long)
    gates = torch.tensor([[0.3], [0.9], [0.5], [0.8]])
    keep = assign_slots(experts, gates, num_experts=2, capacity=2, priority="gate")
    assert keep.squeeze(1).tolist() == [False, True, False, True]
    keep = assign_slots(experts, gates, num_experts=2, capacity=2, priority="position")
    assert keep.squeeze(1).tolist() == [True, True, False, False]


def test_straight_through_renormalisation_keeps_values_and_gives_top1_a_gradient():
    """Renormalised top-1 gates are p/p = 1: the router gets no gradient from the task loss. The straight-through
    form has the same values (a function-preserving upcycled start) and a non-zero gradient."""
    import workbench  # noqa: F401
    from workbench.moe import MoEMlp

    x = torch.randn(2, 9, 16)
    grads, outs = {}, {}
    for mode in (True, "straight_through"):
        torch.manual_seed(0)
        layer = MoEMlp(16, 32, num_experts=4, top_k=1, renormalize=mode, balance_weight=0.0)
        out = layer(x)
        out.pow(2).sum().backward()
        grads[mode], outs[mode] = layer.router.weight.grad.norm().item(), out.detach()
    assert torch.equal(outs[True], outs["straight_through"])
    assert grads[True] < 1e-6 < grads["straight_through"]
    with pytest.raises(ValueError, match="renormalize='yes'"):
        MoEMlp(16, 32, renormalize="yes")
