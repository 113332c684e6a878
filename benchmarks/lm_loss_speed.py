"""LM loss over full logits vs logits at labelled positions only, on the tiny default's shape.

One training step (forward + backward + AdamW) of the tiny Ministral 3 (hidden 256, 4 layers,
32k vocabulary) at batch 32 x 48, measured side by side in one run:

- full:      logits for every position, cross-entropy with ignore_index (the usual HF path);
- labelled:  the LM head applied only where a next-token label exists (what `lm` does), with
             ~35% padding as in the generated corpus;
- chunked:   the `lm` loss's chunked path (``chunked_nll_sum``) at its default ``chunk_tokens``
             (4096: one chunk here, so the same work as ``labelled``);
- chunks/N:  the same forced into checkpointed chunks of N rows (``--chunk-tokens``): what bounds
             the fp32 logits on large batches costs one more head forward per chunk;
- answers:   the same as labelled with labels on the answer tokens only (`loss_on = "answer"`).

Run: python benchmarks/lm_loss_speed.py (benchmarks/layer_speed.py is the SRDE layer benchmark).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import Ministral3Config, Ministral3ForCausalLM

from srde_plugins.losses import LMParams
from srde_plugins.losses.lm import chunked_nll_sum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=48)
    parser.add_argument("--chunk-tokens", type=int, default=256, help="rows per chunk of the forced chunks/N mode")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = Ministral3Config(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, vocab_size=32768, tie_word_embeddings=True,
    )
    model = Ministral3ForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    labels = ids.clone()
    labels[:, int(args.seq * 0.65):] = -100  # padding
    answer_labels = labels.clone()
    answer_labels[:, : int(args.seq * 0.55)] = -100  # prompt

    def step(mode: str) -> None:
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        if mode == "full":
            logits = model.lm_head(hidden)[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        else:
            targets = (answer_labels if mode == "answers" else labels)[:, 1:]
            keep = targets != -100
            rows, targets = hidden[:, :-1][keep], targets[keep]
            if mode in ("labelled", "answers"):
                loss = F.cross_entropy(model.lm_head(rows), targets)
            else:
                chunk = default_chunk if mode == "chunked" else args.chunk_tokens
                loss = chunked_nll_sum(model.lm_head, rows, targets, chunk) / targets.numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    default_chunk = LMParams().chunk_tokens
    modes = ("full", "labelled", "chunked", f"chunks/{args.chunk_tokens}", "answers")
    for mode in modes:  # warm-up
        step(mode)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode in modes:  # interleaved, so drift hits every variant alike
            start = time.perf_counter()
            step(mode)
            times[mode].append(time.perf_counter() - start)
    full = statistics.median(times["full"])
    print(f"tiny Ministral 3, batch {args.batch}x{args.seq}, threads {torch.get_num_threads()}, median of {args.repeats}")
    for mode in modes:
        median = statistics.median(times[mode])
        print(f"  {mode:11s} {median * 1e3:8.1f} ms/step   {full / median:5.2f}x faster than full logits")


if __name__ == "__main__":
    main()
