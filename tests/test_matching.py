"""Hungarian matching against a brute-force search over every assignment, on small cases."""

import itertools

import numpy as np
import pytest
import torch

from fiftyone_grounding.models.matching import hungarian_match, match_cost

WEIGHTS = {"l1": 5.0, "giou": 2.0, "score": 1.0}


def _random_boxes(rng, n):
    xy = rng.random((n, 2)) * 0.7
    wh = 0.05 + rng.random((n, 2)) * 0.3
    return torch.tensor(np.concatenate([xy, xy + wh], 1), dtype=torch.float32)


def _brute_force(cost: np.ndarray) -> float:
    q, g = cost.shape
    return min(sum(cost[rows[j], j] for j in range(g)) for rows in itertools.permutations(range(q), g))


@pytest.mark.parametrize("seed", range(12))
def test_the_assignment_has_the_least_total_cost(seed):
    rng = np.random.default_rng(seed)
    queries, truths = int(rng.integers(1, 6)), int(rng.integers(0, 4))
    truths = min(truths, queries)
    boxes, logits = _random_boxes(rng, queries), torch.tensor(rng.normal(size=queries), dtype=torch.float32)
    truth = _random_boxes(rng, truths)
    ((rows, cols),) = hungarian_match(boxes[None], logits[None], [truth], WEIGHTS)
    assert len(rows) == len(cols) == truths
    assert len(set(rows.tolist())) == truths and sorted(cols.tolist()) == list(range(truths))  # one query per truth
    if truths:
        cost = match_cost(boxes, logits, truth, WEIGHTS).numpy()
        assert cost[rows, cols].sum() == pytest.approx(_brute_force(cost), abs=1e-5)


def test_a_query_on_a_true_box_gets_it():
    truth = torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.6, 0.5, 0.9, 0.8]])
    boxes = torch.tensor([[0.5, 0.5, 0.6, 0.6], [0.6, 0.5, 0.9, 0.8], [0.0, 0.0, 1.0, 1.0], [0.1, 0.1, 0.3, 0.3]])
    ((rows, cols),) = hungarian_match(boxes[None], torch.zeros(1, 4), [truth], WEIGHTS)
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 3, 1: 1}


def test_a_phrase_without_a_true_box_matches_nothing():
    ((rows, cols),) = hungarian_match(torch.rand(1, 3, 4).sort(-1).values, torch.zeros(1, 3), [torch.zeros(0, 4)],
                                      WEIGHTS)
    assert rows.size == cols.size == 0
