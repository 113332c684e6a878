"""``srde plan RECIPE [--gpus N] [--gpu-memory GIB] [--phase NAME]``: the memory per GPU of a recipe's
training (:mod:`srde_plugins.runtime.plan`, imported only when the command runs)."""

from __future__ import annotations

from srde_core.errors import UsageError


def add_plan(subparsers) -> None:
    p = subparsers.add_parser("plan", help="memory per GPU of a recipe's training (model on the meta device, no download)")
    p.add_argument("recipe", help="recipe TOML file, or a shipped preset: srde:tiny, srde:max, ...")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one recipe key (TOML value), e.g. --set phases.joint.steps=50; repeatable",
    )
    p.add_argument("--gpus", type=int, default=1, help="GPUs the engine shards over (default 1)")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB", help="memory of one GPU, GiB (default 80)")
    p.add_argument("--phase", default=None, help="the phase to plan (default: the last)")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    if args.gpus < 1:
        raise UsageError(f"--gpus must be at least 1, got {args.gpus}")
    if not 0 < args.gpu_memory < float("inf"):  # also refuses nan
        raise UsageError(f"--gpu-memory must be a positive number of GiB, got {args.gpu_memory}")
    from rich.console import Console

    from srde_core.plugins import load_plugins
    from srde_core.recipe import load_recipe
    from srde_plugins.runtime.plan import plan_memory, print_plan

    plugins = load_plugins()
    recipe = load_recipe(args.recipe, plugins, args.overrides)
    vocab = None
    if not recipe.model.name_or_path and "vocab_size" not in recipe.model.config:
        from srde_core.data.loading import recipe_tokenizer

        vocab = recipe_tokenizer(recipe, plugins).vocab_size
    plan = plan_memory(recipe, gpus=args.gpus, phase=args.phase, tokenizer_vocab=vocab)
    print_plan(plan, Console(highlight=False), gpu_memory_gib=args.gpu_memory)
    return 0
