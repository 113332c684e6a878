"""Tokenizers, load_data (sources, tokenisation, cache) and collate."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from srde_core.data import (
    ColumnsParams,
    DataParams,
    GenerateParams,
    TokenizerParams,
    collate,
    encode_example,
    load_data,
    load_tokenizer,
)
from srde_plugins.data.corpora import DOMAINS
from srde_plugins.data.tokenizers import mistral_common_data_dir
from srde_core.errors import DataError

V3 = "mistral_instruct_tokenizer_240323.model.v3"
COLUMNS = {"input_ids", "prompt_len", "domain", "domain_id", "difficulty", "prompt", "answer"}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TokenizerParams())


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _error(params: DataParams, tokenizer, tmp_path) -> str:
    with pytest.raises(DataError) as info:
        load_data(params, tokenizer, tmp_path / "cache", base_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- tokenizer ---------------------------------------------------------------------------------


def test_v3_tokenizer_round_trips_and_marks_bos_eos(tokenizer):
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (32768, 1, 2)
    assert tokenizer.pad_id == tokenizer.eos_id  # v3 defines no pad token
    for text in ("Q: 17+25=?\nA: 42", "x=3;x+=4;print(x*2)", "All wugs are daxs. Is Tom a dax?"):
        ids = tokenizer.encode(text, bos=True, eos=True)
        assert ids[0] == 1 and ids[-1] == 2
        assert tokenizer.decode(ids) == text
        assert tokenizer.encode(text, bos=False, eos=False) == ids[1:-1]
    assert tokenizer.decode(torch.tensor(tokenizer.encode("A: 7", bos=True, eos=False))) == "A: 7"


def test_fingerprint_is_stable_and_tracks_the_file(tmp_path, tokenizer):
    shipped = mistral_common_data_dir() / V3
    assert tokenizer.fingerprint == load_tokenizer(TokenizerParams()).fingerprint
    assert tokenizer.fingerprint.endswith(hashlib.sha256(shipped.read_bytes()).hexdigest())
    copy = tmp_path / "tok.model.v3"
    copy.write_bytes(shipped.read_bytes())
    assert load_tokenizer(TokenizerParams(file="tok.model.v3"), base_dir=tmp_path).fingerprint == tokenizer.fingerprint
    other = load_tokenizer(TokenizerParams(file="mistral_instruct_tokenizer_240216.model.v2"))
    assert other.fingerprint != tokenizer.fingerprint


def test_a_checkpoint_directory_means_its_tekken_json(tmp_path):
    checkpoint = tmp_path / "Ministral-ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    shipped = mistral_common_data_dir() / "tekken_240911.json"
    (checkpoint / "tekken.json").write_bytes(shipped.read_bytes())
    tok = load_tokenizer(TokenizerParams(file="Ministral-ckpt"), base_dir=tmp_path)
    assert tok.fingerprint == load_tokenizer(TokenizerParams(file="tekken_240911.json")).fingerprint
    assert tok.vocab_size == 131072
    (tmp_path / "no-tokenizer").mkdir()
    with pytest.raises(DataError, match=r"tokenizer.file: 'no-tokenizer' not found \(not a file, nor a directory holding tekken.json"):
        load_tokenizer(TokenizerParams(file="no-tokenizer"), base_dir=tmp_path)


def test_tokenizer_errors_name_the_key(tmp_path):
    with pytest.raises(DataError, match=r"^recipe.toml: tokenizer.file: 'nope.model' not found"):
        load_tokenizer(TokenizerParams(file="nope.model"), base_dir=tmp_path, source="recipe.toml")
    (tmp_path / "junk.model").write_text("not a tokenizer")
    with pytest.raises(DataError, match="tokenizer.file: .*junk.model: not a mistral-common tokenizer"):
        load_tokenizer(TokenizerParams(file="junk.model"), base_dir=tmp_path)
    with pytest.raises(ValidationError, match="name_or_path"):
        TokenizerParams(kind="hf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="^tokenizer.name_or_path: cannot load"):
        load_tokenizer(TokenizerParams(kind="hf", name_or_path="empty"), base_dir=tmp_path)


def test_hf_tokenizer_from_a_local_directory(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in "Q: A: what is one two yes no".split():
        vocab[word] = len(vocab)
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece()
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        tmp_path / "tok"
    )
    tok = load_tokenizer(TokenizerParams(kind="hf", name_or_path="tok"), base_dir=tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, len(vocab))
    ids = tok.encode("Q: what is one A: yes", bos=True, eos=True)
    assert ids == [1, 3, 5, 6, 7, 4, 9, 2]
    assert tok.decode(ids) == "Q: what is one A: yes"
    assert tok.fingerprint == load_tokenizer(TokenizerParams(kind="hf", name_or_path=str(tmp_path / "tok"))).fingerprint
    assert encode_example(tok, "Q: what is one A:", "yes", 64) == (ids, 6)


# --- load_data on the generated corpus -----------------------------------------------------------


def test_generated_corpus_loads_tokenised_and_is_cached(tmp_path, tokenizer, monkeypatch):
    params = DataParams(generate=GenerateParams(examples_per_domain=24, eval_per_domain=6, seed=1), seq_len=64)
    bundle = load_data(params, tokenizer, tmp_path / "cache")
    assert not bundle.cache_hit
    assert bundle.domains == sorted(DOMAINS)
    assert (len(bundle.train), len(bundle.eval)) == (24 * 6, 6 * 6)
    assert set(bundle.train.column_names) == COLUMNS and set(bundle.eval.column_names) == COLUMNS
    for row in bundle.train.select(range(30)):
        ids, prompt_len = row["input_ids"], row["prompt_len"]
        assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
        assert ids[:prompt_len] == tokenizer.encode(row["prompt"], bos=True, eos=False)
        assert tokenizer.decode(ids[prompt_len:]).strip() == row["answer"]
        assert bundle.domains[row["domain_id"]] == row["domain"]
        assert row["difficulty"] in (1, 2, 3)
    assert not set(bundle.train["prompt"]) & set(bundle.eval["prompt"])

    # A cache hit must not tokenise anything: any call to encode fails the test.
    def no_encode(*args, **kwargs):
        raise AssertionError("tokenised again on a cache hit")

    monkeypatch.setattr(tokenizer, "encode", no_encode)
    again = load_data(params, tokenizer, tmp_path / "cache")
    assert again.cache_hit and again.cache_path == bundle.cache_path
    assert again.fingerprint == bundle.fingerprint and len(bundle.fingerprint) == 32
    assert again.train["input_ids"] == bundle.train["input_ids"] and again.domains == bundle.domains
    with pytest.raises(AssertionError, match="tokenised again"):
        load_data(params.model_copy(update={"seq_len": 32}), tokenizer, tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache" / "tokenized").iterdir() if p.name.endswith(".tmp")]


def test_truncation_keeps_prompt_len_within_seq_len(tmp_path, tokenizer):
    params = DataParams(generate=GenerateParams(examples_per_domain=6, eval_per_domain=3, seed=0), seq_len=8)
    bundle = load_data(params, tokenizer, tmp_path / "cache")
    assert max(len(ids) for ids in bundle.train["input_ids"]) == 8
    assert all(p <= 8 for p in bundle.train["prompt_len"])


# --- user data -----------------------------------------------------------------------------------


def test_custom_jsonl_with_a_column_mapping(tmp_path, tokenizer):
    rows = [{"question": "Q: 2+2=?\nA:", "solution": 4, "topic": "arith", "extra": [1]},
            {"question": "Q: capital of France?\nA:", "solution": "Paris", "topic": "geo", "extra": None}]
    _write_jsonl(tmp_path / "train.jsonl", rows)
    params = DataParams(train_files=["train.jsonl"],
                        columns=ColumnsParams(prompt="question", answer="solution", domain="topic"))
    bundle = load_data(params, tokenizer, tmp_path / "cache", base_dir=tmp_path)
    assert bundle.eval is None and bundle.domains == ["arith", "geo"]
    assert bundle.train["answer"] == ["4", "Paris"] and bundle.train["difficulty"] == [0, 0]
    assert bundle.train["domain_id"] == [0, 1]
    first = bundle.train[0]
    assert tokenizer.decode(first["input_ids"]) == "Q: 2+2=?\nA: 4"


def test_text_mode_csv_and_parquet(tmp_path, tokenizer):
    _write_jsonl(tmp_path / "notes.jsonl", [{"content": "Water boils at 100 C."}, {"content": "Ice melts."}])
    text = load_data(DataParams(train_files=["notes.jsonl"], columns=ColumnsParams(text="content")),
                     tokenizer, tmp_path / "cache", base_dir=tmp_path)
    assert text.domains == ["general"]
    assert text.train["prompt"] == ["", ""] and text.train["prompt_len"] == [1, 1]
    assert tokenizer.decode(text.train[0]["input_ids"]) == "Water boils at 100 C."

    with (tmp_path / "train.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["prompt", "answer", "domain", "difficulty"], ["Q: code?\nA:", "007", "spy", "2"],
                                 ["Q: none?\nA:", "NA", "spy", "1"]])
    pq.write_table(pa.table({"prompt": ["Q: 1+1=?\nA:"], "answer": ["2"], "domain": ["math"]}), tmp_path / "ev.parquet")
    bundle = load_data(DataParams(format="csv", train_files=["train.csv"]), tokenizer, tmp_path / "cache",
                       base_dir=tmp_path)
    assert bundle.train["answer"] == ["007", "NA"] and bundle.train["difficulty"] == [2, 1]
    parquet = load_data(DataParams(format="parquet", train_files=["ev.parquet"], eval_files=["ev.parquet"]),
                        tokenizer, tmp_path / "cache", base_dir=tmp_path)
    assert parquet.train["answer"] == ["2"] and len(parquet.eval) == 1 and parquet.domains == ["math"]


def test_hf_dataset_saved_to_disk(tmp_path, tokenizer):
    from datasets import Dataset, DatasetDict

    split = Dataset.from_dict({"prompt": ["Q: 3+4=?\nA:"], "answer": ["7"]})
    DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "ds"))
    params = DataParams(format="hf", hf_name="ds", hf_eval_split="test")
    bundle = load_data(params, tokenizer, tmp_path / "cache", base_dir=tmp_path)
    assert bundle.train["answer"] == ["7"] and bundle.eval["answer"] == ["7"] and bundle.domains == ["general"]
    assert load_data(params, tokenizer, tmp_path / "cache", base_dir=tmp_path).cache_hit
    message = _error(DataParams(format="hf", hf_name="ds"), tokenizer, tmp_path)
    assert message == "ds: data.hf_eval_split: split 'validation' not found (splits: train, test)"


# --- bad data: one line naming the file and the line or column ---------------------------------


def test_missing_file(tmp_path, tokenizer):
    message = _error(DataParams(train_files=["data/missing.jsonl"]), tokenizer, tmp_path)
    assert message == f"{tmp_path / 'data/missing.jsonl'}: file not found (data.train_files)"


def test_malformed_jsonl_line_and_non_object(tmp_path, tokenizer):
    good = {"prompt": "Q: a\nA:", "answer": "b"}
    _write_jsonl(tmp_path / "bad.jsonl", [good, "", '{"prompt": "x", "answer": ', good])
    message = _error(DataParams(train_files=["bad.jsonl"]), tokenizer, tmp_path)
    assert message.startswith(f"{tmp_path / 'bad.jsonl'}: line 3: not valid JSON")
    _write_jsonl(tmp_path / "list.jsonl", [good, "[1, 2]"])
    assert _error(DataParams(train_files=["list.jsonl"]), tokenizer, tmp_path).endswith(
        "list.jsonl: line 2: expected a JSON object")


def test_missing_and_bad_columns(tmp_path, tokenizer):
    _write_jsonl(tmp_path / "t.jsonl", [{"a": "x", "b": "y"}])
    message = _error(DataParams(train_files=["t.jsonl"], columns=ColumnsParams(prompt="question", answer="b")),
                     tokenizer, tmp_path)
    assert message == f"{tmp_path / 't.jsonl'}: column 'question' not found (columns: a, b)"
    _write_jsonl(tmp_path / "u.jsonl", [{"prompt": "p", "answer": "a"}])
    assert _error(DataParams(train_files=["u.jsonl"], columns=ColumnsParams(domain="topic")), tokenizer,
                  tmp_path).endswith("u.jsonl: column 'topic' not found (columns: prompt, answer)")
    _write_jsonl(tmp_path / "v.jsonl", [{"prompt": "p", "answer": "a"}, {"prompt": "p"}])
    assert _error(DataParams(train_files=["v.jsonl"]), tokenizer, tmp_path).endswith(
        "v.jsonl: line 2: column 'answer' missing")
    _write_jsonl(tmp_path / "w.jsonl", [{"prompt": "p", "answer": None}])
    assert _error(DataParams(train_files=["w.jsonl"]), tokenizer, tmp_path).endswith(
        "w.jsonl: line 1: column 'answer' is empty")
    _write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "answer": "a", "difficulty": "hard"}])
    assert _error(DataParams(train_files=["x.jsonl"]), tokenizer, tmp_path).endswith(
        "x.jsonl: line 1: column 'difficulty' is not an integer ('hard')")


def test_bad_csv_and_parquet(tmp_path, tokenizer):
    (tmp_path / "t.csv").write_text("question,answer\nq,a\n")
    assert _error(DataParams(format="csv", train_files=["t.csv"]), tokenizer, tmp_path) == (
        f"{tmp_path / 't.csv'}: column 'prompt' not found (columns: question, answer)")
    (tmp_path / "t.parquet").write_text("not parquet")
    assert _error(DataParams(format="parquet", train_files=["t.parquet"]), tokenizer, tmp_path).startswith(
        f"{tmp_path / 't.parquet'}: not a Parquet file")
    (tmp_path / "e.csv").write_text("prompt,answer,domain\nq,a,\n")
    assert _error(DataParams(format="csv", train_files=["e.csv"]), tokenizer, tmp_path) == (
        f"{tmp_path / 'e.csv'}: row 1: column 'domain' is an empty domain name")


# --- collate -------------------------------------------------------------------------------------


def test_collate_pads_and_masks():
    rows = [{"input_ids": [1, 10, 11, 12, 2], "prompt_len": 3, "domain_id": 2},
            {"input_ids": [1, 20, 2], "prompt_len": 2, "domain_id": 0}]
    batch = collate(rows, pad_id=2, loss_on="all")
    assert batch["input_ids"].tolist() == [[1, 10, 11, 12, 2], [1, 20, 2, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[1, 10, 11, 12, 2], [1, 20, 2, -100, -100]]
    assert batch["domain_ids"].tolist() == [2, 0] and batch["domain_ids"].dtype == torch.long
    answer = collate(rows, pad_id=0, loss_on="answer")
    assert answer["labels"].tolist() == [[-100, -100, -100, 12, 2], [-100, -100, 2, -100, -100]]
    assert answer["input_ids"][1].tolist() == [1, 20, 2, 0, 0]
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    assert all(torch.equal(collate(columns, 2, "answer")[k], answer_k) for k, answer_k in
               collate(rows, 2, "answer").items())
    with pytest.raises(ValueError, match="loss_on"):
        collate(rows, 0, "prompt")


def test_collate_takes_a_selected_dataset_and_maps_domain_names(tmp_path, tokenizer):
    params = DataParams(generate=GenerateParams(examples_per_domain=6, eval_per_domain=3, seed=0), loss_on="answer")
    bundle = load_data(params, tokenizer, tmp_path / "cache")
    rows = bundle.train.select([0, 5, 7])
    batch = collate(rows, pad_id=tokenizer.pad_id, loss_on=params.loss_on, domains=bundle.domains)
    assert batch["domain_ids"].tolist() == [bundle.domains.index(d) for d in rows["domain"]]
    assert batch["domain_ids"].tolist() == rows["domain_id"]
    for i, row in enumerate(rows):
        answer_labels = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert answer_labels == row["input_ids"][row["prompt_len"]:]
    shuffled = ["zeta", *bundle.domains]
    assert collate(rows, 0, domains=shuffled)["domain_ids"].tolist() == [shuffled.index(d) for d in rows["domain"]]
