"""``srde lm-eval RUN_DIR --tasks T[,T]``: score a finished run with EleutherAI's lm-evaluation-harness
(:mod:`srde_plugins.tracking.harness`, imported only when the command runs)."""

from __future__ import annotations

import json

from srde_core.errors import UsageError


def add_lm_eval(subparsers) -> None:
    p = subparsers.add_parser("lm-eval", help="score a run with EleutherAI's lm-evaluation-harness (experts on or off)")
    p.add_argument("run_dir")
    p.add_argument("--tasks", required=True, help="comma-separated; local: srde_corpus_gen, srde_corpus_ll")
    p.add_argument("--no-experts", action="store_true", help="score the base model alone")
    p.add_argument("--limit", type=int, default=None, help="examples per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--include-path", default=None, help="a directory of your own task YAMLs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lm_eval)


def cmd_lm_eval(args) -> int:
    from srde_plugins.tracking.harness import evaluate_with_harness

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    results = evaluate_with_harness(args.run_dir, tasks, experts=not args.no_experts, limit=args.limit,
                                    batch_size=args.batch_size, include_path=args.include_path)
    scores = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))} for task, metrics in results["results"].items()}
    if args.json:
        print(json.dumps({"experts": not args.no_experts, "results": scores}, indent=2))
    else:
        from lm_eval.utils import make_table

        print(make_table(results))
    return 0
