"""Training data for `shortllm.retrain`: a text corpus cut into causal-LM chunks, or instruction pairs.

Two kinds of example, both ``(input_ids, labels)`` pairs of 1-D LongTensors:

- **text** (continued pretraining or LoRA on a corpus): the text is tokenised without special tokens
  and cut into non-overlapping ``seq_len`` chunks (remainder dropped); ``labels = input_ids``. The
  held-out split is the *tail* of the chunk sequence (the last ``heldout_fraction`` of the corpus), so
  it is contiguous text the model never trains on and does not depend on the training seed.
- **instruction** (JSONL, one object per line, ``.jsonl`` or ``.jsonl.gz``): either
  ``instruction`` / ``input`` (optional) / ``output`` (formatted with the Alpaca template the seed's
  LoRA recipe uses) or ``prompt`` / ``response`` (used verbatim: the response follows the prompt
  directly, so put any separator at the end of the prompt). The prompt is tokenised with the
  tokenizer's special tokens (e.g. BOS), the response without, then EOS is appended; prompt tokens get
  label -100 so only the response is learned. Too-long examples are cut to ``seq_len`` from the right;
  an example whose response is cut away entirely is dropped. The held-out split is a fixed-seed (0)
  random subset, independent of the training seed.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from shortllm.errors import DataError

ALPACA_TEMPLATE = ("Below is an instruction that describes a task{with_input}. Write a response that "
                   "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                   "{input_block}### Response:\n")
_TOKENIZE_PIECE = 200_000  # characters per tokenizer call: batching pieces is much faster than one huge string


@dataclass
class RetrainData:
    """Tokenised training and held-out examples: lists of ``(input_ids, labels)`` 1-D LongTensors."""

    train: list[tuple[torch.Tensor, torch.Tensor]]
    heldout: list[tuple[torch.Tensor, torch.Tensor]]
    kind: str  # "text" | "instruction"
    source: str = ""

    def fingerprint(self) -> str:
        """sha256 over every token and label, so a resume refuses different data."""
        h = hashlib.sha256(self.kind.encode())
        for part in (self.train, self.heldout):
            h.update(str(len(part)).encode())
            for ids, labels in part:
                h.update(ids.to(torch.int64).numpy().tobytes())
                h.update(labels.to(torch.int64).numpy().tobytes())
        return h.hexdigest()

    @property
    def train_tokens(self) -> int:
        return sum(int(ids.numel()) for ids, _ in self.train)


def _need_tokenizer(tokenizer) -> None:
    if tokenizer is None:
        raise DataError("Retraining on text needs a tokenizer, but none was given (the model dir may hold no "
                        "tokenizer files); pass tokenizer=AutoTokenizer.from_pretrained(...) or a model dir "
                        "saved with its tokenizer.")


def _split_heldout(n: int, fraction: float) -> int:
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"heldout_fraction={fraction} must be in [0, 1); use e.g. 0.05.")
    k = math.ceil(n * fraction) if fraction > 0 else 0
    if n - k < 1:
        raise DataError(f"Only {n} example(s): nothing left to train on after holding out {k}; "
                        "give more data or lower heldout_fraction.")
    return k


def _tokenize_text(text: str, tokenizer) -> list[int]:
    # Cut at newlines so no word is split; tokens at a cut may differ from one-shot tokenisation,
    # which is harmless for training and keeps tokenising PTB/C4 to a couple of seconds.
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + _TOKENIZE_PIECE)
        if end < len(text):
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl > start else end
        pieces.append(text[start:end])
        start = end
    out: list[int] = []
    for ids in tokenizer(pieces, add_special_tokens=False)["input_ids"]:
        out.extend(ids)
    return out


def text_data(text: str, tokenizer, seq_len: int, heldout_fraction: float = 0.05, source: str = "") -> RetrainData:
    """Causal-LM chunks of ``seq_len`` tokens from one text; the last ``heldout_fraction`` is held out."""
    _need_tokenizer(tokenizer)
    if seq_len < 2:
        raise DataError(f"seq_len={seq_len} must be at least 2 (one input and one predicted token).")
    if not text or not text.strip():
        raise DataError(f"The training text{' from ' + source if source else ''} is empty; give a corpus "
                        "name (ptb, c4, wikitext2), a non-empty text file, or a folder of .txt files.")
    ids = torch.tensor(_tokenize_text(text, tokenizer), dtype=torch.long)
    n = ids.numel() // seq_len
    if n < 2:
        raise DataError(f"The text has {ids.numel()} tokens, fewer than two chunks of seq_len={seq_len}; "
                        "give more text or lower seq_len.")
    chunks = list(ids[: n * seq_len].view(n, seq_len).unbind(0))
    k = _split_heldout(n, heldout_fraction)
    pairs = [(c.clone(), c.clone()) for c in chunks]
    return RetrainData(train=pairs[: n - k], heldout=pairs[n - k:], kind="text", source=source)


def _format_record(rec: dict, where: str) -> tuple[str, str]:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}.")
    if "instruction" in rec and "output" in rec:
        inp = str(rec.get("input") or "")
        prompt = ALPACA_TEMPLATE.format(
            with_input=", paired with an input that provides further context" if inp else "",
            instruction=rec["instruction"], input_block=f"### Input:\n{inp}\n\n" if inp else "")
        return prompt, str(rec["output"])
    if "prompt" in rec and "response" in rec:
        return str(rec["prompt"]), str(rec["response"])
    raise DataError(f"{where}: a record needs 'instruction' + 'output' (optional 'input') or 'prompt' + "
                    f"'response'; found keys {sorted(rec)}.")


def instruction_data(records: list[dict], tokenizer, seq_len: int, heldout_fraction: float = 0.05,
                     source: str = "") -> RetrainData:
    """Prompt/response examples with prompt tokens masked (label -100); see the module docstring."""
    _need_tokenizer(tokenizer)
    examples = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for i, rec in enumerate(records):
        prompt, response = _format_record(rec, f"{source or 'instruction data'} record {i + 1}")
        p = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        r = list(tokenizer(response, add_special_tokens=False)["input_ids"]) + ([eos] if eos is not None else [])
        ids = (p + r)[:seq_len]
        labels = ([-100] * len(p) + r)[:seq_len]
        if len(ids) < 2 or all(t == -100 for t in labels[1:]):
            continue  # nothing to learn: the response was cut away (or is empty)
        examples.append((torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)))
    if not examples:
        raise DataError(f"No usable instruction example in {source or 'the data'} ({len(records)} record(s)); "
                        f"every response is empty or lies beyond seq_len={seq_len}: raise seq_len.")
    k = _split_heldout(len(examples), heldout_fraction)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    held = sorted(order[:k])
    held_set = set(held)
    return RetrainData(train=[examples[i] for i in range(len(examples)) if i not in held_set],
                       heldout=[examples[i] for i in held], kind="instruction", source=source)


def _read_text(path: Path) -> str:
    try:
        raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    except OSError as e:
        raise DataError(f"Cannot read {path}: {e}; check the path and permissions.") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start}); re-encode it as UTF-8.") from None


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for i, line in enumerate(_read_text(path).splitlines()):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise DataError(f"{path} line {i + 1} is not valid JSON ({e}); one JSON object per line.") from None
    return records


def _corpus_training_text(name: str, data_dir) -> tuple[str, str]:
    from shortllm.data.corpora import CORPORA, canonical_corpus, load_corpus_text

    key = canonical_corpus(name)
    # Train on the train split where one exists (PTB); C4 and WikiText-2 only have evaluation splits
    # locally, so use their validation text (never the test split the evaluator reports).
    split = "train" if "train" in CORPORA[key] else "validation"
    return load_corpus_text(key, split, data_dir), f"{key}:{split}"


def load_retrain_data(spec: str | os.PathLike, tokenizer, seq_len: int, heldout_fraction: float = 0.05,
                      data_dir: str | os.PathLike | None = None) -> RetrainData:
    """Build `RetrainData` from a corpus name (ptb, c4, wikitext2), a .jsonl(.gz) instruction file, a text
    file, or a folder of ``*.txt`` files (sorted by name, joined with a blank line)."""
    path = Path(str(spec)).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.txt")) + sorted(path.glob("*.txt.gz"))
        if not files:
            raise DataError(f"{path} holds no .txt or .txt.gz file; put the training text there or pass a file.")
        text = "\n\n".join(_read_text(f) for f in files)
        return text_data(text, tokenizer, seq_len, heldout_fraction, source=str(path))
    if path.is_file():
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            return instruction_data(_read_jsonl(path), tokenizer, seq_len, heldout_fraction, source=str(path))
        return text_data(_read_text(path), tokenizer, seq_len, heldout_fraction, source=str(path))
    if any(sep in str(spec) for sep in ("/", os.sep)) or path.suffix:
        raise DataError(f"No data file or folder at {path}; pass an existing path or a corpus name "
                        "(ptb, c4, wikitext2).")
    text, source = _corpus_training_text(str(spec), data_dir)
    return text_data(text, tokenizer, seq_len, heldout_fraction, source=source)


class StepStream(torch.utils.data.Dataset):
    """The training examples of a whole run in order: example ``i`` is position ``i % n`` of epoch
    ``i // n``'s permutation (seeded by ``(seed, epoch)``), for ``steps * global_batch`` positions.

    The Trainer reads it sequentially (``train_sampling_strategy="sequential"``); under data parallelism
    accelerate hands rank ``r`` the ``r``-th micro-batch of every group of ``world_size``, so the global
    batch of a step is the same set of examples for any world size with the same global batch size, and
    a resumed run skips to exactly where it stopped.
    """

    def __init__(self, data: RetrainData, steps: int, global_batch: int, seed: int):
        if not data.train:
            raise DataError("The training split is empty; give more data.")
        self.examples, self.length, self.seed = data.train, int(steps) * int(global_batch), int(seed)
        self._perms: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return self.length

    def index(self, i: int) -> int:
        n = len(self.examples)
        epoch = i // n
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(n, generator=g).tolist()
        return self._perms[epoch][i % n]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        return self.examples[self.index(i)]

    def tokens(self, n_positions: int) -> tuple[int, int]:
        """(input tokens, predicted target tokens) of the first ``n_positions`` examples."""
        inputs = targets = 0
        for i in range(min(n_positions, self.length)):
            ids, labels = self[i]
            inputs += int(ids.numel())
            targets += int((labels[1:] != -100).sum())
        return inputs, targets


def collate(examples: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> dict:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` and ``shift_labels`` (``labels[:, 1:]``
    with -100 appended: the target of each position; the Trainer counts these to normalise the loss)."""
    n = max(int(e[0].numel()) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : x.numel()], labels[i, : y.numel()], mask[i, : x.numel()] = x, y, 1
    shift = torch.cat([labels[:, 1:], torch.full((len(examples), 1), -100, dtype=torch.long)], 1)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "shift_labels": shift}
