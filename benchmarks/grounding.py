"""Does a captioner look at the image? Grounding of a model on a scene split.

    python benchmarks/grounding.py                     # the embedded `tiny` model, val split
    python benchmarks/grounding.py --model smol        # the embedded MiniGPT-4 on SmolLM2-135M
    python benchmarks/grounding.py --model FOLDER --backend minigpt4-llama --limit 200 --split test --json out.json

Compare candidate recipes on `val` (the default: held out from backbone training); keep `test`
for the final report, so the numbers reported on it are not the ones a recipe was chosen by.

Prints, for the model's full-depth greedy captions, how often they name colours, shapes and
numbers and how often what they name is in the picture, next to a blind baseline
(`earlyexit.metrics.grounding`), then VQA accuracy per question type (colour, shape, count,
position, relation, existence, size).
"""

from __future__ import annotations

import argparse
import sys

from earlyexit.data.scenes import load_scenes
from earlyexit.evaluation.common import EvalSettings
from earlyexit.evaluation.evaluate import evaluate
from earlyexit.metrics.grounding import blind_baseline, caption_grounding
from earlyexit.metrics.vqa import vqa_scores
from earlyexit.models.embedded import MODELS, scene_config
from earlyexit.models.loading import load_backend


def predictions(backend, dataset, max_new_tokens: int) -> dict[str, str]:
    """Full-depth greedy outputs, through the evaluation loop with exits off (== plain generate)."""
    settings = EvalSettings(batch_size=32, max_new_tokens=max_new_tokens, measure_wall=False, progress=False,
                            quick_metrics=True)
    return evaluate(backend, None, dataset, settings)["predictions"]


def report(backend, limit: int, split: str = "val") -> dict:
    config = scene_config()
    captions_set = load_scenes(split, "caption", config).subset(limit)
    questions = load_scenes(split, "vqa", config)
    questions = questions.subset(limit * 5 if limit else None)
    captions = predictions(backend, captions_set, max_new_tokens=20)
    scenes = {s.id: s.extra["objects"] for s in captions_set}
    answers = predictions(backend, questions, max_new_tokens=4)
    by_type = vqa_scores(answers, {s.id: s.answers for s in questions},
                         {s.id: s.extra["question_type"] for s in questions})
    return {"images": len(captions_set), "questions": len(questions), "caption_grounding": caption_grounding(captions, scenes),
            "blind_baseline": blind_baseline((c for s in load_scenes("train", "caption", config) for c in s.captions),
                                             scenes),
            "vqa_overall": by_type["overall"], "vqa_per_question_type": by_type["per_answer_type"],
            "examples": [{"image": i, "caption": captions[i], "objects": [f"{o['color']} {o['shape']}" for o in scenes[i]]}
                         for i in list(captions)[:8]]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny",
                        help="tiny (default) or smol (embedded models, built if needed), or a model folder")
    parser.add_argument("--backend", help="model family of a folder (default: the embedded model's, else blip2-opt)")
    parser.add_argument("--limit", type=int, default=200, help="images (questions: 5 per image)")
    parser.add_argument("--split", default="val", choices=["val", "dev", "test"],
                        help="scene split (default val: compare recipes here; test for the final report only)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    from earlyexit.plugins.registry import get_registry

    family = args.backend or (MODELS[args.model][0] if args.model in MODELS else "blip2-opt")
    backend = load_backend(get_registry(load_entrypoints=False).backend(family), args.model)
    result = report(backend, args.limit, args.split)
    print(f"{result['images']} {args.split} images, {result['questions']} questions")
    print("| word | mention rate | precision | blind baseline |")
    print("| --- | --- | --- | --- |")
    for kind, values in result["caption_grounding"].items():
        blind = result["blind_baseline"][kind]
        precision = "-" if values["precision"] is None else f"{values['precision']:.2f}"
        print(f"| {kind} | {values['mention_rate']:.2f} | {precision} | {blind['precision']:.2f} ('{blind['guess']}') |")
    print(f"VQA {result['vqa_overall']:.1f} %: " + ", ".join(
        f"{k} {v:.1f}" for k, v in sorted(result["vqa_per_question_type"].items())))
    for example in result["examples"]:
        print(f"  {example['caption']!r:60} <- {', '.join(example['objects'])}")
    if args.json:
        from earlyexit.util.files import write_json_atomically
        from earlyexit.util.provenance import provenance

        command = "python benchmarks/grounding.py " + " ".join(argv if argv is not None else sys.argv[1:])
        from earlyexit.models import embedded

        built = embedded.build_info(embedded.recipe_of(args.model)) if args.model in MODELS else None
        build = {k: built.get(k) for k in ("fingerprint", "train_seconds", "seconds", "load_average_1min")} if built else None
        write_json_atomically(args.json, {"command": command, "model": args.model, "split": args.split, "build": build,
                                          **result, "provenance": provenance()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
