"""Greedy decoding: batched with left padding (for accuracy) and from a run directory (``srde generate``)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import torch


def _greedy_config(model, max_new_tokens: int, pad_id: int, eos_id: int):
    from transformers import GenerationConfig

    # A fresh config rather than the model's: a checkpoint's sampling defaults (temperature, top_p)
    # must not leak into greedy evaluation.
    return GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
        pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=getattr(model.config, "bos_token_id", None),
        use_cache=True,
    )


def greedy_generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    eos_id: int,
    batch_size: int,
    device=None,
) -> list[list[int]]:
    """The greedy continuation of each prompt (token ids), at most ``max_new_tokens`` long and cut
    before the first ``eos_id``; in the order of ``prompts``.

    Prompts are batched by length and left-padded with an attention mask, so padding does not
    change what a prompt generates. The model runs as it is: wrap the call in
    :func:`srde_core.evaluate.evaluation_state` for eval mode and the experts' state.
    """
    device = device if device is not None else next(model.parameters()).device
    config = _greedy_config(model, max_new_tokens, pad_id, eos_id)
    # Similar lengths together: less padding to compute.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids = torch.as_tensor(list(prompts[i]), dtype=torch.long)
            if ids.numel():
                input_ids[row, width - ids.numel():] = ids
                attention_mask[row, width - ids.numel():] = 1
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config,
        )
        for row, i in enumerate(chunk):
            new = out[row, width:].tolist()
            results[i] = new[: new.index(eos_id)] if eos_id in new else new
    return results


def generate_from_run(run_dir: str | Path, prompt: str, max_new_tokens: int = 32, experts: bool = True) -> str:
    """The greedy continuation of ``prompt`` (BOS + prompt, as in training) by a finished run's
    model, with its experts on (``experts=True``) or the base alone. Raises ``SRDEError`` for a
    directory that is not a finished run."""
    from rich.console import Console

    from srde_core.errors import UsageError
    from srde_core.evaluate import evaluation_state
    from srde_core.run import open_finished_run

    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    # Loading messages would mix with the generated text on stdout.
    run = open_finished_run(run_dir, Console(file=io.StringIO()), experts=experts)
    tokenizer = run.tokenizer
    prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
    if not prompt_ids:
        raise UsageError("the prompt is empty (and the tokenizer has no BOS to start from)")
    context = getattr(run.model.config, "max_position_embeddings", None)
    if context is not None and len(prompt_ids) + max_new_tokens > context:
        raise UsageError(f"--max-new-tokens {max_new_tokens} and the prompt's {len(prompt_ids)} tokens exceed the "
                         f"model's context of {context} tokens; at most {max(context - len(prompt_ids), 0)} new tokens")
    with evaluation_state(run.model, run.experts, enabled=experts):
        (ids,) = greedy_generate(
            run.model, [prompt_ids], max_new_tokens=max_new_tokens,
            pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id, batch_size=1, device=run.device,
        )
    return tokenizer.decode(ids)
