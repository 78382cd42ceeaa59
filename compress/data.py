"""Corpora and their fixed splits (PROTOCOL.md): evaluation windows and calibration samples.

`pydoc` ships with every Python; local .txt/.jsonl/.parquet files go through `datasets`;
any other name is a hub dataset (`wikitext` is wikitext-2-raw-v1). `random` is uniform random
token ids of the model's vocabulary: for timing and memory runs of compression on random-weight
models (e.g. GPTQ of the Llama-3-8B shape on 128 x 2048 tokens), never for quality.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from compress.errors import UserError, first_line, user_error_on
from compress.hub import hub_reachable

CORPUS_HELP = ("pydoc, wikitext, random, a local .txt/.jsonl/.parquet file, or a hub dataset "
               "name[:config]")
# Protocol defaults per corpus: evaluation window length and count (None: every full window).
EVAL_DEFAULTS = {"pydoc": (1024, 20), "wikitext": (2048, None), "random": (2048, 4)}
RANDOM_TOKENS = (8 * 2048, 256 * 2048)   # evaluation, calibration
RANDOM_SEEDS = (0, 1)
LOCAL_DEFAULTS = (1024, 20)
HUB_ALIASES = {"wikitext": ("wikitext", "wikitext-2-raw-v1")}


@dataclass
class TokenizedCorpus:
    name: str
    eval_ids: torch.Tensor       # 1-D token ids; evaluation windows start at 0
    calib_ids: torch.Tensor      # 1-D token ids; calibration samples start at 0
    calib_source: str            # how calib_ids relates to eval_ids, for the report


def eval_defaults(corpus: str) -> tuple[int, int | None]:
    return EVAL_DEFAULTS.get(corpus, LOCAL_DEFAULTS)


def window_shape(corpus: str, seq_len: int | None, count: int | None) -> tuple[int, int | None]:
    """(tokens per window, window count; None: every full window): unset values are the
    corpus's protocol defaults."""
    default_len, default_count = eval_defaults(corpus)
    return seq_len or default_len, default_count if count is None else count


def load_corpus(name: str, tokenizer, vocab_size: int | None = None) -> TokenizedCorpus:
    """`vocab_size` (the model's): the range of the `random` corpus, and the bound every other
    corpus's token ids are checked against."""
    if name == "random":
        return random_corpus(vocab_size or len(tokenizer))
    eval_text, calib_text = _texts(name)
    eval_ids = _tokenize(tokenizer, eval_text)
    if calib_text is None:
        # One stream: calibration from the second half, evaluation from the start (PROTOCOL.md).
        half = len(eval_ids) // 2
        corpus = TokenizedCorpus(name, eval_ids[:half], eval_ids[half:],
                                 "second half of the stream")
    else:
        corpus = TokenizedCorpus(name, eval_ids, _tokenize(tokenizer, calib_text), "train split")
    top = max((int(ids.max()) for ids in (corpus.eval_ids, corpus.calib_ids) if ids.numel()),
              default=-1)
    if vocab_size is not None and top >= vocab_size:
        # An index error inside the embedding (a device-side assert on CUDA) otherwise.
        raise UserError(f"corpus {name!r} tokenizes to id {top}, but the model has {vocab_size} "
                        "embeddings: its tokenizer does not match the model")
    return corpus


def random_corpus(vocab_size: int) -> TokenizedCorpus:
    """Token ids uniform in [1, vocab_size), fixed seeds; calibration and evaluation differ."""
    ids = [torch.randint(1, vocab_size, (count,), generator=torch.Generator().manual_seed(seed))
           for count, seed in zip(RANDOM_TOKENS, RANDOM_SEEDS)]
    return TokenizedCorpus("random", ids[0], ids[1],
                           f"uniform random token ids (seed {RANDOM_SEEDS[1]})")


def eval_windows(corpus: TokenizedCorpus, seq_len: int, count: int | None) -> torch.Tensor:
    """The first `count` non-overlapping windows of `seq_len` tokens: [count, seq_len]."""
    available = len(corpus.eval_ids) // seq_len
    count = available if count is None else count
    if count < 1 or count > available:
        raise UserError(f"corpus {corpus.name!r} has {available} evaluation windows of {seq_len} "
                        f"tokens; asked for {count}")
    return corpus.eval_ids[: count * seq_len].view(count, seq_len)


def calibration_samples(corpus: TokenizedCorpus, count: int, seq_len: int) -> torch.Tensor:
    """`count` consecutive non-overlapping samples of `seq_len` tokens: [count, seq_len]."""
    if count * seq_len > len(corpus.calib_ids):
        raise UserError(f"corpus {corpus.name!r} has {len(corpus.calib_ids)} calibration tokens; "
                        f"{count} x {seq_len} asked")
    return corpus.calib_ids[: count * seq_len].view(count, seq_len)


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)


def pydoc_text() -> str:
    """The `pydoc` corpus as PROTOCOL.md defines it: every topic of the English documentation
    that ships with Python, in sorted key order, separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _texts(name: str) -> tuple[str, str | None]:
    """(evaluation text, calibration text or None when both come from one stream)."""
    if name == "pydoc":
        return pydoc_text(), None
    if os.path.isfile(name):
        return _local_text(name), None
    if os.path.isdir(name):
        raise UserError(f"corpus {name!r} is a folder; allowed: {CORPUS_HELP}")
    if name.endswith((".txt", ".jsonl", ".json", ".parquet")) or name.startswith((".", "/")):
        raise UserError(f"corpus file {name!r} does not exist; allowed: {CORPUS_HELP}")
    return _hub_texts(name)


def _local_text(path: str) -> str:
    ext = os.path.splitext(path)[1]
    if ext not in (".txt", ".jsonl", ".json", ".parquet"):
        raise UserError(f"corpus file {path!r} has an unsupported extension; allowed: "
                        ".txt, .jsonl, .json, .parquet")
    with user_error_on(f"corpus file {path!r} is not valid {ext[1:]}", OSError, ValueError):
        if ext == ".txt":  # UnicodeDecodeError is a ValueError
            with open(path, encoding="utf-8") as handle:
                return handle.read()
        if ext == ".parquet":
            import pyarrow.parquet as pq  # datasets' own dependency

            table = pq.read_table(path)
            columns = table.column_names
            texts = table.column("text").to_pylist() if "text" in columns else None
        else:
            records = _json_records(path)
            columns = sorted({key for record in records for key in record})
            texts = [record.get("text") for record in records] if "text" in columns else None
    return _joined_text(f"corpus file {path!r}", columns, texts)


def _joined_text(what: str, columns: list[str], texts: list | None, split: str = "") -> str:
    """A 'text' column (None: there is none) joined as PROTOCOL.md says, or a one-line error
    naming the columns instead of a KeyError traceback. `split`: a hub dataset's split."""
    if texts is None:
        where = f" in its {split} split" if split else ""
        raise UserError(f"{what} has no 'text' column{where}; columns: {', '.join(columns)}")
    if not all(isinstance(text, str) for text in texts):
        of = f" of its {split} split" if split else ""
        raise UserError(f"{what}: every 'text' value{of} must be a string")
    return "\n\n".join(texts)


def _json_records(path: str) -> list[dict]:
    """A JSON list of objects, or JSON lines (one object per line)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        data = json.loads(text)
        records = data if isinstance(data, list) else [data]
    except ValueError:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not all(isinstance(record, dict) for record in records):
        raise ValueError("expected objects with a 'text' field")
    return records


def _hub_texts(name: str) -> tuple[str, str]:
    import datasets

    path, config = HUB_ALIASES.get(name, (name.split(":")[0], (name.split(":") + [None])[1]))
    if not hub_reachable():
        raise UserError(f"corpus {name!r} is a hub dataset and the Hugging Face hub is not "
                        f"reachable; allowed offline: pydoc, a local .txt/.jsonl/.parquet file")
    try:
        test = datasets.load_dataset(path, config, split="test")
        train = datasets.load_dataset(path, config, split="train")
    except Exception as exc:  # datasets raises many types for an unreachable hub
        raise UserError(f"could not load corpus {name!r} from the hub (is it reachable?): "
                        f"{first_line(exc)}; allowed: {CORPUS_HELP}") from exc
    return _split_text(name, test, "test"), _split_text(name, train, "train")


def _split_text(name: str, split, split_name: str) -> str:
    columns = split.column_names
    return _joined_text(f"hub dataset {name!r}", columns,
                        split["text"] if "text" in columns else None, split_name)
