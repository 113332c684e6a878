"""Batching tokenised rows into the tensors the model and the losses take."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

IGNORE_INDEX = -100


def collate(
    batch_rows: Sequence[Mapping] | Mapping[str, Sequence],
    pad_id: int,
    loss_on: Literal["all", "answer"] = "all",
    domains: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad rows of a tokenised dataset to the longest one.

    ``batch_rows`` is a list of rows (``dataset[i]``), a ``Dataset`` (``dataset.select(indices)``)
    or a column dict (``dataset[i:j]``), each row with ``input_ids``, ``prompt_len`` and
    ``domain_id``. With ``domains`` (the bundle's list), ids are looked up from each row's
    ``domain`` name instead, which stays right for rows from a dataset a plugin rebuilt. Returns ``input_ids`` and ``attention_mask``
    (B, T), ``labels`` (B, T) — the input ids, not shifted (the causal LM shifts), with -100 on
    padding and, when ``loss_on == "answer"``, on the BOS + prompt tokens — and ``domain_ids`` (B,),
    and ``difficulty`` (B,) when the rows carry the data's difficulty level.
    Use ``functools.partial(collate, pad_id=..., loss_on=...)`` as a DataLoader ``collate_fn``.
    """
    if loss_on not in ("all", "answer"):
        raise ValueError(f"loss_on must be 'all' or 'answer', not {loss_on!r}")
    if isinstance(batch_rows, Mapping):
        keys = list(batch_rows)
        batch_rows = [dict(zip(keys, values)) for values in zip(*(batch_rows[k] for k in keys))]
    batch_rows = list(batch_rows)
    if not batch_rows:
        raise ValueError("cannot collate an empty batch")
    width = max(len(row["input_ids"]) for row in batch_rows)
    input_ids = torch.full((len(batch_rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch_rows), width), dtype=torch.long)
    labels = torch.full((len(batch_rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(batch_rows):
        ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
        n = ids.numel()
        input_ids[i, :n] = ids
        attention_mask[i, :n] = 1
        labels[i, :n] = ids
        if loss_on == "answer":
            labels[i, : min(int(row["prompt_len"]), n)] = IGNORE_INDEX
    if domains is not None:
        index = {name: i for i, name in enumerate(domains)}
        ids_of_rows = [index[row["domain"]] for row in batch_rows]
    else:
        ids_of_rows = [int(row["domain_id"]) for row in batch_rows]
    domain_ids = torch.tensor(ids_of_rows, dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "domain_ids": domain_ids}
    if all("difficulty" in row for row in batch_rows):
        batch["difficulty"] = torch.tensor([int(row["difficulty"]) for row in batch_rows], dtype=torch.long)
    return batch
