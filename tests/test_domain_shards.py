"""Per-domain shards of the tokenised data (`srde_core.data.groups`) and the `domain_balanced`
sampler that draws Phase 1's batches from them."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest

from srde_core.data import groups as groups_module
from srde_core.data.dataset import load_data
from srde_core.data.groups import group_rows
from srde_core.data.params import DataParams, GenerateParams, TokenizerParams
from srde_core.data.tokenizer import Tokenizer, load_tokenizer
from srde_core.errors import DataError
from srde_plugins.data.balanced import DomainBalancedSampler
from srde_plugins.data import DomainBalancedParams


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TokenizerParams())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer):
    params = DataParams(seq_len=48, generate=GenerateParams(examples_per_domain=20, eval_per_domain=2))
    return load_data(params, tokenizer, tmp_path_factory.mktemp("cache"))


def write_rows(path, domains):
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": f"a{i}", "domain": d}) + "\n"
                            for i, d in enumerate(domains)))


def count_calls(monkeypatch, owner, name):
    calls = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_the_shards_partition_the_rows_exactly_by_domain(corpus):
    groups_module.clear_memory()
    train = corpus.train
    groups = group_rows(train, "domain")
    domains = train["domain"]
    assert list(groups.values) == sorted(set(domains)) == corpus.domains
    seen = []
    for value in groups.values:
        rows = groups.rows(value).tolist()
        assert rows == sorted(rows) and all(domains[i] == value for i in rows)
        seen += rows
    assert sorted(seen) == list(range(len(train)))  # every row exactly once
    assert groups.sizes() == dict(Counter(domains))
    subset = train.select([7, 3, 50, 1])  # a selection's groups index the selection's rows
    picked = group_rows(subset, "domain")
    assert sorted(i for v in picked.values for i in picked.rows(v).tolist()) == [0, 1, 2, 3]
    assert all(subset[int(i)]["domain"] == v for v in picked.values for i in picked.rows(v))


def test_a_warm_run_neither_tokenises_nor_groups_again(tmp_path, tokenizer, monkeypatch):
    data = tmp_path / "train.jsonl"
    write_rows(data, ["b", "a", "b", "c", "a", "b"])
    params = DataParams(train_files=[str(data)], seq_len=32)
    encoded = count_calls(monkeypatch, Tokenizer, "encode")
    grouped = count_calls(monkeypatch, groups_module, "compute_groups")
    groups_module.clear_memory()
    cold = load_data(params, tokenizer, tmp_path / "cache")
    first = group_rows(cold.train, "domain")
    assert encoded and grouped == [1] and first.source == "computed"
    assert groups_module.cache_path(cold.train, "domain").is_file()
    assert groups_module.cache_path(cold.train, "domain").is_relative_to(cold.cache_path)

    encoded.clear(), grouped.clear()
    groups_module.clear_memory()  # as a new process: only the disk cache is left
    warm = load_data(params, tokenizer, tmp_path / "cache")
    again = group_rows(warm.train, "domain")
    assert warm.cache_hit and not encoded and not grouped and again.source == "disk"
    assert again.values == first.values and again.order.tolist() == first.order.tolist()
    assert group_rows(warm.train, "domain").source == "memory"


def test_a_changed_data_file_changes_the_key_and_the_shards(tmp_path, tokenizer):
    data = tmp_path / "train.jsonl"
    write_rows(data, ["a", "b", "a", "b"])
    params = DataParams(train_files=[str(data)], seq_len=32)
    before = load_data(params, tokenizer, tmp_path / "cache")
    assert group_rows(before.train, "domain").sizes() == {"a": 2, "b": 2}
    write_rows(data, ["a", "b", "b", "b"])
    after = load_data(params, tokenizer, tmp_path / "cache")
    assert not after.cache_hit and after.fingerprint != before.fingerprint
    assert groups_module.cache_path(after.train, "domain") != groups_module.cache_path(before.train, "domain")
    assert group_rows(after.train, "domain").sizes() == {"a": 1, "b": 3}


def test_a_damaged_cache_file_is_recomputed(tmp_path, tokenizer):
    data = tmp_path / "train.jsonl"
    write_rows(data, ["a", "b", "a"])
    bundle = load_data(DataParams(train_files=[str(data)], seq_len=32), tokenizer, tmp_path / "cache")
    groups_module.clear_memory()
    group_rows(bundle.train, "domain")
    groups_module.cache_path(bundle.train, "domain").write_bytes(b"cut short")
    groups_module.clear_memory()
    regrouped = group_rows(bundle.train, "domain")
    assert regrouped.source == "computed" and regrouped.sizes() == {"a": 2, "b": 1}


def sampler(column="domain"):
    return DomainBalancedSampler(DomainBalancedParams(column=column))


PHASE = SimpleNamespace(name="pretrain", index=1)


def test_every_batch_takes_equal_examples_from_each_domain(corpus):
    train, domains = corpus.train, corpus.train["domain"]
    draw = sampler()
    per_domain = Counter()
    for step in range(len(corpus.domains)):  # 20 = 3 x 6 + 2: the 2 left over go round the domains
        batch = draw.indices(train, PHASE, step, 20, seed=0)
        counts = Counter(domains[i] for i in batch)
        assert len(batch) == 20 and set(counts.values()) <= {3, 4} and len(counts) == 6
        assert len(set(batch)) == 20
        per_domain.update(counts)
    assert set(per_domain.values()) == {3 * 6 + 2}
    assert draw.indices(train, PHASE, 4, 20, seed=0) == sampler().indices(train, PHASE, 4, 20, seed=0)  # pure
    assert draw.indices(train, PHASE, 4, 20, seed=1) != draw.indices(train, PHASE, 4, 20, seed=0)


def test_a_batch_smaller_than_the_domain_count_deals_them_in_turn(corpus):
    domains = corpus.train["domain"]
    counts = Counter(domains[i] for step in range(3) for i in sampler().indices(corpus.train, PHASE, step, 4, seed=0))
    assert counts == {domain: 2 for domain in corpus.domains}  # 3 x 4 slots over 6 domains


def test_each_domain_is_seen_once_per_epoch_of_its_shard(corpus):
    train, domains = corpus.train, corpus.train["domain"]
    draw = sampler()
    rows = [i for step in range(5) for i in draw.indices(train, PHASE, step, 24, seed=3)]  # 4 per domain per step
    for domain in corpus.domains:
        mine = [i for i in rows if domains[i] == domain]
        assert len(mine) == 20 and sorted(mine) == group_rows(train, "domain").rows(domain).tolist()


def test_a_missing_column_is_one_clear_error(corpus):
    with pytest.raises(DataError) as info:
        sampler("topic").indices(corpus.train, PHASE, 0, 8, seed=0)
    assert info.value.key == "phases[1].sampler.column" and "column 'topic'" in info.value.message
