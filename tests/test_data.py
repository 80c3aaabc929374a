"""shortllm.data.calibration: named corpora under SHORTLLM_DATA and the calibration loader."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from shortllm.data.calibration import CalibrationData, calibration_loader, tokenize_text
from shortllm.data.corpora import CORPORA, corpus_rows, load_corpus_text
from shortllm.errors import DataError, EmptyLoaderError

SHARED = Path(os.environ.get("SHORTLLM_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_data = pytest.mark.skipif(not (SHARED / "wikitext-2").is_dir(), reason="shared data folder not found")


@pytest.fixture(autouse=True)
def _data_env(monkeypatch):
    monkeypatch.setenv("SHORTLLM_DATA", str(SHARED))


class CharTok:
    """A deterministic character-level tokenizer with the HF call signature (fast, no download)."""

    def __init__(self, pad=None, eos=3, bos=1, name="chartok"):
        self.pad_token_id, self.eos_token_id, self.bos_token_id, self.name_or_path = pad, eos, bos, name
        self.calls = 0

    def __len__(self):
        return 1000

    def __call__(self, text, add_special_tokens=True, verbose=True):
        assert add_special_tokens is False, "the loader must tokenise without special tokens"
        self.calls += 1
        return {"input_ids": [10 + ord(c) % 990 for c in text]}


def _sha(path: Path, gz: bool = False) -> str:
    raw = gzip.open(path, "rb").read() if gz else path.read_bytes()
    return hashlib.sha256(raw).hexdigest()


def _find_window(stream: torch.Tensor, row: torch.Tensor) -> list[int]:
    """Every start s with stream[s:s+len(row)] == row (prefix match vectorised, then exact check)."""
    windows = stream.unfold(0, row.numel(), 1)
    k = min(8, row.numel())
    cand = (windows[:, :k] == row[:k]).all(1).nonzero().flatten().tolist()
    return [s for s in cand if torch.equal(windows[s], row)]


# ---------------------------------------------------------------------------------------- corpora
@needs_data
def test_wikitext2_rows_follow_hf_semantics():
    for split, n_lines, n_blank, sha in [
        ("test", 4358, 1467, "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"),
        ("validation", 3760, 1299, "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7"),
    ]:
        f = SHARED / CORPORA["wikitext2"][split]
        assert _sha(f) == sha, f"{f} is not the file SOURCES.md describes"
        rows = corpus_rows("wikitext2", split)
        lines = f.read_text(encoding="utf-8").splitlines(keepends=True)
        assert len(rows) == n_lines == len(lines)
        assert sum(r == "" for r in rows) == n_blank
        for r, ln in zip(rows, lines):
            assert r == (ln if ln.strip() else ""), "non-blank lines keep their text and trailing newline"
        text = load_corpus_text("wikitext2", split)
        assert text == "\n\n".join(rows)
        assert len(text) == sum(map(len, rows)) + 2 * (n_lines - 1)
    assert load_corpus_text("wikitext2").startswith("\n\n = Robert Boulter = \n")


@needs_data
def test_ptb_rows_are_stripped_sentences_joined_by_blank_line():
    for split, n, sha, gz in [
        ("test", 3761, "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0", False),
        ("validation", 3370, "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2", False),
        ("train", 42068, "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf", True),
    ]:
        assert _sha(SHARED / CORPORA["ptb"][split], gz) == sha
        rows = corpus_rows("ptb", split)
        assert len(rows) == n
        assert all(r == r.strip() and r for r in rows[:500])
        assert load_corpus_text("ptb", split) == "\n\n".join(rows)
    assert load_corpus_text("ptb", "validation", join=" ") == " ".join(corpus_rows("ptb", "validation"))
    assert corpus_rows("ptb", "valid") == corpus_rows("ptb", "validation")


@needs_data
def test_c4_sample_documents():
    rows = corpus_rows("c4", "validation")
    assert len(rows) == 2000
    assert 4_200_000 < sum(map(len, rows)) < 4_250_000  # SOURCES.md: 4.22 M characters of text
    assert rows[0].startswith("We offer valet parking")
    assert load_corpus_text("c4") == load_corpus_text("c4", "validation") == "\n\n".join(rows)
    assert corpus_rows("c4", "test") == rows, "C4's only split here answers for 'test' too"


@needs_data
def test_corpus_text_is_cached():
    a = load_corpus_text("wikitext2", "test")
    assert load_corpus_text("wikitext-2", "test") is a
    assert load_corpus_text("WikiText2", "test", data_dir=SHARED) is a


def test_corpus_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"valid names: c4, ptb, wikitext2"):
        load_corpus_text("imagenet")
    with pytest.raises(DataError, match=r"valid splits: test, validation"):
        load_corpus_text("wikitext2", "bogus")
    with pytest.raises(DataError, match="not available locally"):
        load_corpus_text("wikitext2", "train")
    # Missing file: the message names the path and SHORTLLM_DATA.
    monkeypatch.setenv("SHORTLLM_DATA", str(tmp_path))
    with pytest.raises(DataError, match="SHORTLLM_DATA") as ei:
        load_corpus_text("ptb", "test")
    assert str(tmp_path / "ptb" / "ptb.test.txt") in str(ei.value)
    # Not a directory.
    monkeypatch.setenv("SHORTLLM_DATA", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="not a directory"):
        load_corpus_text("ptb", "test")
    # Unset, and no `datasets` to fall back on.
    monkeypatch.delenv("SHORTLLM_DATA")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="set SHORTLLM_DATA"):
        load_corpus_text("ptb", "test")


def test_corpus_non_utf8_and_corrupt_gzip(tmp_path, monkeypatch):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_bytes(" caf\xe9 au lait \n".encode("latin-1"))
    (tmp_path / "ptb" / "ptb.train.txt.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    monkeypatch.setenv("SHORTLLM_DATA", str(tmp_path))
    with pytest.raises(DataError, match="re-encode it as UTF-8") as ei:
        corpus_rows("ptb", "test")
    assert "ptb.test.txt" in str(ei.value)
    with pytest.raises(DataError, match="corrupt or truncated"):
        corpus_rows("ptb", "train")


def test_hub_fallback_errors_are_typed(monkeypatch):
    """Without SHORTLLM_DATA but with `datasets` importable, an offline hub gives a DataError."""
    class FakeDatasets:
        @staticmethod
        def load_dataset(*a, **k):
            raise ConnectionError("offline")
    monkeypatch.delenv("SHORTLLM_DATA")
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    with pytest.raises(DataError, match="set SHORTLLM_DATA"):
        load_corpus_text("ptb", "validation")


# ---------------------------------------------------------------------------------------- loader
@needs_data
def test_random_windows_are_slices_of_the_stream_and_cover_its_range():
    tok = CharTok()
    text = load_corpus_text("wikitext2", "validation")
    stream = tokenize_text(tok, text)
    L = 37
    cal = calibration_loader("wikitext2", tok, n_samples=300, seq_len=L, batch_size=7, seed=5)
    assert cal.description["split"] == "validation" and cal.description["source"] == "wikitext2"
    ids = torch.cat([b["input_ids"] for b in cal])
    assert ids.shape == (300, L) and len(cal) == 43 and cal.batches[-1]["input_ids"].shape[0] == 300 - 42 * 7
    assert cal.n_tokens == 300 * L and cal.n_samples == 300
    assert all(int(b["attention_mask"].min()) == 1 for b in cal)
    # Locate every row in the stream: each is an exact contiguous slice.
    starts = []
    for row in ids[:30]:
        match = _find_window(stream, row)
        assert match, "a random sample is not a window of the token stream"
        starts.append(match[0])
    assert max(starts) + L <= stream.numel()
    # Starts spread over the whole stream (uniform draw, not clustered at the start).
    assert min(starts) < stream.numel() * 0.2 and max(starts) > stream.numel() * 0.8


@needs_data
def test_random_is_deterministic_per_seed_and_leaves_global_rng_alone():
    tok = CharTok()
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = calibration_loader("wikitext2", tok, n_samples=5, seq_len=64, seed=1)
    assert torch.equal(torch.rand(3), before), "the loader must not consume the global RNG"
    b = calibration_loader("wikitext2", tok, n_samples=5, seq_len=64, seed=1)
    c = calibration_loader("wikitext2", tok, n_samples=5, seq_len=64, seed=2)
    assert a.fingerprint == b.fingerprint
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert a.fingerprint != c.fingerprint
    assert json.loads(json.dumps(a.description)) == a.description
    assert a.description == {"mode": "random", "seed": 1, "batch_size": 1, "seq_len": 64, "add_bos": False,
                             "tokenizer": "chartok", "source": "wikitext2", "split": "validation", "n_samples": 5}


@needs_data
def test_contiguous_chunks_and_splits():
    tok = CharTok()
    stream = tokenize_text(tok, load_corpus_text("ptb", "validation"))
    cal = calibration_loader("ptb", tok, split="validation", n_samples=4, seq_len=50, batch_size=2, mode="contiguous")
    assert torch.equal(torch.cat([b["input_ids"] for b in cal]), stream[:200].view(4, 50))
    everything = calibration_loader("ptb", tok, split="valid", n_samples=None, seq_len=1000, mode="contiguous")
    assert everything.n_samples == stream.numel() // 1000
    with pytest.raises(DataError, match="non-overlapping chunks"):
        calibration_loader("ptb", tok, split="validation", n_samples=10_000, seq_len=1000, mode="contiguous")
    assert calibration_loader("c4", tok, n_samples=2, seq_len=8).description["split"] == "validation"
    ptb = calibration_loader("ptb", tok, n_samples=2, seq_len=8)
    assert ptb.description["split"] == "train"


def test_text_files(tmp_path):
    tok = CharTok()
    f1, f2 = tmp_path / "a.txt", tmp_path / "b.txt"
    f1.write_text("hello world, " * 20, encoding="utf-8")
    f2.write_text("second file ünïcode " * 20, encoding="utf-8")
    one = calibration_loader(str(f1), tok, n_samples=3, seq_len=16, mode="contiguous")
    assert torch.equal(one.batches[0]["input_ids"][0], tokenize_text(tok, f1.read_text()[:16]))
    assert one.description["source"] == str(f1)
    both = calibration_loader([f1, f2], tok, n_samples=None, seq_len=16, mode="contiguous")
    joined = tokenize_text(tok, f1.read_text() + "\n\n" + f2.read_text())
    got = torch.cat([b["input_ids"] for b in both]).flatten()
    assert torch.equal(got, joined[: got.numel()]) and got.numel() == joined.numel() // 16 * 16
    assert calibration_loader([str(f1), str(f2)], tok, n_samples=None, seq_len=16,
                              mode="contiguous").fingerprint == both.fingerprint
    assert calibration_loader(f1, tok, n_samples=2, seq_len=16).fingerprint == \
        calibration_loader(str(f1), tok, n_samples=2, seq_len=16).fingerprint
    bad = tmp_path / "latin.txt"
    bad.write_bytes("na\xefve caf\xe9".encode("latin-1") * 10)
    with pytest.raises(DataError, match="latin.txt.*re-encode it as UTF-8"):
        calibration_loader(bad, tok, n_samples=1, seq_len=4)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    with pytest.raises(EmptyLoaderError):
        calibration_loader(empty, tok)
    with pytest.raises(DataError, match="does not exist"):
        calibration_loader(tmp_path / "missing.txt", tok)
    with pytest.raises(DataError, match="does not exist"):
        calibration_loader(str(tmp_path / "missing.txt"), tok)
    with pytest.raises(DataError, match="fewer than one window of 1000"):
        calibration_loader(f1, tok, n_samples=1, seq_len=1000)


def test_list_of_short_strings_is_padded_and_masked():
    tok = CharTok(pad=None, eos=3)
    texts = ["ab", "abcdef", "", "abc", "   "]
    cal = calibration_loader(texts, tok, n_samples=None, seq_len=5, batch_size=2, mode="contiguous")
    assert cal.description["dropped_empty"] == 2 and cal.n_samples == 3
    ids = torch.cat([b["input_ids"] for b in cal])
    mask = torch.cat([b["attention_mask"] for b in cal])
    assert ids.shape == (3, 5)  # "abcdef" truncated to seq_len; all padded to the longest
    assert mask.sum(1).tolist() == [2, 5, 3]
    assert cal.n_tokens == 10
    assert torch.equal(ids[1], tokenize_text(tok, "abcde"))
    assert ids[0, 2:].tolist() == [3, 3, 3], "pads use eos when the tokenizer has no pad token"
    padded = calibration_loader(["a", "abc"], CharTok(pad=7), n_samples=2, mode="contiguous")
    assert padded.batches[0]["input_ids"][0, 1:].tolist() == [7, 7]
    assert calibration_loader(["a", "abc"], CharTok(pad=None, eos=None), n_samples=2, mode="contiguous",
                              batch_size=2).batches[0]["input_ids"][0, 1:].tolist() == [0, 0]
    assert calibration_loader(["a", "abc"], CharTok(pad=7), n_samples=2, mode="contiguous", pad_token_id=9,
                              batch_size=2).batches[0]["input_ids"][0, 1:].tolist() == [9, 9]
    with pytest.raises(DataError, match="3 non-empty texts but n_samples=4"):
        calibration_loader(texts, tok, n_samples=4, seq_len=5)
    with pytest.raises(EmptyLoaderError):
        calibration_loader(["", " \n"], tok)
    with pytest.raises(EmptyLoaderError):
        calibration_loader([], tok)
    with pytest.raises(DataError, match="must hold strings"):
        calibration_loader(["ok", 5], tok, n_samples=1)


def test_list_random_mode_picks_distinct_texts_with_random_windows():
    tok = CharTok()
    # 20 texts of 30 distinct characters each: every token identifies its text and position.
    texts = ["".join(chr(0x100 + 30 * i + j) for j in range(30)) for i in range(20)]
    a = calibration_loader(texts, tok, n_samples=12, seq_len=8, seed=3)
    b = calibration_loader(texts, tok, n_samples=12, seq_len=8, seed=3)
    c = calibration_loader(texts, tok, n_samples=12, seq_len=8, seed=4)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    owners, starts = [], []
    for x in a:
        row = x["input_ids"][0]
        assert row.numel() == 8 and int(x["attention_mask"].sum()) == 8
        pos = int(row[0]) - 10 - 0x100
        owners.append(pos // 30)
        starts.append(pos % 30)
        assert torch.equal(row, tokenize_text(tok, texts[pos // 30])[pos % 30: pos % 30 + 8])
    assert len(set(owners)) == 12, "random mode draws distinct texts"
    assert max(starts) <= 30 - 8 and len(set(starts)) > 3, "windows start anywhere in a long text"
    first = calibration_loader(texts, tok, n_samples=3, seq_len=8, mode="contiguous", batch_size=3)
    assert torch.equal(first.batches[0]["input_ids"], torch.stack([tokenize_text(tok, t)[:8] for t in texts[:3]]))


def test_add_bos():
    tok = CharTok(bos=1)
    cal = calibration_loader(["hello there", "hi"], tok, n_samples=2, seq_len=6, mode="contiguous", add_bos=True,
                             batch_size=2)
    ids, mask = cal.batches[0]["input_ids"], cal.batches[0]["attention_mask"]
    assert ids.shape == (2, 6) and ids[:, 0].tolist() == [1, 1]
    assert torch.equal(ids[0, 1:], tokenize_text(tok, "hello"))
    assert mask.sum(1).tolist() == [6, 3]
    with pytest.raises(DataError, match="bos_token_id"):
        calibration_loader(["x"], CharTok(bos=None), n_samples=1, add_bos=True)


def test_dataset_like_source():
    class FakeDataset:  # duck-typed like datasets.Dataset
        def __init__(self, cols):
            self.cols = cols
            self.column_names = list(cols)

        def __len__(self):
            return len(next(iter(self.cols.values())))

        def __getitem__(self, key):
            return self.cols[key]

    tok = CharTok()
    ds = FakeDataset({"text": ["one text", "two texts here"], "id": [0, 1]})
    cal = calibration_loader(ds, tok, n_samples=2, seq_len=32, mode="contiguous", batch_size=2)
    assert cal.batches[0]["attention_mask"].sum(1).tolist() == [8, 14]
    assert cal.description["source"] == "datasets.Dataset[2]"
    with pytest.raises(DataError, match="no 'text' column"):
        calibration_loader(FakeDataset({"body": ["x"]}), tok)


def test_pretokenised_sources():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (5, 9), generator=g)
    cal = calibration_loader(ids, batch_size=2)
    assert len(cal) == 3 and torch.equal(torch.cat([b["input_ids"] for b in cal]), ids)
    assert cal.n_tokens == 45 and cal.description["mode"] == "given" and cal.description["seq_len"] == 9
    mask = torch.ones(5, 9, dtype=torch.long)
    mask[1, 4:] = 0
    cal2 = calibration_loader({"input_ids": ids.int(), "attention_mask": mask}, batch_size=5)
    assert cal2.n_tokens == 40 and cal2.batches[0]["input_ids"].dtype == torch.long
    assert calibration_loader(ids[0]).batches[0]["input_ids"].shape == (1, 9)
    assert calibration_loader(cal2) is cal2
    with pytest.raises(DataError, match="integer"):
        calibration_loader(ids.float())
    with pytest.raises(DataError, match="differs"):
        calibration_loader({"input_ids": ids, "attention_mask": mask[:, :3]})
    with pytest.raises(DataError, match="only 0 and 1"):
        calibration_loader({"input_ids": ids, "attention_mask": mask * 2})
    with pytest.raises(EmptyLoaderError):
        calibration_loader({"input_ids": ids, "attention_mask": torch.zeros_like(ids)})
    with pytest.raises(EmptyLoaderError):
        calibration_loader(torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(DataError, match="needs 'input_ids'"):
        calibration_loader({"ids": ids})


def test_argument_errors():
    tok = CharTok()
    with pytest.raises(DataError, match="needs a tokenizer"):
        calibration_loader(["text"])
    with pytest.raises(DataError, match="n_samples must be >= 1"):
        calibration_loader(["text"], tok, n_samples=0)
    with pytest.raises(DataError, match="seq_len must be >= 2"):
        calibration_loader(["text"], tok, seq_len=1)
    with pytest.raises(DataError, match="batch_size"):
        calibration_loader(["text"], tok, batch_size=0)
    with pytest.raises(DataError, match="Unknown mode"):
        calibration_loader(["text"], tok, mode="shuffled")
    with pytest.raises(DataError, match="not a corpus"):
        calibration_loader("openwebtext", tok)
    with pytest.raises(DataError, match="Unsupported calibration source"):
        calibration_loader(3.5, tok)
    for err in (DataError, EmptyLoaderError):
        assert issubclass(err, ValueError)


def test_random_stream_needs_explicit_n_samples(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("abcdefgh" * 10)
    with pytest.raises(DataError, match="explicit n_samples"):
        calibration_loader(f, CharTok(), n_samples=None, seq_len=4)


def test_fingerprint_shard_and_to():
    ids = torch.arange(70).view(10, 7)
    cal = calibration_loader(ids, batch_size=1)
    other = ids.clone()
    other[9, 6] += 1
    assert calibration_loader(other).fingerprint != cal.fingerprint
    assert calibration_loader(ids.clone()).fingerprint == cal.fingerprint
    assert len(cal.fingerprint) == 64
    shards = [cal.shard(r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [4, 3, 3]
    rows = sorted(int(b["input_ids"][0, 0]) for s in shards for b in s)
    assert rows == list(range(0, 70, 7)), "shards are disjoint and cover every batch"
    assert shards[1].description["shard"] == [1, 3] and shards[1].n_tokens == 21
    with pytest.raises(DataError):
        cal.shard(3, 3)
    with pytest.raises(EmptyLoaderError):
        calibration_loader(ids[:2]).shard(0, 3)
    moved = cal.to("cpu")
    assert moved.fingerprint == cal.fingerprint and isinstance(moved, CalibrationData)


def test_tokenize_cache_reuses_results():
    tok = CharTok(name="cache-test")
    a = tokenize_text(tok, "some text " * 10)
    b = tokenize_text(tok, "some text " * 10)
    assert a is b and tok.calls == 1


# ---------------------------------------------------------------------------------------- real tokenizer
@pytest.fixture(scope="module")
def real_tokenizer():
    from transformers import AutoTokenizer

    from shortllm.model.loading import builtin_checkpoint
    tok = AutoTokenizer.from_pretrained(str(builtin_checkpoint()))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@needs_data
@pytest.mark.real_model
def test_real_tokenizer_default_calibration(real_tokenizer):
    tok = real_tokenizer
    cal = calibration_loader("wikitext2", tok)
    assert len(cal) == 10 and cal.n_tokens == 1280 and cal.batches[0]["input_ids"].shape == (1, 128)
    assert cal.description["tokenizer"] == "smollm2-135m"
    assert calibration_loader("wikitext2", tok).fingerprint == cal.fingerprint
    stream = tokenize_text(tok, load_corpus_text("wikitext2", "validation"))
    for b in cal.batches[:3]:
        assert _find_window(stream, b["input_ids"][0])
    # Short texts: padded with the pad id, masked.
    short = calibration_loader(["The cat sat.", "A much longer sentence about language models."], tok,
                               n_samples=2, mode="contiguous", batch_size=2)
    m = short.batches[0]["attention_mask"]
    assert m[0].sum() < m[1].sum() == m.shape[1]
    assert (short.batches[0]["input_ids"][0][m[0] == 0] == tok.pad_token_id).all()
