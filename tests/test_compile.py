"""The torch.compile plugin (`srde_plugins.compile`): compiled decoder layers give the eager loss and
gradients (base model and SRDE model), a sparse SRDE layer breaks its graph only where its eager banks
run, the settings are checked in one line naming the key.

The equality tests compile with ``aot_eager`` (dynamo capture and AOT autograd, the parts the plugin
and the SRDE layer must get right, without C++ code generation); one test runs ``inductor`` on the
smallest layer. Compiles are slow on a small CPU: keep these few and micro.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from srde_testkit import EveryLayerLayout, input_ids, perturb, tiny_model, topk_router_type

from srde_core.errors import RecipeError
from srde_core.model.architectures import find_decoder_stack
from srde_core.model.attach import attach_srde
from srde_core.model.layer import SRDEMLP
from srde_core.plugins import load_plugins
from srde_core.recipe import load_recipe, resolve_component
from srde_plugins.compile import CompileParams
from srde_plugins.compile.regional import RegionalCompiler, graph_breaks

PLUGINS = load_plugins()
SPARSE = {"name": "sparse", "density": 0.1}
LORA = {"name": "lora", "rank": 2}
#: graph breaks of one SRDE decoder layer (attention + SRDE MLP): one per projection whose bank runs
#: eagerly (the sparse CSR kernels loop over experts on the host), plus two where the first of them
#: also splits the decoder layer's own frame around its MLP call (dynamo without nested graph
#: breaks); none for a bank that traces
SPARSE_LAYER_BREAKS = 5
LORA_LAYER_BREAKS = 0


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def micro(layers: int = 1, delta: dict | None = None, seed: int = 0):
    """A 1-layer micro Ministral 3 in training mode, with perturbed experts of ``delta`` when given."""
    model = tiny_model("Ministral3ForCausalLM", seed=seed, num_hidden_layers=layers).train()
    model.config.use_cache = False
    if delta is None:
        return model, None, find_decoder_stack(model).layers
    built = resolve_component(PLUGINS, "delta", delta).build()
    srde = attach_srde(model, layout=EveryLayerLayout(4, 2), delta_type=built, router_type=topk_router_type(), seed=seed)
    perturb(srde, scale=0.05)
    return model, srde, srde.stack.layers


def loss_and_grads(model, srde, ids):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    if srde is None:
        logits = model(input_ids=ids).logits
    else:
        with srde.forward_context() as ctx:
            logits = model(input_ids=ids).logits
        assert len(ctx.routings) == len(srde.layers)  # every compiled layer recorded its routing
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in params.items()}


def assert_compiled_matches_eager(model, srde, layers, backend: str, steps: int = 2):
    compiler = RegionalCompiler(CompileParams(enabled=True, backend=backend), log=lambda line: None)
    for step in range(steps):  # a new routing each step: no recompile, same numbers
        ids = input_ids(2, 9, seed=step)
        compiler.restore()
        eager_loss, eager_grads = loss_and_grads(model, srde, ids)
        assert compiler.compile(layers) == len(layers)
        loss, grads = loss_and_grads(model, srde, ids)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == eager_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    compiler.restore()
    assert not any("forward" in layer.__dict__ for layer in layers)


@pytest.mark.parametrize("delta", [None, SPARSE, LORA], ids=["base", "sparse", "lora"])
def test_compiled_layers_give_the_eager_loss_and_gradients(delta):
    assert_compiled_matches_eager(*micro(delta=delta), "aot_eager")


def test_inductor_compiled_srde_mlp_matches_eager():
    """Code generation too (C++ on CPU), on the smallest region: one SRDE MLP with traceable banks."""
    _, srde, layers = micro(delta=LORA)
    mlp = layers[0].mlp
    compiler = RegionalCompiler(CompileParams(enabled=True), log=lambda line: None)
    hidden = torch.randn(2, 9, mlp.base.gate_proj.in_features, requires_grad=True)
    outputs = []
    for compiled in (False, True):
        if compiled:
            compiler.compile([mlp])
        hidden.grad = None
        for p in srde.trainable_parameters().values():
            p.grad = None
        with srde.forward_context():
            out = mlp(hidden)
        (out**2).sum().backward()
        grads = [hidden.grad.clone()] + [p.grad.clone() for p in srde.trainable_parameters().values()]
        outputs.append((out.detach(), grads))
    compiler.restore()
    (eager, eager_grads), (out, grads) = outputs
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for grad, eager_grad in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-6)


def decoder_layer_call(model, layer, ids):
    """The arguments ``model`` calls its decoder layer ``layer`` with."""
    seen = {}

    def keep(module, args, kwargs):
        seen.update(args=args, kwargs=kwargs)

    handle = layer.register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return seen["args"], seen["kwargs"]


@pytest.mark.parametrize(("delta", "most"), [(SPARSE, SPARSE_LAYER_BREAKS), (LORA, LORA_LAYER_BREAKS)], ids=["sparse", "lora"])
def test_graph_breaks_of_one_srde_decoder_layer(delta, most):
    model, srde, layers = micro(delta=delta)
    layer = layers[0]
    args, kwargs = decoder_layer_call(model, layer, input_ids(2, 9))
    assert isinstance(layer.mlp, SRDEMLP)
    with srde.forward_context():
        count, reasons = graph_breaks(layer, *args, **kwargs)
    assert count <= most, reasons
    assert all("torch.compiler.disable" in reason for reason in reasons), reasons  # only the eager banks
    hidden = torch.randn(2, 9, layer.mlp.base.gate_proj.in_features)
    with srde.forward_context():
        assert graph_breaks(layer.mlp, hidden)[0] == (3 if most else 0)  # the SRDE MLP alone: one per eager bank


def test_a_bad_mode_is_one_line_naming_the_key(micro_recipe):
    with pytest.raises(RecipeError) as err:
        load_recipe(micro_recipe, PLUGINS, ["plugins.compile.enabled=true", "plugins.compile.mode='fast'"])
    line = str(err.value)
    assert "plugins.compile.mode" in line and "'default', 'reduce-overhead' or 'max-autotune'" in line
    assert "\n" not in line


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        (["plugins.compile.backend='inductr'"], "plugins.compile.backend", "did you mean 'inductor'"),
        (["plugins.compile.backend='aot_eager'", "plugins.compile.mode='max-autotune'"], "plugins.compile.mode", "needs backend 'inductor'"),
        (["plugins.compile.phases=['expert']"], "plugins.compile.phases", "no phase named 'expert'"),
    ],
    ids=["unknown-backend", "mode-without-inductor", "unknown-phase"],
)
def test_settings_that_cannot_run_stop_before_any_work(micro_recipe, overrides, key, fragment):
    with pytest.raises(RecipeError) as err:  # when the recipe loads (a phase list), or at the header
        recipe = load_recipe(micro_recipe, PLUGINS, ["plugins.compile.enabled=true", *overrides])
        PLUGINS.hook.srde_run_header(recipe=recipe)
    assert key in str(err.value) and fragment in str(err.value) and "\n" not in str(err.value)


def test_the_header_says_what_is_compiled(micro_recipe):
    recipe = load_recipe(micro_recipe, PLUGINS, ["plugins.compile.enabled=true", "plugins.compile.phases=['experts']"])
    lines = [line for group in PLUGINS.hook.srde_run_header(recipe=recipe) for line in (group or [])]
    assert "compile: each decoder layer, torch.compile(backend=inductor, mode=default, dynamic=auto, fullgraph=false), in phases experts" in lines


def test_the_hooks_compile_the_chosen_phases_and_again_when_experts_attach(micro_recipe, tmp_path):
    import srde_plugins.compile as plugin

    from srde_core.run import RunContext

    recipe = load_recipe(micro_recipe, PLUGINS, ["plugins.compile.enabled=true", "plugins.compile.backend='aot_eager'",
                                                 "plugins.compile.phases=['experts']"])
    lines = []
    console = type("Console", (), {"print": lambda self, line, **kw: lines.append(line)})()
    run = RunContext(recipe, PLUGINS, tmp_path, torch.device("cpu"), console)
    run.model, _, layers = micro(layers=2)
    base, experts = recipe.phases
    plugin.srde_before_phase(phase=base, run=run)
    assert not any("forward" in layer.__dict__ for layer in layers)  # not a chosen phase
    plugin.srde_before_phase(phase=experts, run=run)
    assert all("forward" in layer.__dict__ for layer in layers)
    built = resolve_component(PLUGINS, "delta", SPARSE).build()
    run.experts = attach_srde(run.model, layout=EveryLayerLayout(4, 2), delta_type=built,
                              router_type=topk_router_type(), seed=0)
    plugin.srde_configure_model(model=run.model, run=run)
    assert all("forward" in layer.__dict__ for layer in layers)
    plugin.srde_before_phase(phase=base, run=run)
    assert not any("forward" in layer.__dict__ for layer in layers)  # restored to eager
    assert lines == [
        "compile: phase 'experts': 2 decoder layers compiled",
        "compile: 2 decoder layers compiled again with the experts attached; SparseDeltaBank run eagerly "
        "inside them (a graph break per projection)",
        "compile: phase 'base' runs eagerly (not in plugins.compile.phases)",
    ]
    assert torch._dynamo.config.recompile_limit >= 16  # 8 per layer: the layers share one code object


def test_fullgraph_with_banks_that_do_not_trace_is_one_line():
    _, srde, layers = micro(delta=SPARSE)
    banks = [bank for per_projection in srde.banks().values() for bank in per_projection.values()]
    compiler = RegionalCompiler(CompileParams(enabled=True, fullgraph=True), chosen=True)
    with pytest.raises(RecipeError, match=r"plugins.compile.fullgraph: SparseDeltaBank do not trace .* use fullgraph = false"):
        compiler.experts_attached(layers, banks)


def test_a_run_with_phase1_warm_start_and_eval_recompiles_at_most_once_per_layer(tmp_path, caplog):
    """Training steps compile each layer once (again once for dynamic shapes); the forwards between
    them (the router warm start, the eval) run eagerly instead of compiling every layer again per
    grad mode and shape, which filled dynamo's budget (18 recompiles in 2 steps of 2 layers)."""
    import logging
    import textwrap

    from conftest import RECIPES, run_recipe_in

    recipe = tmp_path / "phase1.toml"
    recipe.write_text(textwrap.dedent(f"""
        extends = "{RECIPES / 'micro.toml'}"
        name = "compiled"
        [model]
        gradient_checkpointing = true
        [[phases]]
        name = "pretrain"
        trainer = {{ name = "expert_pretrain", warm_start_examples = 4 }}
        sampler = "domain_balanced"
        steps = 2
        batch_size = 6
        [[phases]]
        name = "experts"
        trainer = "joint"
        steps = 2
        batch_size = 6
        [plugins.compile]
        enabled = true
        backend = "aot_eager"
    """))
    torch._logging.set_logs(recompiles=True)
    try:
        with caplog.at_level(logging.DEBUG, logger="torch._dynamo"):
            run = run_recipe_in(tmp_path, recipe, PLUGINS)
            from srde_core.evaluate.report import evaluate

            evaluate(run, losses_only=True)
    finally:
        torch._logging.set_logs()
    recompiles = [r.getMessage() for r in caplog.records if "Recompiling function" in r.getMessage()]
    assert len(recompiles) <= 2, "\n".join(recompiles)  # 2 layers
