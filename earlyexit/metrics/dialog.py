"""VisDial retrieval metrics from the rank of the ground-truth answer among the options.

Each dialog round has (usually 100) candidate answers; the model scores them and the
ground truth's 1-based rank feeds MRR, R@k and the mean rank. All values are fractions in
[0, 1] except the mean rank, as the VisDial evaluation reports them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral

from earlyexit.errors import ConfigError, DataError

_TIE_RULES = ("pessimistic", "optimistic")


def rank_of_ground_truth(option_scores: Sequence[float], gt_index: int,
                         ties: str = "pessimistic") -> int:
    """1-based rank of option `gt_index` when options are sorted by score, highest first.

    ties="pessimistic" (default) ranks the ground truth after every option with an equal score,
    so a model that gives all options the same score gets the worst rank rather than rank 1;
    ties="optimistic" ranks it before them.
    """
    if ties not in _TIE_RULES:
        raise ConfigError(f"unknown tie rule {ties!r}: use one of {', '.join(_TIE_RULES)}")
    scores = [float(score) for score in option_scores]
    if not scores:
        raise DataError("no option scores given: pass one score per candidate answer")
    if any(math.isnan(score) for score in scores):
        raise DataError("option scores contain NaN: check the model outputs before ranking")
    if isinstance(gt_index, bool) or not isinstance(gt_index, Integral) \
            or not 0 <= gt_index < len(scores):
        raise DataError(f"ground-truth index {gt_index!r} is not a 0-based index into "
                        f"{len(scores)} options")
    gt_score = scores[gt_index]
    better = sum(score > gt_score for score in scores)
    if ties == "optimistic":
        return better + 1
    tied_others = sum(score == gt_score for score in scores) - 1
    return better + tied_others + 1


def dialog_scores(gt_ranks: Sequence[int]) -> dict:
    """MRR, R@1, R@5, R@10 (fractions) and mean rank from 1-based ground-truth ranks."""
    ranks = list(gt_ranks)
    if not ranks:
        raise DataError("no ranks given: pass one 1-based ground-truth rank per dialog round")
    for position, rank in enumerate(ranks):
        if isinstance(rank, bool) or not isinstance(rank, Integral) or rank < 1:
            raise DataError(f"rank #{position} is {rank!r}: ranks must be integers >= 1 "
                            "(1 = ground truth ranked first)")
    count = len(ranks)
    result = {"MRR": sum(1.0 / rank for rank in ranks) / count}
    for k in (1, 5, 10):
        result[f"R@{k}"] = sum(rank <= k for rank in ranks) / count
    result["mean_rank"] = sum(int(rank) for rank in ranks) / count
    return result
