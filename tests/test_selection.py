"""Successive halving over candidate policies, with a scripted evaluator standing in for the real env."""

from __future__ import annotations

import numpy as np
import pytest
from sfv_world.agents.selection import successive_halving


class Scripted:
    """evaluate(name, episodes, seed, max_steps): episode ``seed + i`` of candidate ``name`` lasts
    ``lengths[name][seed + i]`` steps (cut at ``max_steps``); CartPole-like, the return is the length."""

    def __init__(self, lengths: dict[str, dict[int, int]] | None = None, mean: dict[str, float] | None = None,
                 seed: int = 0):
        self.lengths, self.mean = lengths, mean
        self.rng = np.random.default_rng(seed)
        self.calls: list[tuple[str, int, int, int]] = []

    def __call__(self, name, episodes, seed, max_steps):
        self.calls.append((name, episodes, seed, max_steps))
        if self.lengths is not None:
            full = np.array([self.lengths[name][seed + i] for i in range(episodes)])
        else:
            full = np.maximum(1, self.rng.normal(self.mean[name], 30.0, episodes)).astype(np.int64)
        cut = np.minimum(full, max_steps).astype(np.int64)
        return cut.astype(np.float64), cut


def test_rounds_double_episodes_keep_a_third_and_share_episode_seeds():
    mean = {f"c{i}": 50.0 + 10 * i for i in range(9)}  # c8 is best by a wide margin per step of the plan
    ev = Scripted(lengths={n: {s: int(m) for s in range(100, 200)} for n, m in mean.items()})
    chosen, rounds, returns = successive_halving(list(mean), ev, budget=10_000, first_episodes=2, keep=3, seed=100)
    assert chosen == "c8"
    assert [(len(r.candidates), r.episodes, r.seed) for r in rounds] == [(9, 2, 100), (3, 4, 102)]
    assert rounds[1].candidates == ["c8", "c7", "c6"]  # best first
    # within a round every candidate plays the same episodes
    for r in rounds:
        assert {c[2] for c in ev.calls if c[0] in r.candidates and c[1] == r.episodes} == {r.seed}
    assert len(returns["c8"]) == 6 and len(returns["c0"]) == 2
    assert sum(r.real_frames for r in rounds) == sum(sum(v) for v in returns.values())
    assert rounds[1].scores["c8"] == 130.0


def test_the_budget_holds_even_when_every_episode_runs_to_the_cut():
    ev = Scripted(lengths={f"c{i}": {s: 10_000 for s in range(0, 1000)} for i in range(10)})
    chosen, rounds, _ = successive_halving([f"c{i}" for i in range(10)], ev, budget=3_000, first_episodes=3, seed=0)
    assert sum(r.real_frames for r in rounds) <= 3_000
    assert rounds[0].max_steps == 3_000 // (10 * 3) == 100
    # round 2 would need 4 candidates x 1 episode of the longest length seen (100): 400 <= 0 left -> stop
    assert len(rounds) == 1 and chosen == "c0"  # all tied at the cut: the earlier name


def test_later_rounds_shrink_episodes_rather_than_cut_below_the_longest_episode_seen():
    ev = Scripted(lengths={f"c{i}": {s: 100 + i for s in range(0, 1000)} for i in range(6)})
    chosen, rounds, _ = successive_halving([f"c{i}" for i in range(6)], ev, budget=2_000, first_episodes=2, keep=2,
                                             seed=0)
    # round 1: 6 x 2 episodes, 1,230 frames; 770 left: 3 survivors x 4 planned episodes of >= 105 steps do not
    # fit, 3 x 2 do (cut at 128 >= 105)
    assert [(len(r.candidates), r.episodes) for r in rounds][:2] == [(6, 2), (3, 2)]
    assert rounds[1].max_steps >= 105 and chosen == "c5"
    assert sum(r.real_frames for r in rounds) <= 2_000


def test_the_noisy_best_is_found_more_often_than_by_chance():
    mean = {f"c{i}": 100.0 for i in range(11)} | {"star": 180.0}
    wins = sum(successive_halving(list(mean), Scripted(mean=mean, seed=s), budget=20_000)[0] == "star"
               for s in range(40))
    assert wins >= 30  # by chance: 40 / 12 ~ 3


def test_one_candidate_plays_one_round_and_bad_arguments_are_named():
    chosen, rounds, returns = successive_halving(["only"], Scripted(mean={"only": 50.0}), budget=1_000)
    assert chosen == "only" and len(rounds) == 1 and len(returns["only"]) == 2
    with pytest.raises(ValueError, match="at least one candidate"):
        successive_halving([], Scripted(mean={}), budget=10)
    with pytest.raises(ValueError, match="candidate names repeat"):
        successive_halving(["a", "a"], Scripted(mean={"a": 1.0}), budget=10)
    with pytest.raises(ValueError, match="first_episodes must be >= 1 and keep >= 2, got 0, 3"):
        successive_halving(["a"], Scripted(mean={"a": 1.0}), budget=10, first_episodes=0)
    with pytest.raises(ValueError, match="budget of 5 cannot give 3 candidates 2 episode"):
        successive_halving(["a", "b", "c"], Scripted(mean={"a": 1.0, "b": 1.0, "c": 1.0}), budget=5)
