"""The ``srde`` command line.

    srde run RECIPE [--set key=value ...] [--resume | --fresh]     (RECIPE: a file or srde:NAME)
    srde validate RECIPE [--set ...]        srde show RECIPE [--set ...] [--json]
    srde list-plugins [--json]               srde eval RUN_DIR [--json]
    srde generate RUN_DIR --prompt TEXT
    and the plugins' commands (``srde_add_commands``): srde plan RECIPE [--gpus N] [--gpu-memory GIB]
    (the runtime plugin's), srde lm-eval RUN_DIR --tasks T[,T] (the tracking plugin's)

Every error ends in one line on stderr, ``srde: error: ...``, and an exit status: 2 for what the
user wrote (the recipe, data, the command line, a plugin that fails to load), 1 for what could not
be done (the run directory, the file system, a checkpoint, training that diverged, a plugin that
failed during a run: its traceback goes to ``RUN_DIR/error.log``). ``--debug`` shows the traceback
instead. ``--help``, ``list-plugins`` and ``show`` never import torch (``validate`` builds the model on
the meta device).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from collections.abc import Sequence

from srde_core import __version__
from srde_core.errors import SRDEError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse with its mistakes in the one-line form of every other error (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"srde: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe TOML file, or a shipped preset: srde:tiny, srde:max, ...")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one recipe key (TOML value), e.g. --set phases.joint.steps=50; repeatable",
    )


def _load(args):
    from srde_core.plugins import load_plugins
    from srde_core.recipe import load_recipe

    plugins = load_plugins()
    return load_recipe(args.recipe, plugins, args.overrides), plugins


def cmd_validate(args) -> int:
    recipe, plugins = _load(args)
    from srde_core.recipe.check import check_recipe

    check_recipe(recipe, plugins)  # the components build; the model and its experts build on the meta device
    phases = ", ".join(f"{p.name} [{p.trainer.name}]" for p in recipe.phases)
    print(f"{args.recipe}: ok — recipe '{recipe.name}', phases: {phases}")
    for broken in plugins.broken:  # e.g. a plugin that registered a name a built-in has
        print(f"srde: warning: plugin '{broken.name}' failed to load: {broken.error}", file=sys.stderr)
    return 0


def cmd_show(args) -> int:
    import tomli_w

    recipe, _ = _load(args)
    if args.json:
        print(json.dumps(recipe.resolved, indent=2, sort_keys=True))
    else:
        print(tomli_w.dumps(_drop_none(recipe.resolved)), end="")
    return 0


def _drop_none(value):
    """TOML has no null: unset optional keys are left out of ``srde show``."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def cmd_list_plugins(args) -> int:
    from srde_core.plugins import load_plugins, provided_by

    plugins = load_plugins()
    if args.json:
        data = {
            "plugins": [
                {
                    "name": p.name, "distribution": p.distribution, "version": p.version,
                    "summary": p.summary, "error": p.error,
                    "provides": [{"kind": k, "name": n} for k, n in provided_by(plugins, p.name)],
                }
                for p in plugins.plugins
            ],
            "kinds": [
                {"kind": r.kind, "plugin": r.spec.provider, "summary": r.spec.summary, "contract": _contract_name(r.spec.contract)}
                for r in plugins.registries.kinds.values()
            ],
            "components": [
                {"kind": c.kind, "name": c.name, "plugin": c.provider, "summary": c.summary}
                for c in plugins.registries.components()
            ],
        }
        print(json.dumps(data, indent=2))
        return 0
    from rich.table import Table

    table = Table(title="SRDE plugins", title_justify="left")
    for column in ("plugin", "distribution", "provides", "summary"):
        table.add_column(column)
    for p in plugins.plugins:
        provides = {}
        for kind, name in provided_by(plugins, p.name):
            provides.setdefault(kind, []).append(name)
        text = "\n".join(f"{k}: {', '.join(v)}" for k, v in provides.items())
        if p.error:
            table.add_row(f"[red]{p.name}[/]", f"{p.distribution} {p.version}", "[red]broken[/]", f"[red]{p.error}[/]")
        else:
            table.add_row(p.name, f"{p.distribution} {p.version}", text, p.summary)
    kinds = Table(title="Component kinds", title_justify="left")
    for column in ("kind", "declared by", "contract", "summary"):
        kinds.add_column(column)
    for registry in plugins.registries.kinds.values():
        spec = registry.spec
        kinds.add_row(spec.name, spec.provider, _contract_name(spec.contract).rsplit(":", 1)[-1], spec.summary)
    components = Table(title="Components", title_justify="left")
    for column in ("kind", "name", "plugin", "summary"):
        components.add_column(column)
    for c in plugins.registries.components():
        components.add_row(c.kind, c.name, c.provider, c.summary)
    console = _console()
    console.print(table)
    console.print(kinds)
    console.print(components)
    return 0


def _contract_name(contract) -> str:
    if contract is None:
        return ""
    return contract if isinstance(contract, str) else f"{contract.__module__}:{contract.__qualname__}"


def cmd_run(args) -> int:
    if args.resume and args.fresh:
        raise UsageError("--resume and --fresh exclude each other")
    recipe, plugins = _load(args)
    from srde_core.run import execute, run_directory

    args.plugins_loaded, args.log_dir = plugins, run_directory(recipe)

    run = execute(recipe, plugins, _console(), resume=args.resume, fresh=args.fresh)
    # the main process evaluates the model; where the engine's forwards are collective (ZeRO-3
    # fetches each layer's weights from every process as it runs) every process takes part
    with run.engine.forward_only(run.model) as forward:
        if run.dist.is_main or run.engine.collective_forwards:
            from srde_core.evaluate.report import print_loss_summary

            print_loss_summary(run, forward=forward)
    # leave the process group before the interpreter exits: a group left to be torn down at exit
    # can abort a process (gloo's threads) after the run has finished
    run.dist.close()
    return 0


def _write_plots(run_dir, evaluation) -> list[Path]:
    """What every ``plots`` component writes for the run (the built-in tracking plugin's ``png``)."""
    from srde_core.params import NoParams
    from srde_core.plugins import load_plugins

    plugins = load_plugins()
    if "plots" not in plugins.registries or not plugins.registries["plots"].names():
        raise SRDEError(f"--plots needs a plugin that registers plots (the built-in 'tracking'){plugins.broken_note()}")
    return [path for component in plugins.registries["plots"] for path in component.build(NoParams())(run_dir, evaluation)]


def cmd_eval(args) -> int:
    if args.max_examples is not None and args.max_examples < 1:
        raise UsageError(f"--max-examples must be at least 1, got {args.max_examples}")
    from srde_core.evaluate.report import evaluate_run

    console = _console()
    result = evaluate_run(args.run_dir, console, max_examples=args.max_examples, as_json=args.json)
    if args.plots:
        written = _write_plots(args.run_dir, result)
        print(f"plots: {len(written)} PNG files in {Path(args.run_dir) / 'plots'}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_generate(args) -> int:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    from srde_core.api import generate

    print(generate(args.run_dir, args.prompt, max_new_tokens=args.max_new_tokens, experts=not args.no_experts))
    return 0


DEBUG_HELP = "show the full traceback of an error instead of its one line"


def _move_after(sub, name: str, after: str) -> None:
    """List the command ``name`` (a plugin's, if one adds it) right after ``after``: in the help and the choices."""
    if name not in sub.choices:
        return
    names = [n for n in sub.choices if n != name]
    names.insert(names.index(after) + 1, name)
    parsers = dict(sub.choices)
    sub.choices.clear()  # the same dict as the one add_parser fills
    sub.choices.update((n, parsers[n]) for n in names)
    sub._choices_actions.sort(key=lambda action: names.index(action.dest))


def build_parser(plugins=None) -> argparse.ArgumentParser:
    """The parser of every command, the plugins' (``srde_add_commands``) after ``eval`` (``plan`` after ``show``)."""
    parser = _Parser(prog="srde", description="Sparse Routed Delta Experts on a frozen LLM.")
    parser.add_argument("--version", action="version", version=f"srde {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("run", help="run a recipe's phases")
    _add_recipe_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    p.add_argument("--fresh", action="store_true", help="delete an existing run directory first")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a recipe without running it")
    _add_recipe_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("show", help="print the resolved recipe (extends and --set applied, defaults filled)")
    _add_recipe_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("list-plugins", help="list plugins and the components they provide")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list_plugins)

    p = sub.add_parser("eval", help="per-domain loss and accuracy, routing analysis of a finished run")
    p.add_argument("run_dir")
    p.add_argument("--max-examples", type=int, default=None, help="examples per domain (default: the recipe's)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plots", action="store_true", help="also write PNG figures into RUN_DIR/plots (needs matplotlib)")
    p.set_defaults(func=cmd_eval)

    if plugins is None:
        from srde_core.plugins import load_plugins

        plugins = load_plugins()
    plugins.hook.srde_add_commands(subparsers=sub)  # plan (the runtime plugin's), lm-eval (the tracking plugin's)

    p = sub.add_parser("generate", help="generate text with a run's model and experts")
    p.add_argument("run_dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-experts", action="store_true", help="use the base model alone")
    p.set_defaults(func=cmd_generate)
    _move_after(sub, "plan", "show")  # where the help has always listed it
    for command in sub.choices.values():  # also accepted after the command: srde run x.toml --debug
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    # The deepspeed launcher (and torch.distributed.launch) pass --local_rank=N before the command.
    for command in (parser, sub.choices["run"]):
        command.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=argparse.SUPPRESS,
                             help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a mistake already printed in one line
        return done.code if isinstance(done.code, int) else 0
    if getattr(args, "local_rank", None) is not None:  # a launcher's --local_rank: what LOCAL_RANK says
        import os

        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        return args.func(args)
    except SRDEError as err:
        if args.debug:
            raise
        print(f"srde: error: {err.line()}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("srde: interrupted (a run continues with --resume)", file=sys.stderr)
        return 130
    except UnicodeDecodeError as err:
        if args.debug:
            raise
        from srde_core.errors import undecodable_file

        where = undecodable_file(err) or "a file"
        print(f"srde: error: {where}: not UTF-8 text ({err.reason} at byte {err.start})", file=sys.stderr)
        return 2
    except Exception as err:
        if args.debug:
            raise
        line = _collective_failure_line(args, err) or _plugin_failure_line(args, err)
        if line is None:
            raise  # not a plugin's: a bug of srde itself, shown in full
        print(f"srde: error: {line}", file=sys.stderr)
        return 1


def _collective_failure_line(args, err: Exception) -> str | None:
    """One line when a collective failed because another process of a distributed run died or hung
    (its own output says why); the process group is left so that this process ends at once."""
    from srde_core.dist import Dist, collective_failure

    reason = collective_failure(err)
    if reason is None:
        return None
    dist = Dist.from_env()
    where = f"{args.log_dir}: " if getattr(args, "log_dir", None) is not None else ""
    return (f"{where}process {dist.rank} of {dist.world_size}: a collective with the other processes failed "
            f"({reason}); another process ended or hangs, its own output says why; the run continues with --resume")


def _plugin_failure_line(args, err: Exception) -> str | None:
    """One line for an exception raised by a plugin's hook or component (naming both and the
    error), with the traceback written to ``RUN_DIR/error.log`` (or a temporary file when the
    run directory does not exist yet); None when no plugin code raised it."""
    from srde_core.errors import one_line, plugin_failure

    plugins = getattr(args, "plugins_loaded", None)
    if plugins is None:
        from srde_core.plugins import load_plugins

        plugins = load_plugins()
    culprit = plugin_failure(err, plugins)
    if culprit is None:
        return None
    plugin, what = culprit
    log = _write_error_log(err, getattr(args, "log_dir", None) or getattr(args, "run_dir", None))
    return f"plugin '{plugin}' failed{f' in {what}' if what else ''}: {one_line(err)} (traceback: {log}; --debug shows it)"


def _write_error_log(err: BaseException, run_dir) -> Path:
    import datetime
    import os
    import tempfile
    import traceback

    from srde_core.dist import Dist

    text = "".join(traceback.format_exception(err))
    header = f"--- {datetime.datetime.now().isoformat(timespec='seconds')}  srde {' '.join(sys.argv[1:])}\n"
    target = Path(run_dir) / "error.log" if run_dir is not None else None
    try:
        if target is None or not target.parent.is_dir() or not Dist.from_env().is_main:
            raise OSError
        with target.open("a", encoding="utf-8") as f:
            f.write(header + text)
    except OSError:  # no run directory (yet), or not this process's to write: a file of its own
        fd, name = tempfile.mkstemp(prefix="srde-error-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(header + text)
        target = Path(name)
    return target


if __name__ == "__main__":
    sys.exit(main())
