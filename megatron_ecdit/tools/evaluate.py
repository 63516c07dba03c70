"""Score generated images GenEval-style, or write the standard evaluation prompt set.

    ecdit-evaluate score samples/ [--metadata samples/metadata.jsonl] [--json]
    ecdit-evaluate prompts examples/prompts/geneval_synthetic.jsonl [--per-task 16] [--seed 0]
    ecdit-evaluate prompts examples/prompts/geneval_synthetic_held_out.jsonl --held-out
(or python tools/evaluate.py ...). `score` reads one GenEval metadata record per image, with
its file under `image` (what ecdit-sample writes), and prints per-task accuracy and their mean.
See megatron_ecdit/evaluation/geneval.py for the detector and the rules.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_ecdit.evaluation.geneval import EvaluationError, evaluate_folder, evaluation_prompts


def print_table(result: dict) -> None:
    print(f"{'task':<15} {'accuracy':>8} {'images':>7}")
    for task, accuracy in result["tasks"].items():
        print(f"{task:<15} {accuracy:>8.3f} {result['counts'][task]:>7}")
    print(f"{'overall':<15} {result['overall']:>8.3f} {len(result['images']):>7}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="per-task accuracy of a folder of generated images")
    score.add_argument("folder")
    score.add_argument("--metadata", help="JSON lines, one record per image "
                                          "(default FOLDER/metadata.jsonl)")
    score.add_argument("--json", action="store_true",
                       help="print one JSON object, with every image's verdict")
    prompts = sub.add_parser("prompts", help="write the evaluation prompt set (JSON lines)")
    prompts.add_argument("out")
    prompts.add_argument("--per-task", type=int, default=16)
    prompts.add_argument("--seed", type=int, default=0)
    prompts.add_argument("--held-out", action="store_true",
                         help="the captions the synthetic data never draws (position and "
                              "color_attr) instead of those it draws")
    args = parser.parse_args(argv)
    if args.command == "prompts":
        records = evaluation_prompts(args.per_task, args.seed, unseen=args.held_out)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"wrote {len(records)} prompts to {args.out}")
        return 0
    try:
        result = evaluate_folder(args.folder, args.metadata)
    except EvaluationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
