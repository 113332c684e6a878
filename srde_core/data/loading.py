"""The run's tokenizer and data, as the recipe describes them, and the checks a run makes on them
before any model loads."""

from __future__ import annotations

from srde_core.errors import DataError, RecipeError

#: The share of training examples losing answer tokens to truncation that earns a warning.
TRUNCATION_WARNING_SHARE = 0.2


def load_run_data(run):
    """(tokenizer, DataBundle) for ``run.recipe``; relative data paths are relative to the recipe file.

    Refuses data in which no training example has a labelled token (every step's loss would be
    NaN), and warns in one line when truncation to ``seq_len`` cuts the answer of a large share of
    the training examples.
    """
    from srde_core.data.dataset import load_data
    from srde_core.data.tokenizer import load_tokenizer

    recipe = run.recipe
    tokenizer = recipe_tokenizer(recipe, run.plugins)
    bundle = load_data(data_with_paths(recipe), tokenizer, recipe.cache_dir, base_dir=recipe.base_for("data.hf_name"),
                       plugins=run.plugins)
    state = "cached" if bundle.cache_hit else "tokenised"
    if bundle.cache_damaged:
        state = f"tokenised again: the cache {bundle.cache_path} was damaged, {bundle.cache_damaged}"
    eval_rows = len(bundle.eval) if bundle.eval is not None else 0
    run.log(
        f"data: {len(bundle.train)} train / {eval_rows} eval examples, domains {', '.join(bundle.domains)} "
        f"({state}); tokenizer {tokenizer.fingerprint[:28]} ({tokenizer.vocab_size} tokens)"
    )
    check_labels(run, bundle, tokenizer)
    return tokenizer, bundle


def recipe_tokenizer(recipe, plugins=None):
    """The tokenizer of ``recipe``: its ``[tokenizer]`` table, paths from where the recipe set them;
    ``from_model`` reads the model's own tokenizer file (its local directory, or the hub id's)."""
    from srde_core.data.tokenizer import load_tokenizer

    model = None
    if recipe.tokenizer.from_model:
        from srde_core.model.build import model_location

        model = model_location(recipe)
    return load_tokenizer(recipe.tokenizer, base_dir=recipe.base_for("tokenizer.file"), source=str(recipe.path),
                          model=model, plugins=plugins)


def data_with_paths(recipe):
    """``recipe.data`` with relative ``train_files`` / ``eval_files`` resolved where the recipe set them."""
    from srde_core.data.sources import resolve_paths

    data = recipe.data
    return data.model_copy(update={
        key: [str(p) for p in resolve_paths(getattr(data, key), recipe.base_for(f"data.{key}"))]
        for key in ("train_files", "eval_files")})


def check_labels(run, bundle, tokenizer) -> None:
    from srde_core.data.dataset import label_stats

    data = run.recipe.data
    stats = label_stats(bundle.train, data.loss_on, tokenizer.eos_id)
    if stats.examples and stats.labelled == 0:
        if data.loss_on == "answer" and stats.answer_lost == stats.examples:
            why = f"truncation to seq_len {data.seq_len} cuts every answer away (loss_on = \"answer\"); raise data.seq_len"
        else:
            why = f"with loss_on = \"{data.loss_on}\" and seq_len {data.seq_len} nothing is left to learn"
        raise DataError(f"no training example has a labelled token: {why}", source=str(run.recipe.path),
                        key="data.seq_len")
    pairs = data.generate is not None or data.columns.text is None  # text mode: documents are cut, as usual
    if pairs and stats.examples and stats.answer_cut / stats.examples >= TRUNCATION_WARNING_SHARE:
        run.log(
            f"warning: {stats.answer_cut} of {stats.examples} training examples "
            f"({stats.answer_cut / stats.examples:.0%}) lose answer tokens to truncation at data.seq_len = "
            f"{data.seq_len} ({stats.answer_lost} their whole answer); raise data.seq_len"
        )


def check_batch_sizes(run) -> None:
    """Every phase's global batch (``batch_size`` per process x processes) fits in the training
    set: a larger one would repeat examples within a step. Checked once the data is loaded (and
    prepared by plugins), before the model loads."""
    examples = len(run.data.train)
    world = run.dist.world_size
    for phase in run.recipe.phases:
        size = phase.batch_size * world
        if size > examples:
            per = f" ({phase.batch_size} per process x {world} processes)" if world > 1 else ""
            raise RecipeError(
                f"batch size {size}{per} is larger than the training set ({examples} examples)",
                source=str(run.recipe.path), key=f"phases[{phase.index}].batch_size",
            )
