"""dlm.policies against plain loop references (LLaDA / Fast-dLLM)."""

from __future__ import annotations

import torch

from dlm.policies import Factor, FixedSteps, StepInputs, Threshold, fixed_steps_schedule, sample_tokens


def _inputs(B: int, threshold=0.9, factor=1.0, n_commit=1) -> StepInputs:
    full = lambda v, dt: torch.as_tensor(v, dtype=dt).expand(B).clone()  # noqa: E731 (tiny helper)
    return StepInputs(full(threshold, torch.float32), full(factor, torch.float32), full(n_commit, torch.long))


def test_schedule_matches_llada_get_num_transfer_tokens():
    for n, steps in ((8, 4), (7, 3), (3, 5), (32, 8)):
        base, rem = divmod(n, steps)
        ref = [base + (1 if i < rem else 0) for i in range(steps)]
        assert [fixed_steps_schedule(n, steps, i) for i in range(steps)] == ref
        assert sum(ref) == n


def test_threshold_commits_confident_and_at_least_one():
    conf = torch.tensor([[0.95, 0.2, 0.99, 0.5], [0.1, 0.3, 0.2, 0.25]])
    cand = torch.tensor([[True, True, False, True], [True, True, True, True]])
    out = Threshold().select(conf, cand, _inputs(2, threshold=0.9))
    assert out.tolist() == [[True, False, False, False], [False, True, False, False]]


def test_fixed_steps_per_row_counts():
    conf = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.4, 0.3, 0.2, 0.1]])
    cand = torch.ones(2, 4, dtype=torch.bool)
    inputs = _inputs(2)
    inputs.n_commit = torch.tensor([2, 0])
    out = FixedSteps().select(conf, cand, inputs)
    assert out.tolist() == [[False, True, False, True], [False] * 4]


def _factor_reference(conf: list[float], factor: float) -> int:
    """Fast-dLLM get_transfer_index_dynamic for one row: how many to commit."""
    ordered = sorted(conf, reverse=True)
    n = 1
    for i in range(1, len(ordered)):
        if ordered[i] < 1 - factor / (i + 2):
            break
        n += 1
    return n


def test_factor_matches_reference():
    g = torch.Generator().manual_seed(0)
    for factor in (0.5, 1.0, 2.0):
        conf = torch.rand(16, 8, generator=g) ** 0.3
        cand = torch.ones_like(conf, dtype=torch.bool)
        out = Factor().select(conf, cand, _inputs(16, factor=factor))
        for r in range(16):
            n = _factor_reference(conf[r].tolist(), factor)
            assert out[r].sum().item() == n
            assert set(out[r].nonzero().flatten().tolist()) == set(conf[r].argsort(descending=True)[:n].tolist())


def test_sampling_mixes_greedy_and_sampled_rows_and_is_seeded():
    logits = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(1))
    temp, top_p = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.9])
    u1 = torch.rand(2, 3, 50, generator=torch.Generator().manual_seed(7))
    u2 = torch.rand(2, 3, 50, generator=torch.Generator().manual_seed(7))
    t1, c1 = sample_tokens(logits, temp, top_p, u1)
    t2, _ = sample_tokens(logits, temp, top_p, u2)
    assert torch.equal(t1, t2)
    assert torch.equal(t1[0], logits[0].argmax(-1))
    greedy, conf = sample_tokens(logits, torch.zeros(2), torch.ones(2), None)
    assert torch.equal(greedy, logits.argmax(-1))
    torch.testing.assert_close(conf, logits.softmax(-1).max(-1).values)
    assert ((c1 > 0) & (c1 <= 1)).all()


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[[0.6, 0.3, 0.05, 0.05]]]))
    seen = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        t, _ = sample_tokens(logits, torch.ones(1), torch.tensor([0.8]), torch.rand(1, 1, 4, generator=g))
        seen.add(t.item())
    assert seen == {0, 1}
