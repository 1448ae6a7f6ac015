"""Choosing an imagination-trained agent by real return, within a budget of real frames.

An agent trained only in the dream is judged in the real env; real frames spent on that judgement are
counted against the same budget as the dataset. PPO's policy swings from update to update and from seed to
seed, so the pool worth choosing from is every seed's late snapshots, not only its last policy.
:func:`successive_halving` spends the budget where it tells most: every candidate plays a few real episodes,
the best third play twice as many new ones, and so on, until one is left or the budget cannot pay for a fair
round. Within a round all candidates play the same episodes (same env seeds), so their scores differ by policy,
not by luck of the draw; scores are means over every episode a candidate has played.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# evaluate(candidate name, episodes, first env seed, max steps per episode) -> (returns [E] float64, lengths [E] int64)
Evaluate = Callable[[str, int, int, int], tuple[np.ndarray, np.ndarray]]


@dataclass
class HalvingRound:
    """One round: who played, how many episodes each (seeds ``seed`` ..), the per-episode step cap, frames."""

    candidates: list[str]
    episodes: int
    seed: int
    max_steps: int
    real_frames: int
    scores: dict[str, float]  # mean return over every episode played so far


def successive_halving(names: list[str], evaluate: Evaluate, budget: int, first_episodes: int = 2, keep: int = 3,
                       seed: int = 10_000, max_steps: int = 100_000,
                       log: Callable[[str], None] | None = None) -> tuple[str, list[HalvingRound], dict[str, Any]]:
    """Pick one of ``names`` by real return, never spending more than ``budget`` real frames.

    Round k: the ``n_k`` survivors each play ``e_k`` new episodes (``e_1 = first_episodes``, doubling each
    round), then the best ``ceil(n_k / keep)`` by mean return over all their episodes survive. A round's
    episodes are cut at ``min(max_steps, left // (n_k * e_k))`` steps, so the budget holds whatever happens; from
    round 2 on, ``e_k`` shrinks so that this cut is no shorter than the longest episode played so far (a cut
    that only truncates would rank by the cut, not the policy), and the choice stops when not even one episode
    each fits. Ties keep the earlier name. Returns (chosen name, rounds, per-candidate returns as lists).
    """
    if not names:
        raise ValueError("successive_halving needs at least one candidate")
    if len(set(names)) != len(names):
        raise ValueError(f"successive_halving: candidate names repeat: {names}")
    if first_episodes < 1 or keep < 2:
        raise ValueError(f"successive_halving: first_episodes must be >= 1 and keep >= 2, got {first_episodes}, {keep}")
    log = log or (lambda _msg: None)
    returns: dict[str, list[float]] = {n: [] for n in names}
    alive, rounds = list(names), []
    planned, next_seed, spent, longest = int(first_episodes), int(seed), 0, 0

    def score(n: str) -> float:
        return float(np.mean(returns[n])) if returns[n] else -math.inf

    while len(alive) > 1 or not rounds:
        left = int(budget) - spent
        episodes = planned if not rounds else min(planned, left // (len(alive) * max(longest, 1)))
        if episodes < 1:
            log(f"[select] budget left ({left} real frames) cannot give {len(alive)} candidates one more episode "
                f"of {longest} steps: stop")
            break
        cap = min(int(max_steps), left // (len(alive) * episodes))
        if cap < 1:
            raise ValueError(f"a real-frame budget of {budget} cannot give {len(names)} candidates "
                             f"{first_episodes} episode(s) of at least one step each")
        frames = 0
        for n in alive:
            r, lengths = evaluate(n, episodes, next_seed, cap)
            returns[n].extend(float(v) for v in r)
            frames += int(np.sum(lengths))
            longest = max(longest, int(np.max(lengths)))
        spent += frames
        ranked = sorted(alive, key=score, reverse=True)  # sorted is stable: ties keep the earlier name
        rounds.append(HalvingRound(list(alive), episodes, next_seed, cap, frames, {n: score(n) for n in alive}))
        log(f"[select] round {len(rounds)}: {len(alive)} candidates x {episodes} episodes (cut at {cap} steps), "
            f"{frames} real frames; best {ranked[0]} {score(ranked[0]):.1f}")
        next_seed += episodes
        alive = ranked[:math.ceil(len(alive) / keep)]
        planned *= 2
    chosen = max(alive, key=score)  # max keeps the first of equal scores
    return chosen, rounds, returns
