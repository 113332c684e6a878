"""The run's tokenizer and data, as the recipe describes them."""

from __future__ import annotations


def load_run_data(run):
    """(tokenizer, DataBundle) for ``run.recipe``; relative data paths are relative to the recipe file."""
    from srde_core.data.dataset import load_data
    from srde_core.data.tokenizer import load_tokenizer

    recipe = run.recipe
    tokenizer = load_tokenizer(recipe.tokenizer, base_dir=recipe.base_dir, source=str(recipe.path))
    bundle = load_data(recipe.data, tokenizer, recipe.cache_dir, base_dir=recipe.base_dir)
    state = "cached" if bundle.cache_hit else "tokenised"
    eval_rows = len(bundle.eval) if bundle.eval is not None else 0
    run.log(
        f"data: {len(bundle.train)} train / {eval_rows} eval examples, domains {', '.join(bundle.domains)} "
        f"({state}); tokenizer {tokenizer.fingerprint[:28]} ({tokenizer.vocab_size} tokens)"
    )
    return tokenizer, bundle
