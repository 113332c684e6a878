"""Data-ready time without and with the cache: cold (read + tokenise + shard) vs warm.

The training data is the generated six-domain corpus written as a JSON Lines file (a user's data
file, outside the cache). Each round measures, side by side:

- cold: an empty cache directory: the file is validated, read through ``datasets``, tokenised
  (``Dataset.map``) and saved under ``cache/tokenized/<key>``, and the training rows are grouped
  into per-domain shards (``srde_core.data.groups``), which are saved beside it;
- warm: the same call again with the cache present and the in-memory groupings forgotten (what a
  new process sees): the file is hashed for the key, the tokenised data memory-mapped back, the
  shards read from disk.

The tokenizer load is the same work in both and is shown apart. Rounds alternate cold and warm;
medians are compared. Target: warm <= 2% of cold. Run ``python benchmarks/data_cache.py --help``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from srde_core.data import groups
from srde_core.data.corpus import write_corpus
from srde_core.data.dataset import load_data
from srde_core.data.params import DataParams, TokenizerParams
from srde_core.data.tokenizer import load_tokenizer

TARGET = 0.02


def data_ready(params: DataParams, tokenizer, cache: Path) -> tuple[float, bool, int]:
    """(seconds until the tokenised data and its per-domain shards are ready, cache hit, rows)."""
    groups.clear_memory()
    start = time.perf_counter()
    bundle = load_data(params, tokenizer, cache)
    shards = groups.group_rows(bundle.train, "domain")
    elapsed = time.perf_counter() - start
    assert len(shards.order) == len(bundle.train)
    return elapsed, bundle.cache_hit, len(bundle.train)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples-per-domain", type=int, default=3000, help="training examples per domain (tiny: 3000)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="cold/warm rounds (median reported)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when the target is missed")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="srde-data-cache-"))
    try:
        train, _ = write_corpus(work / "corpus", args.examples_per_domain, 1, seed=0)
        params = DataParams(train_files=[str(train)], seq_len=args.seq_len, loss_on="answer")
        load_tokenizer(TokenizerParams())  # imports out of the way
        tokenizer_s = []
        times: dict[str, list[float]] = {"cold": [], "warm": []}
        rows = 0
        for r in range(args.repeats):
            start = time.perf_counter()
            tokenizer = load_tokenizer(TokenizerParams())
            tokenizer_s.append(time.perf_counter() - start)
            cache = work / f"cache-{r}"
            cold, hit, rows = data_ready(params, tokenizer, cache)
            assert not hit
            warm, hit, _ = data_ready(params, tokenizer, cache)
            assert hit
            times["cold"].append(cold)
            times["warm"].append(warm)
            shutil.rmtree(cache)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    tok = statistics.median(tokenizer_s)
    cold, warm = statistics.median(times["cold"]), statistics.median(times["warm"])
    print(f"data cache: {rows} training rows (6 domains x {args.examples_per_domain}), seq_len {args.seq_len}, "
          f"threads {torch.get_num_threads()}, median of {args.repeats}")
    print(f"  tokenizer load      {tok * 1e3:9.1f} ms   (same in both; not in the ratio)")
    print(f"  cold (no cache)     {cold * 1e3:9.1f} ms   read + tokenise + save + shard by domain")
    print(f"  warm (cache there)  {warm * 1e3:9.1f} ms   hash file + memory-map + read shards")
    ratio, with_tokenizer = warm / cold, (warm + tok) / (cold + tok)
    met = ratio <= TARGET
    print(f"  warm/cold {ratio:.2%} (target <= {TARGET:.0%}): {'met' if met else 'MISSED'}; "
          f"with the tokenizer load in both: {with_tokenizer:.2%}")
    return 0 if met or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
