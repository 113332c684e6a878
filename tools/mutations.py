"""Mutation testing: plant small plausible bugs and check that the tests catch each one.

    python tools/mutations.py                 every mutation
    python tools/mutations.py -k accum        the mutations whose name contains "accum"
    python tools/mutations.py --list          list them
    python tools/mutations.py --changed       before a commit: the mutations whose file or tests differ from HEAD
    python tools/mutations.py --changed main  ... from another revision

Each mutation is a text replacement in one file of a copy of this checkout (its tracked and
untracked, not ignored files) in a temporary directory. The selected test files then run there,
``python -m pytest -q -x``, with ``PYTHONPATH`` naming the copy so that its ``srde_core`` and
``srde_plugins`` are imported instead of the editable install (checked before anything runs). The
unmutated copy must pass the same tests first. A mutation is *killed* when a test fails; the script
prints which one, or ``SURVIVED``, and exits non-zero when any mutation survived. A mutation names
test files or single tests (``file::test``); only those run for it, so ``--changed`` (the mutations
whose source file or tests differ from a revision, uncommitted and untracked files included) is
quick enough to run before a commit.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Tests that fail on the unmutated tree because of a known, reported bug: deselected until it is fixed.
KNOWN_FAILURES: list[str] = []


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


LOSSES = ("tests/test_losses.py",)
MUTATIONS = [
    Mutation("load balance from soft probabilities instead of routed fractions",
             "plugins/srde_plugins/losses/router.py",
             "fraction = counts / counts.sum().clamp_min(1.0)", "fraction = probs.mean(dim=0)", LOSSES),
    Mutation("router losses summed over layers instead of averaged",
             "plugins/srde_plugins/losses/router.py",
             "for r in inputs.routings]).mean()", "for r in inputs.routings]).sum()", LOSSES),
    Mutation("routed load counts only the first of the k choices (router losses)",
             "plugins/srde_plugins/losses/router.py",
             "torch.bincount(experts.reshape(-1), minlength=routing.num_experts)",
             "torch.bincount(experts[:, 0], minlength=routing.num_experts)", LOSSES),
    Mutation("router z-loss without the square",
             "plugins/srde_plugins/losses/router.py",
             "torch.logsumexp(logits, dim=-1).pow(2).mean()", "torch.logsumexp(logits, dim=-1).mean()", LOSSES),
    Mutation("routed load counts only the first of the k choices",
             "srde_core/model/routing.py",
             "counts.scatter_add_(0, flat, torch.ones_like(flat))",
             "counts.scatter_add_(0, self.experts[:, 0], torch.ones_like(self.experts[:, 0]))", ("tests/test_router.py",)),
    Mutation("LM loss ignores label smoothing",
             "plugins/srde_plugins/losses/lm.py",
             "F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction=\"sum\")",
             "F.cross_entropy(logits, targets, reduction=\"sum\")", LOSSES),
    Mutation("chunked LM loss keeps only the last chunk",
             "plugins/srde_plugins/losses/lm.py",
             "total = value if total is None else total + value", "total = value", ("tests/test_lm_chunks.py",)),
    Mutation("srde plan keeps a full copy of the gradients under ZeRO-2",
             "plugins/srde_plugins/runtime/plan.py", "counts.trainable_bytes // layout.grad_shards,", "counts.trainable_bytes,",
             ("tests/test_plan.py",)),
    Mutation("srde plan counts one AdamW moment instead of two",
             "plugins/srde_plugins/runtime/plan.py", "optimizer_kept * ADAM_MOMENTS * 4 * numel", "optimizer_kept * 4 * numel",
             ("tests/test_plan.py::test_each_line_is_the_count_worked_out_by_hand",)),
    Mutation("srde plan leaves out DeepSpeed's fp32 master copy",
             "plugins/srde_plugins/runtime/deepspeed.py", "master_copy=True,", "master_copy=False,",
             ("tests/test_plan.py::test_zero_stages_shard_optimiser_state_gradients_and_parameters",)),
    Mutation("srde plan leaves out the allocator margin",
             "plugins/srde_plugins/runtime/plan.py", "int(FRAGMENTATION * allocated)", "0",
             ("tests/test_plan.py::test_the_peak_is_the_largest_phase_or_transition_and_max_fits_one_gpu_with_margins",)),
    Mutation("the checkpoint recomputation runs without the forward context",
             "srde_core/model/context.py", 'return {"use_reentrant": False, "context_fn": checkpoint_context_fn}',
             'return {"use_reentrant": False}', ("tests/test_gradient_checkpointing.py",)),
    Mutation("a closed DeepSpeed session keeps ZeRO-3's optimiser on its parameters",
             "plugins/srde_plugins/runtime/deepspeed.py", 'parameter.__dict__.pop("_z3_optimizer", None)', "pass",
             ("tests/test_engine_teardown.py",)),
    Mutation("srde plan counts the activations of the layers before the first one with experts",
             "plugins/srde_plugins/runtime/plan.py", "layers = experts.stack.num_layers - first", "layers = experts.stack.num_layers",
             ("tests/test_plan.py",)),
    Mutation("resume skips restore_rng",
             "srde_core/train/driver.py", "            restore_rng(rng)", "            pass",
             ("tests/test_resume_rng.py",)),
    Mutation("resume skips session.load (engine state)",
             "srde_core/train/driver.py", "        session.load(checkpoint.path)", "        pass",
             ("tests/test_resume_rng.py",)),
    Mutation("supervised_step drops the accumulation scaling",
             "srde_core/train/objective.py",
             "ctx.session.backward(loss * share)", "ctx.session.backward(loss)", ("tests/test_grad_accum.py",)),
    Mutation("accumulation weights micro-batches equally instead of by their labelled tokens",
             "srde_core/train/objective.py",
             "return [float(c) / total for c in counts]", "return [1.0 / len(batches)] * len(batches)",
             ("tests/test_grad_accum.py",)),
    Mutation("srde_checkpoint_loaded not called on resume",
             "srde_core/train/driver.py",
             "        run.hook.srde_checkpoint_loaded(state=trainer_state, run=run)", "        pass",
             ("tests/test_hooks.py",)),
    Mutation("plugin state not collected before a checkpoint",
             "srde_core/train/driver.py",
             "                run.hook.srde_checkpoint_saving(state=trainer_state, run=run)", "                pass",
             ("tests/test_hooks.py",)),
    Mutation("srde_after_step gets 0-based steps",
             "srde_core/train/driver.py", "step=done, metrics=metrics)", "step=step, metrics=metrics)",
             ("tests/test_hooks.py",)),
    Mutation("srde_configure_model not called when experts attach",
             "srde_core/model/build.py",
             "    run.hook.srde_configure_model(model=run.model, run=run)", "    pass", ("tests/test_hooks.py",)),
    Mutation("a bank that does not trace is traced into the compiled layer (no eager island)",
             "srde_core/model/layer.py",
             "else partial(_eager_bank, bank)", "else bank", ("tests/test_compile.py",)),
    Mutation("max_grad_norm = 0 clips to zero instead of disabling clipping",
             "srde_core/train/engine.py",
             "max_grad_norm=phase.max_grad_norm or None,", "max_grad_norm=phase.max_grad_norm,",
             ("tests/test_run_paths.py",)),
    Mutation("newer checkpoint format accepted",
             "srde_core/train/checkpoints.py", "if version > FORMAT_VERSION:", "if False:",
             ("tests/test_run_paths.py",)),
    Mutation("--fresh keeps the old run directory",
             "srde_core/run.py", "        shutil.rmtree(run_dir)\n    run_dir.mkdir(parents=True, exist_ok=True)", "        pass\n    run_dir.mkdir(parents=True, exist_ok=True)",
             ("tests/test_run_paths.py",)),
    Mutation("corpus: a*b-c answered as a*b+c",
             "plugins/srde_plugins/data/domains/arithmetic.py", "str(a * b - c)", "str(a * b + c)", ("tests/test_corpus.py",)),
    Mutation("corpus: the converse syllogism answered yes",
             "plugins/srde_plugins/data/domains/logic.py", 'Is {name} a {a}?", "unknown"', 'Is {name} a {a}?", "yes"',
             ("tests/test_corpus.py",)),
    Mutation("corpus: kinetic energy without the 1/2",
             "plugins/srde_plugins/data/domains/science.py", "str(m * v * v // 2)", "str(m * v * v)", ("tests/test_corpus.py",)),
    Mutation("corpus: grid steps from mixed-up coordinates",
             "plugins/srde_plugins/data/domains/planning.py",
             "str(abs(x1 - x2) + abs(y1 - y2))", "str(abs(x1 - y1) + abs(x2 - y2))", ("tests/test_corpus.py",)),
    Mutation("spiel grows where the gradient is smallest",
             "plugins/srde_plugins/deltas/sparse/learned.py",
             "grow = torch.gather(self.pool, 1, torch.topk(score, moves, dim=1).indices)",
             "grow = torch.gather(self.pool, 1, torch.topk(score, moves, dim=1, largest=False).indices)",
             ("tests/test_learned_selectors.py",)),
    Mutation("gumbel mask without the straight-through relaxation (no gradient to the logits)",
             "plugins/srde_plugins/deltas/sparse/learned.py",
             "return hard + (soft - soft.detach())", "return hard", ("tests/test_learned_selectors.py",)),
    Mutation("learned selectors' step counter is not checkpointed",
             "plugins/srde_plugins/deltas/sparse/learned.py",
             'self.register_buffer("progress", torch.zeros(2, dtype=torch.long))  # steps done, phase steps\n'
             "        return candidates",
             'self.register_buffer("progress", torch.zeros(2, dtype=torch.long), persistent=False)\n'
             "        return candidates",
             ("tests/test_learned_selectors.py",)),
    Mutation("dynamic sparsity ranks entries by ascending priority",
             "plugins/srde_plugins/deltas/sparse/dynamic/bank.py",
             "torch.argsort(priority, dim=1, descending=True, stable=True)",
             "torch.argsort(priority, dim=1, descending=False, stable=True)", ("tests/test_dynamic_sparsity.py",)),
    Mutation("dynamic sparsity rounds a budget up to the next level",
             "plugins/srde_plugins/deltas/sparse/dynamic/bank.py",
             "budget.to(torch.float32).contiguous(), right=True) - 1", "budget.to(torch.float32).contiguous(), right=False)",
             ("tests/test_dynamic_sparsity.py",)),
    Mutation("difficulty loss counts padding tokens",
             "plugins/srde_plugins/deltas/sparse/dynamic/loss.py",
             "keep = keep & real.to(keep.device)", "keep = keep", ("tests/test_dynamic_sparsity.py",)),
    Mutation("domain-balanced batches give the left-over slots to the same domains every step",
             "plugins/srde_plugins/data/balanced.py",
             "dealt = step * extra", "dealt = 0", ("tests/test_domain_shards.py",)),
    Mutation("per-example base scores computed with the experts on",
             "plugins/srde_plugins/data/scores.py",
             "evaluation_state(run.model, run.experts, enabled=False)", "evaluation_state(run.model, run.experts, enabled=True)",
             ("tests/test_curriculum.py",)),
    Mutation("per-example base scores never read back from the cache",
             "plugins/srde_plugins/data/scores.py",
             "if cached is not None and len(cached) == len(run.data.train):", "if False:", ("tests/test_curriculum.py",)),
    Mutation("reward model fitted to its own predictions instead of the verifier's rewards",
             "plugins/srde_plugins/rl/reward_model.py",
             "loss = fit_loss(self.params.objective, fitted, rewards.float(), self.group_size)",
             "loss = fit_loss(self.params.objective, fitted, predicted.float(), self.group_size)", ("tests/test_rl.py",)),
    Mutation("reward model left out of the RL checkpoints",
             "plugins/srde_plugins/rl/trainer.py",
             'self.reward_model = state["reward_model"] = RewardModelTrainer(', "self.reward_model = RewardModelTrainer(",
             ("tests/test_rl.py",)),
    Mutation("GRPO advantages not divided by the group's std",
             "plugins/srde_plugins/rl/objective.py",
             "return (centred / (grouped.std(1, keepdim=True) + eps)).reshape(-1)", "return centred.reshape(-1)",
             ("tests/test_rl_maths.py",)),
    Mutation("PPO clip range inverted",
             "plugins/srde_plugins/rl/objective.py",
             "ratio.clamp(1 - clip, 1 + clip)", "ratio.clamp(1 + clip, 1 - clip)", ("tests/test_rl_maths.py",)),
    Mutation("GAE ignoring lambda",
             "plugins/srde_plugins/rl/objective.py",
             "running = (delta + gamma * lam * running * carry)", "running = (delta + gamma * running * carry)",
             ("tests/test_rl_maths.py",)),
    Mutation("k3 KL with the log-ratio's sign flipped",
             "plugins/srde_plugins/rl/objective.py", "log_ratio = ref - new", "log_ratio = new - ref",
             ("tests/test_rl_maths.py",)),
    Mutation("RL value loss not clipped",
             "plugins/srde_plugins/rl/objective.py",
             "return 0.5 * torch.maximum(unclipped, clipped)", "return 0.5 * unclipped", ("tests/test_rl_maths.py",)),
    Mutation("RL log-probs at temperature 1 instead of the sampling temperature",
             "plugins/srde_plugins/rl/objective.py", "torch.log_softmax(logits.float() / temperature, dim=-1)",
             "torch.log_softmax(logits.float(), dim=-1)", ("tests/test_rl_maths.py",)),
    Mutation("PPO advantages whitened per process",
             "plugins/srde_plugins/rl/objective.py", "stats = dist.all_sum(torch.stack(", "stats = (torch.stack(",
             ("tests/test_rl_maths.py",)),
    Mutation("RL utilisation counts padded answer slots",
             "plugins/srde_plugins/rl/objective.py",
             "weights = valid[..., None].expand_as(picked).to(torch.float64)",
             "weights = torch.ones_like(picked, dtype=torch.float64)", ("tests/test_rl_maths.py",)),
    Mutation("proportional KL controller without its error clip",
             "plugins/srde_plugins/rl/kl.py",
             "error = min(max(kl / self.target - 1.0, -0.2), 0.2)", "error = kl / self.target - 1.0",
             ("tests/test_rl_maths.py",)),
    Mutation("RL old log-probs not on the update's random stream",
             "plugins/srde_plugins/rl/trainer.py",
             "with self.same_noise(seed, run.device), self.experts.forward_context(ForwardContext()) as seen:",
             "with self.experts.forward_context(ForwardContext()) as seen:",
             ("tests/test_rl.py::test_grpo_raises_the_reward_with_old_and_new_log_probs_that_agree",)),
    Mutation("RL KL reference defaults to the experts off",
             "plugins/srde_plugins/rl/__init__.py",
             '"initial", description="the KL reference', '"experts_off", description="the KL reference',
             ("tests/test_rl.py::test_ppo_with_a_reward_model_learns_and_resumes_exactly",)),
    Mutation("forced routing weighted by 1 / router top_k instead of 1 / experts forced per token",
             "srde_core/model/routing.py",
             "1.0 / forced.shape[1], device=x.device", "1.0 / self.top_k, device=x.device", ("tests/test_router.py",)),
    Mutation("softmax_topk gate weights are the full-softmax probabilities",
             "plugins/srde_plugins/routing/topk.py",
             "weights = F.softmax(top_logits, dim=-1)", "weights = torch.gather(probs, 1, experts)",
             ("tests/test_router.py",)),
    Mutation("soft_merge detaches the router probabilities (no task gradient to the router)",
             "plugins/srde_plugins/routing/fusion.py",
             "routing.with_weights(routing.probs, experts)", "routing.with_weights(routing.probs.detach(), experts)",
             ("tests/test_fusion.py",)),
    Mutation("gated fusion without the factor 2 (an untrained gate halves the experts)",
             "plugins/srde_plugins/routing/fusion.py",
             "routing.weights * 2.0 * torch.sigmoid(scores)", "routing.weights * torch.sigmoid(scores)",
             ("tests/test_fusion.py",)),
    Mutation("gumbel noise with the sign flipped (log E instead of -log E)",
             "plugins/srde_plugins/deltas/sparse/learned.py",
             "self._noise = (step, -torch.log(exponential", "self._noise = (step, torch.log(exponential",
             ("tests/test_learned_selectors.py::test_gumbel_noise_is_standard_gumbel_fresh_per_step_and_the_same_within_one",)),
    Mutation("gumbel hardens to the lowest logits",
             "plugins/srde_plugins/deltas/sparse/learned.py",
             "top = torch.topk(self.logits, self.count, dim=1).indices",
             "top = torch.topk(self.logits, self.count, dim=1, largest=False).indices",
             ("tests/test_learned_selectors.py::test_gumbel_hardens_to_the_chosen_positions_and_the_optimiser_state_follows",)),
    Mutation("ZeRO-3 adapter exported without gathering the partitioned parameters",
             "plugins/srde_plugins/runtime/deepspeed.py",
             "        with self.gather(list(module.parameters())):\n            yield {name: t.detach().clone()",
             "        with contextlib.nullcontext():\n            yield {name: t.detach().clone()",
             ("tests/test_zero3_export.py",)),
    Mutation("schedule and trainer state left out of the checkpoints",
             "srde_core/train/driver.py",
             '"state": {name: obj.state_dict() for name, obj in state.items()},', '"state": {},',
             ("tests/test_resume_rng.py",)),
    Mutation("metrics written on every process, not the main one only",
             "srde_core/train/driver.py", "if logged and dist.is_main:", "if logged:",
             ("tests/test_ddp.py::test_a_process_other_than_the_main_one_writes_no_metrics_and_no_trainer_state",)),
    Mutation("plugins register by entry-point name alone (a third party sorting first takes a built-in's name)",
             "srde_core/plugins.py", "candidates.sort(key=lambda c: (c[1] != PROJECT_DISTRIBUTION, c[0]))",
             "candidates.sort(key=lambda c: c[0])",
             ("tests/test_plugins.py::test_a_plugin_sorting_first_cannot_take_over_a_builtin_loss",)),
    Mutation("a plugin replaces a built-in without saying override=True",
             "srde_core/plugins.py", "if component.override and taken.provider in builtins", "if taken.provider in builtins",
             ("tests/test_plugins.py::test_a_third_party_trainer_named_joint_leaves_the_builtin_in_charge",)),
    Mutation("attach reads a shared layer's weight shape outside the gather (ZeRO-3 shows (0,))",
             "srde_core/model/attach.py",
             "with gather([weight]):  # a partitioned weight (ZeRO-3) shows its shape only gathered",
             "with contextlib.nullcontext():",
             ("tests/test_scale_delta.py::test_layers_share_banks_over_partitioned_weights",)),
    Mutation("eval forwards get a context without the token ids",
             "srde_core/evaluate/losses.py", 'experts.make_context(batch, "eval") if experts is not None',
             'ForwardContext(domain_ids=batch["domain_ids"], mode="eval") if experts is not None',
             ("tests/test_forward_context.py::test_a_token_hash_router_trains_evaluates_and_generates",)),
    Mutation("the core's step driver does not step the banks' selectors",
             "srde_core/train/driver.py", "run.experts.step_selectors(done, phase.steps, dist)", "pass",
             ("tests/test_selector_steps.py",)),
    Mutation("generation gets no context from the core",
             "srde_core/model/attach.py", "        if self.context.current is not None:\n            self._auto.append",
             "        if True:\n            self._auto.append",
             ("tests/test_forward_context.py::test_a_token_hash_router_trains_evaluates_and_generates",)),
]


def changed_files(revision: str) -> set[str]:
    """Paths that differ from ``revision`` in the working tree, and untracked files (not ignored)."""
    def git(*args: str) -> list[str]:
        result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"mutations: git {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout.splitlines()

    return {*git("diff", "--name-only", revision, "--"), *git("ls-files", "--others", "--exclude-standard")}


def touches(mutation: Mutation, changed: set[str]) -> bool:
    return mutation.path in changed or any(test.split("::")[0] in changed for test in mutation.tests)


def copy_checkout(target: Path) -> None:
    """Copy the checkout's tracked and untracked, not ignored files (symlinks as links)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            os.symlink(os.readlink(source), destination)
        else:
            shutil.copy2(source, destination)


def environment(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), str(copy / "plugins"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_imports(copy: Path) -> None:
    """The copy's packages, not the editable install's, must be the ones imported."""
    code = (
        "import srde_core, srde_plugins, srde_plugins.losses.router, srde_core.train.driver\n"
        "for m in (srde_core, srde_plugins, srde_plugins.losses.router, srde_core.train.driver):\n"
        "    print(m.__file__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=environment(copy), check=True,
                         capture_output=True, text=True).stdout.split()
    outside = [f for f in out if not Path(f).resolve().is_relative_to(copy.resolve())]
    if outside:
        raise SystemExit(f"mutations: modules imported from outside the copy: {outside}")


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[bool, str]:
    """(passed, the first failing test or the tail of the output)."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    for known in KNOWN_FAILURES:
        if known.split("::")[0] in {t.split("::")[0] for t in tests}:
            command += ["--deselect", known]
    result = subprocess.run(command, cwd=copy, env=environment(copy), capture_output=True, text=True)
    output = result.stdout + result.stderr
    if result.returncode == 0:
        return True, ""
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.MULTILINE)
    return False, failed[0] if failed else "\n".join(output.strip().splitlines()[-5:])


def apply(copy: Path, mutation: Mutation) -> str:
    path = copy / mutation.path
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:
        raise SystemExit(f"mutations: '{mutation.name}': expected the text once in {mutation.path}, found {count}")
    path.write_text(text.replace(mutation.old, mutation.new))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="pattern", default="", help="only mutations whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--changed", nargs="?", const="HEAD", default=None, metavar="REV",
                        help="only mutations whose file or tests differ from REV (default HEAD)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.pattern.lower() in m.name.lower()]
    if args.changed is not None:
        changed = changed_files(args.changed)
        chosen = [m for m in chosen if touches(m, changed)]
        if not chosen:
            print(f"no mutation touches the files changed since {args.changed}")
            return 0
    if args.list:
        for m in chosen:
            print(f"{m.name}  ({m.path}; {', '.join(m.tests)})")
        return 0
    with tempfile.TemporaryDirectory(prefix="srde-mutations-") as tmp:
        copy = Path(tmp) / "repo"
        copy_checkout(copy)
        check_imports(copy)
        baseline = tuple(sorted({t for m in chosen for t in m.tests}))
        started = time.perf_counter()
        passed, detail = run_tests(copy, baseline)
        if not passed:
            print(f"baseline: the unmutated copy fails {detail}; fix that first")
            return 2
        print(f"baseline: {' '.join(baseline)} pass on the unmutated copy ({time.perf_counter() - started:.0f}s)")
        survived = 0
        for mutation in chosen:
            original = apply(copy, mutation)
            started = time.perf_counter()
            try:
                passed, detail = run_tests(copy, mutation.tests)
            finally:
                (copy / mutation.path).write_text(original)
            took = f"{time.perf_counter() - started:.0f}s"
            if passed:
                survived += 1
                print(f"SURVIVED  {mutation.name}  ({mutation.path}; {took})")
            else:
                print(f"killed    {mutation.name}  by {detail}  ({took})")
            sys.stdout.flush()
    print(f"{len(chosen) - survived} of {len(chosen)} mutations killed")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
