"""Training step time with every decoder layer compiled (the `compile` plugin) vs eager, on the tiny model.

The model is ``recipes/tiny.toml``'s (hidden 256, 4 layers, 32k vocabulary; sparse experts 8 x top-2
on gate/up/down_proj, attached as the trainers attach them). For each phase kind, two copies of the
same model run one training step each per round, interleaved (the order alternates), after warm-up
steps that include the compiles; the medians are compared:

- base: the dense base pre-training step (every parameter trains);
- srde: the expert step (frozen base, experts and routers train; a new routing every step).

One step is forward, the LM loss on the answer tokens (the LM head on labelled rows only, as the
``lm`` loss does), backward and AdamW. The graph breaks of one decoder layer
(``torch._dynamo.explain``) are printed for each phase kind with their reasons.

Run: ``python benchmarks/compile_speed.py`` (``--help`` for the options; set TORCHINDUCTOR_CACHE_DIR
to keep compiled kernels between runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from srde_core.model.architectures import find_decoder_stack
from srde_core.model.build import attach_recipe_experts, model_class
from srde_core.plugins import load_plugins
from srde_core.recipe import load_recipe
from srde_plugins.compile import CompileParams
from srde_plugins.compile.regional import RegionalCompiler, backend_problem, graph_breaks

TINY = Path(__file__).resolve().parent.parent / "recipes" / "tiny.toml"
VOCAB = 32768  # the Mistral v3 SentencePiece vocabulary tiny.toml uses


class Variant:
    """One model copy of a phase kind and its training step."""

    def __init__(self, recipe, kind: str, args):
        torch.manual_seed(recipe.seed)
        cls = model_class(recipe.model.architecture)
        config = cls.config_class(**{"vocab_size": VOCAB, **recipe.model.config})
        self.model = cls._from_config(config, dtype=getattr(torch, recipe.model.dtype)).train()
        self.model.config.use_cache = False
        self.srde = attach_recipe_experts(self.model, recipe) if kind == "srde" else None
        if self.srde is not None:
            self.layers = self.srde.stack.layers
            params = list(self.srde.trainable_parameters().values())
        else:
            self.layers = find_decoder_stack(self.model).layers
            params = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(self, ids: torch.Tensor, labels: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        if self.srde is not None:
            with self.srde.forward_context():
                hidden = self.model.model(input_ids=ids).last_hidden_state
        else:
            hidden = self.model.model(input_ids=ids).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != -100
        loss = F.cross_entropy(self.model.lm_head(hidden[:, :-1][keep]), targets[keep])
        loss.backward()
        self.optimizer.step()
        return loss.item()


def batches(args, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random token batches with labels on the last ~45% of each row (the answer)."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (args.batch, args.seq), generator=generator)
        labels = ids.clone()
        labels[:, : int(args.seq * 0.55)] = -100
        out.append((ids, labels))
    return out


def layer_breaks(variant: Variant, ids: torch.Tensor) -> tuple[int, list[str]]:
    """Graph breaks of the first decoder layer, called with the arguments the model gives it."""
    layer = variant.layers[0]
    seen = {}
    handle = layer.register_forward_pre_hook(lambda m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True)
    with torch.no_grad():
        if variant.srde is not None:
            with variant.srde.forward_context():
                variant.model.model(input_ids=ids)
        else:
            variant.model.model(input_ids=ids)
    handle.remove()
    if variant.srde is not None:
        with variant.srde.forward_context():
            return graph_breaks(layer, *seen["args"], **seen["kwargs"])
    return graph_breaks(layer, *seen["args"], **seen["kwargs"])


def timed(variant: Variant, batch) -> float:
    start = time.perf_counter()
    variant.step(*batch)
    return (time.perf_counter() - start) * 1e3


def run_kind(recipe, kind: str, settings: CompileParams, args) -> None:
    eager, compiled = Variant(recipe, kind, args), Variant(recipe, kind, args)
    data = batches(args, args.warmup + args.repeats)
    count, reasons = layer_breaks(compiled, data[0][0])
    torch._dynamo.reset()
    RegionalCompiler(settings, log=lambda line: None).compile(compiled.layers)
    start = time.perf_counter()
    for batch in data[: args.warmup]:
        eager.step(*batch)
        compiled.step(*batch)
    warmup_s = time.perf_counter() - start
    graphs = counters["stats"]["unique_graphs"]
    times = {"eager": [], "compiled": []}
    for r, batch in enumerate(data[args.warmup:]):
        order = [("eager", eager), ("compiled", compiled)]
        for name, variant in order if r % 2 == 0 else order[::-1]:
            times[name].append(timed(variant, batch))
    recompiled = counters["stats"]["unique_graphs"] - graphs  # a timed step that compiled would not be comparable
    eager_ms, compiled_ms = statistics.median(times["eager"]), statistics.median(times["compiled"])
    print(f"{kind:>5} {eager_ms:>10.1f} {compiled_ms:>12.1f} {eager_ms / compiled_ms:>8.2f}x {count:>7}   "
          f"(warm-up incl. compile {warmup_s:.0f} s; graphs compiled while timing: {recompiled})")
    for reason, n in Counter(reasons).items():
        print(f"{'':>6}{n} x {reason}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="base,srde", help="phase kinds to measure: base, srde (comma-separated)")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--mode", default="default", choices=["default", "reduce-overhead", "max-autotune"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64, help="tokens per row (tiny.toml's seq_len)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (they compile)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = CompileParams(enabled=True, backend=args.backend, mode=args.mode)
    problem = backend_problem(settings, "cpu")
    if problem is not None:
        parser.error(problem[1])
    recipe = load_recipe(TINY, load_plugins())
    print(f"tiny ({TINY.name}): batch {args.batch}x{args.seq}, threads {torch.get_num_threads()} "
          f"(cores {os.cpu_count()}), torch {torch.__version__}, median of {args.repeats} after {args.warmup} warm-up")
    print(f"compiled: each decoder layer, backend {args.backend}, mode {args.mode}")
    print(f"{'kind':>5} {'eager ms':>10} {'compiled ms':>12} {'ratio':>9} {'breaks':>7}   (ratio = eager / compiled; breaks: one decoder layer)")
    for kind in args.kinds.split(","):
        run_kind(recipe, kind.strip(), settings, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
