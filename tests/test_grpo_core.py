"""The GRPO engine's pure core on hand-computed values: advantages, clipped
objective, k3 KL, loss normalisation, S-GRPO's token mask, T-SPMO's prefix
tree and A(v|p), replay, and the rewards."""

import math
import random

import pytest
import torch

from engines.grpo.losses import (clipped_surrogate, group_advantages, grpo_loss, grpo_terms, k3_kl,
                                 normalized_loss, s_grpo_mask)
from engines.grpo.rewards import Completion, check_weights, consistency, correctness, format_compliance, \
    last_integer, length_efficiency, score
from engines.grpo.tspmo import ReplayBuffer, prefix_advantages


def test_group_advantages_centre_and_scale_by_the_group_sample_std():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]]), eps=0.0)
    # TRL's convention, Bessel's N−1: group 1 mean 0.5, std sqrt(1/3); group 2 mean 2, std sqrt(2/3)
    s1, s2 = math.sqrt(1 / 3), math.sqrt(2 / 3)
    assert torch.allclose(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / s1)
    assert torch.allclose(adv[1], torch.tensor([1.0, -1.0, 0.0, 0.0]) / s2)


def test_batch_scaling_divides_by_the_std_of_every_reward_and_one_completion_has_none():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]])
    adv = group_advantages(rewards, "batch", eps=0.0)
    centred = rewards - rewards.mean(-1, keepdim=True)
    assert torch.allclose(adv, centred / rewards.flatten().std())  # std of all 8 rewards, N−1
    assert torch.equal(group_advantages(torch.tensor([[2.0], [5.0]])), torch.zeros(2, 1))  # no spread, no NaN


def test_equal_rewards_give_zero_advantage_not_nan():
    adv = group_advantages(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(adv, torch.zeros(2, 3))


def test_dr_grpo_advantage_is_only_centred():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), "none")
    assert torch.allclose(adv, torch.tensor([[0.5, -0.5, -0.5, 0.5]]))


def test_k3_kl_on_fixed_log_probs():
    kl = k3_kl(torch.log(torch.tensor([0.5, 0.2])), torch.log(torch.tensor([0.25, 0.2])))
    # ratio π_ref/π = 0.5: 0.5 − ln 0.5 − 1 = 0.19315; equal policies: 0
    assert kl[0].item() == pytest.approx(0.5 - math.log(0.5) - 1, abs=1e-6)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-7)


def test_clipped_objective_takes_the_pessimistic_side():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    got = clipped_surrogate(logp, old, adv, eps_low=0.2)
    assert torch.allclose(got, torch.tensor([1.2, -1.5, 0.5, -0.8]))
    # an asymmetric upper bound (clip-higher) lets a good token's ratio grow further
    assert clipped_surrogate(logp[:1], old[:1], adv[:1], 0.2, 0.28).item() == pytest.approx(1.28)


def test_grpo_loss_normalisations_on_a_hand_example():
    logp = torch.zeros(2, 3)  # ratio 1, no KL
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    kw = dict(clip_eps=0.2, max_new_tokens=4)
    token, _ = grpo_loss(logp, logp, None, adv, mask, normalization="token_batch", **kw)
    sequence, _ = grpo_loss(logp, logp, None, adv, mask, normalization="sequence", **kw)
    constant, _ = grpo_loss(logp, logp, None, adv, mask, normalization="constant", **kw)
    assert token.item() == pytest.approx(-(1 + 1 - 2) / 3)
    assert sequence.item() == pytest.approx(-((2 / 2) + (-2 / 1)) / 2)
    assert constant.item() == pytest.approx(-(1 + 1 - 2) / (2 * 4))


def test_token_normalisation_over_a_micro_batch_per_token_or_per_prompt():
    """Two prompts' groups with different lengths: TRL's bnpo weighs every token the same,
    DAPO's equation 8 averages within a prompt first; they differ, by hand."""
    kw = dict(clip_eps=0.2)
    a, _ = grpo_terms(torch.zeros(1, 3), torch.zeros(1, 3), None, torch.tensor([1.0]),
                      torch.tensor([[1, 1, 1]], dtype=torch.bool), **kw)  # 3 tokens of +1
    b, _ = grpo_terms(torch.zeros(1, 3), torch.zeros(1, 3), None, torch.tensor([-3.0]),
                      torch.tensor([[1, 0, 0]], dtype=torch.bool), **kw)  # 1 token of −3
    assert normalized_loss([a, b], "token_batch", 4).item() == pytest.approx(-(3 - 3) / 4)
    assert normalized_loss([a, b], "token_prompt", 4).item() == pytest.approx(-(3 / 3 + -3 / 1) / 2)
    assert normalized_loss([a, b], "sequence", 4).item() == pytest.approx(-(1 + -3) / 2)
    assert normalized_loss([a, b], "constant", 4).item() == pytest.approx(-(3 - 3) / (2 * 4))


def test_earlier_option_names_read_as_what_they_documented():
    from engines.grpo.options import GrpoOptions

    o = GrpoOptions.model_validate({"scale_by_std": False, "loss_normalization": "token"})
    assert (o.scale_rewards, o.loss_normalization) == ("none", "token_batch")


def test_grpo_loss_gradient_pushes_good_completions_up():
    logits = torch.zeros(2, 3, requires_grad=True)
    logp = torch.log_softmax(logits, -1)[:, :1].expand(2, 2)  # token 0's log-prob, twice
    loss, stats = grpo_loss(logp, logp.detach(), logp.detach(), torch.tensor([1.0, -1.0]),
                            torch.ones(2, 2, dtype=torch.bool), clip_eps=0.2, kl_beta=0.1)
    loss.backward()
    assert logits.grad[0, 0] < 0 < logits.grad[1, 0]  # descent raises row 0's token, lowers row 1's
    assert stats["kl"] == pytest.approx(0.0)


def test_s_grpo_mask_follows_alpha_k_and_p():
    lengths = torch.tensor([10, 2, 10])
    all_late = s_grpo_mask(lengths, 10, alpha=3, p=1.0, k=5)
    assert all_late[0].tolist() == [True] * 5 + [False] * 5  # α=3 always, then 2 more up to k=5
    assert all_late[1].tolist() == [True, True] + [False] * 8  # never past the completion
    none_late = s_grpo_mask(lengths, 10, alpha=3, p=1e-9, k=5)
    assert none_late[0].tolist() == [True] * 3 + [False] * 7
    g = torch.Generator().manual_seed(0)
    big = s_grpo_mask(torch.full((4000,), 100), 100, alpha=20, p=0.3, k=1000, generator=g)
    assert big[:, :20].all()
    assert big[:, 20:].float().mean().item() == pytest.approx(0.3, abs=0.01)
    capped = s_grpo_mask(torch.full((500,), 100), 100, alpha=20, p=0.5, k=30, generator=g)
    assert capped.sum(-1).max().item() == 30


def test_t_spmo_prefix_tree_advantages_by_hand():
    # three completions: [1,2] reward 1, [1,3] reward 0, [4,5] reward 0
    got = {(t.row, t.position, t.token): t.advantage for t in prefix_advantages([[1, 2], [1, 3], [4, 5]],
                                                                                [1.0, 0.0, 0.0])}
    third = 1 / 3
    assert got == pytest.approx({
        (0, 0, 1): 0.5 - third,  # E[R | 1] − E[R | root]
        (0, 1, 2): 1.0 - 0.5,  # E[R | 1,2] − E[R | 1]
        (1, 1, 3): 0.0 - 0.5,
        (2, 0, 4): 0.0 - third,
        (2, 1, 5): 0.0,  # only one way on after 4: no information
    })


def test_t_spmo_shared_prefix_is_one_transition():
    transitions = prefix_advantages([[7, 8, 9], [7, 8, 9], [7, 8, 1]], [1.0, 1.0, 0.0])
    assert len(transitions) == 4  # 7, 8, then 9 or 1
    assert {t.token: t.advantage for t in transitions}[9] == pytest.approx(1.0 - 2 / 3)


def test_replay_buffer_splits_draws_within_budgets_and_round_trips():
    from engines.data.examples import Example

    buf = ReplayBuffer(success_threshold=1.0)
    row = Example("Q: 6*7?", None, 42, {"answer": 42, "source": "mine"})
    buf.add([1, 2], [5, 6, 7], 1.0, row)
    buf.add([1, 2], [5, 9], 0.0, row)
    drawn = buf.draw(random.Random(0), success_budget=3, failure_budget=0)
    assert len(drawn) == 1
    prompt, partial, example = drawn[0]
    assert prompt == [1, 2] and partial == [5, 6, 7][: len(partial)] and len(partial) < 3
    assert (example.prompt, example.answer, example.row) == ("Q: 6*7?", 42, {"answer": 42, "source": "mine"})
    copy = ReplayBuffer(1.0)
    copy.load_state_dict(buf.state_dict())
    assert copy.successes == buf.successes and copy.failures == buf.failures


def _c(text: str, answer: int, tokens: int = 10) -> Completion:
    return Completion(text, answer, tokens, 40)


def test_rewards_score_the_last_integer_format_length_and_steps():
    assert last_integer("47*6: 47*6=282\nAnswer: 282") == 282 and last_integer("no digits") is None
    assert correctness(_c("12*3=36\nAnswer: 36", 36)) == 1.0
    assert correctness(_c("Answer: 36 or maybe 35", 36)) == 0.0
    assert format_compliance(_c("12*3=36\nAnswer: 36\n", 36)) == 1.0
    assert format_compliance(_c("36", 36)) == 0.0
    assert length_efficiency(_c("Answer: 36", 36, tokens=10)) == pytest.approx(0.75)
    assert length_efficiency(_c("Answer: 35", 36, tokens=10)) == 0.0  # brevity of a wrong answer earns nothing
    assert consistency(_c("2*3=6, 6+1=8", 8)) == 0.5
    total, parts = score(_c("Answer: 36", 36, 10), {"correctness": 1.0, "format": 0.3, "efficiency": 0.2})
    assert total == pytest.approx(1.0 + 0.3 + 0.2 * 0.75) and parts["format"] == 1.0


def test_unknown_reward_weight_is_refused_with_the_list():
    with pytest.raises(ValueError, match="unknown reward 'helpfulness'; accepted: correctness"):
        check_weights({"helpfulness": 1.0})
