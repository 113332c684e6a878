"""The ``hf`` format: one split of an HF dataset per role (``data.hf_name``, ``hf_train_split``,
``hf_eval_split``): a directory written by ``save_to_disk``, a local dataset directory, or a hub name
(which needs the network or a filled HF cache)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from srde_core.data.params import ColumnsParams, DataParams
from srde_core.data.sources import ColumnMap, DataFormat, Source, check_types, first_line, map_columns
from srde_core.errors import DataError


class HFFormat(DataFormat):
    name = "hf"

    def __init__(self, params=None):
        pass

    def sources(self, data: DataParams, base_dir: Path, hf_cache: Path) -> tuple[list[Source], list[Source]]:
        train = [hf_source(data.hf_name, data.hf_train_split, base_dir, hf_cache, "data.hf_train_split")]
        evals = ([hf_source(data.hf_name, data.hf_eval_split, base_dir, hf_cache, "data.hf_eval_split")]
                 if data.hf_eval_split else [])
        return train, evals


def hf_source(name: str, split: str, base_dir: Path, hf_cache: Path, key: str) -> Source:
    """One split of the HF dataset ``name``; ``key`` is the recipe key named by errors."""
    local = Path(name).expanduser()
    if not local.is_absolute():
        local = base_dir / local
    shown = f"{name}[{split}]"
    offline = None
    try:
        if (local / "dataset_dict.json").is_file():
            from datasets import load_from_disk

            splits = load_from_disk(str(local))
            if split not in splits:
                raise DataError(f"split '{split}' not found (splits: {', '.join(splits)})", source=name, key=key)
            dataset = splits[split]
        elif (local / "state.json").is_file():
            from datasets import load_from_disk

            dataset = load_from_disk(str(local))
        else:
            from datasets import load_dataset

            from srde_plugins.data.hub import datasets_offline, offline_reason

            # a hub name: from the local cache alone where the hub cannot be used (no retries)
            offline = None if local.is_dir() else offline_reason()
            target = str(local) if local.is_dir() else name
            with datasets_offline() if offline else contextlib.nullcontext():
                dataset = load_dataset(target, split=split, cache_dir=str(hf_cache))
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - hub, builder and split errors all end here
        why = f"not in the local HF cache, and the hub cannot be used: {offline}" if offline else first_line(err)
        raise DataError(f"cannot load split '{split}' ({why})", source=name, key=key) from err

    def validate(columns: ColumnsParams) -> ColumnMap:
        if len(dataset) == 0:
            raise DataError("no rows", source=shown)
        return check_types(map_columns(columns, list(dataset.column_names), shown), dataset.data.schema, shown)

    return Source(name=shown, identity=f"hf:{name}:{split}:{dataset._fingerprint}", load=lambda cmap: dataset,
                  validate=validate)
