"""Evaluation metrics. Import the submodule you need; nothing heavy is imported here.

- `earlyexit.metrics.caption`: `caption_scores`, `CaptionScorer`, `cider_per_item` —
  BLEU-1..4, METEOR, ROUGE-L, CIDEr (SPICE when its jars are present) via pycocoevalcap (Java).
- `earlyexit.metrics.vqa`: `normalize_answer`, `vqa_accuracy`, `vqa_scores` — official VQA
  answer normalisation and the min(#humans/3, 1) accuracy over leave-one-out subsets.
- `earlyexit.metrics.dialog`: `rank_of_ground_truth`, `dialog_scores` — VisDial MRR, R@1/5/10
  and mean rank.
- `earlyexit.metrics.grounding`: `caption_grounding`, `blind_baseline` — on the scene data, how
  often captions name colours, shapes and numbers, and how often what they name is true.
"""

from earlyexit.errors import DataError


def check_same_ids(predictions, references, ids: str, predicted: str, expected: str) -> None:
    """Raise DataError unless `predictions` is non-empty and has exactly the keys of `references`.
    `ids` names the keys ("id", "question"), `predicted`/`expected` the values, for the messages."""
    if not predictions:
        raise DataError(f"no {predicted}s given: pass at least one {ids} -> {predicted}")
    for key in predictions:
        if key not in references:
            raise DataError(f"{ids} {key!r} has a prediction but no {expected}: score the same {ids}s on both sides")
    for key in references:
        if key not in predictions:
            raise DataError(f"{ids} {key!r} has {expected} but no prediction: score the same {ids}s on both sides")
