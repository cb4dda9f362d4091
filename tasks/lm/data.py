"""Word-level corpora: vocabulary, encoded splits cached beside the data, ordered BPTT batches.

Files under ``data_dir/<folder>`` (the standard releases):

    wikitext103 -> wikitext-103/wiki.{train,valid,test}.tokens
    wikitext2   -> wikitext-2/wiki.{train,valid,test}.tokens
    ptb         -> ptb/ptb.{train,valid,test}.txt

Each line is split on whitespace and ends with ``<eos>``. The vocabulary comes from the
training split alone, sorted by frequency (adaptive softmax cutoffs rely on that order), with
its counts; words unseen in training map to ``<unk>``. Encoding streams the files line by line
into int32 arrays (WikiText-103's 103M tokens stay well within a few GB), and the result is
cached as ``deqlab_cache.pt`` (plain tensors and lists: ``torch.load(weights_only=True)``),
rebuilt when a source file changes.
"""

from __future__ import annotations

import time
from array import array
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from deqlab.runner.data import (
    ResumableDataModule,
    ResumableLoader,
    per_process,
    rank_and_world,
)
from deqlab.runner.files import load_cache, save_atomic
from deqlab.runner.refusal import InputNotFound

from .download import HUB_CONFIGS, HUB_SOURCE, download_wikitext

CORPORA = {
    "wikitext103": ("wikitext-103", "wiki.{}.tokens"),
    "wikitext2": ("wikitext-2", "wiki.{}.tokens"),
    "ptb": ("ptb", "ptb.{}.txt"),
}
SPLITS = ("train", "valid", "test")
EOS, UNK = "<eos>", "<unk>"
CACHE = "deqlab_cache.pt"


def corpus_paths(data_dir: str | Path, corpus: str) -> dict[str, Path]:
    """Where the corpus's split files live under ``data_dir``."""
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; known: {', '.join(CORPORA)}")
    folder, pattern = CORPORA[corpus]
    return {s: Path(data_dir) / folder / pattern.format(s) for s in SPLITS}


def corpus_files(data_dir: str | Path, corpus: str) -> dict[str, Path]:
    """The corpus's split files, which must exist."""
    files = corpus_paths(data_dir, corpus)
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        root = files["train"].parent
        get = (
            "get them with task.datamodule.download=true (the Hugging Face Hub's copy; "
            "pip install -e '.[lm]'), or put the release's files there"
            if corpus in HUB_CONFIGS
            else "put the release's files there (no download: the Hub has no copy)"
        )
        raise InputNotFound(
            f"{corpus}: missing {', '.join(missing)}. Expected the standard release's "
            f"{', '.join(p.name for p in files.values())} under {root.resolve()}: {get}. "
            "(WikiText: Merity et al.'s word-level release; PTB: Mikolov's ptb.*.txt.)"
        )
    return files


def _tokens(path: Path) -> Iterator[list[str]]:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}, line {number}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                    "the corpus files must be the release's UTF-8 text"
                ) from e
            yield [*line.split(), EOS]


class Corpus:
    """Vocabulary (``itos``, ``counts``) and the encoded splits (int64 tensors)."""

    def __init__(self, itos: list[str], counts: list[int], splits: dict[str, Tensor]):
        self.itos, self.counts, self.splits = itos, counts, splits
        self.stoi = {w: i for i, w in enumerate(itos)}

    def __len__(self) -> int:
        return len(self.itos)

    @classmethod
    def build(cls, files: dict[str, Path]) -> Corpus:
        counts: Counter[str] = Counter()
        for toks in _tokens(files["train"]):
            counts.update(toks)
        counts.setdefault(UNK, 0)
        ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        itos = [w for w, _ in ordered]
        stoi = {w: i for i, w in enumerate(itos)}
        unk = stoi[UNK]
        splits = {}
        for split, path in files.items():
            ids = array("i")
            for toks in _tokens(path):
                ids.extend(stoi.get(t, unk) for t in toks)
            if not ids:
                raise ValueError(f"{path}: the {split} split holds no text")
            splits[split] = torch.frombuffer(ids, dtype=torch.int32).clone()
        return cls(itos, [c for _, c in ordered], splits)

    @classmethod
    def load(cls, data_dir: str | Path, corpus: str) -> Corpus:
        """The cached corpus, (re)built when missing or when a source file changed."""
        files = corpus_files(data_dir, corpus)
        key = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files.values()]
        cache = files["train"].parent / CACHE
        saved = load_cache(cache)
        if saved is not None and saved.get("key") == key:
            return cls(saved["itos"], saved["counts"], saved["splits"])
        t0 = time.perf_counter()
        corpus_ = cls.build(files)
        n = sum(len(t) for t in corpus_.splits.values())
        seconds = time.perf_counter() - t0
        print(
            f"{corpus}: encoded {n:,} tokens in {seconds:.1f}s ({seconds / n * 1e6:.2f}s per million)"
        )
        save_atomic(
            {"key": key, "itos": corpus_.itos, "counts": corpus_.counts, "splits": corpus_.splits},
            cache,
        )
        return corpus_


class BPTTStream(IterableDataset):
    """Ordered truncated-BPTT batches: the split is cut into ``batch_size`` equal streams (the
    global batch, as the reference's LMOrderedIterator cuts it), each of the ``world`` ranks
    reads its own ``batch_size / world`` contiguous ones (the reference's DataParallel split),
    ``tgt_len`` tokens at a time, so segment k+1 of each stream continues segment k (the model
    carries memory).

    Yields ``(x, y)`` of shape (batch, <= tgt_len): y is x shifted by one token. The last
    segment may be shorter, so every token of the streams is read exactly once. ``skip(k)``
    makes the next pass start at segment k (a resumed epoch). With ``indexed`` (``init=cached``)
    it yields ``(x, y, keys)``: row r of segment k is the same tokens every epoch, keyed
    k * batch_size + r (global rows); the shorter last segment is keyed -1, never cached.
    """

    def __init__(self, data: Tensor, batch_size: int, tgt_len: int, name: str = "split"):
        super().__init__()
        self.data, self.batch_size, self.tgt_len, self.name = data, batch_size, tgt_len, name
        self._skip = 0
        self.indexed = False

    def skip(self, segments: int) -> None:
        self._skip = segments

    def streams(self) -> Tensor:
        rank = rank_and_world()[0]
        local = per_process(self.batch_size, f"the {self.name} batch size")
        n = len(self.data) // self.batch_size
        if n < 2:
            raise ValueError(
                f"the {self.name} split ({len(self.data)} tokens) is too short for "
                f"{self.batch_size} streams of at least 2 tokens: lower its batch size"
            )
        all_streams = self.data[: n * self.batch_size].view(self.batch_size, n)
        return all_streams[rank * local : (rank + 1) * local].long()

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        s = self.streams()
        start, self._skip = self._skip * self.tgt_len, 0
        rows = torch.arange(s.shape[0]) + rank_and_world()[0] * s.shape[0]
        for i in range(start, s.shape[1] - 1, self.tgt_len):
            j = min(i + self.tgt_len, s.shape[1] - 1)
            if not self.indexed:
                yield s[:, i:j], s[:, i + 1 : j + 1]
                continue
            keys = rows + (i // self.tgt_len) * self.batch_size
            keys = keys if j - i == self.tgt_len else torch.full_like(keys, -1)
            yield s[:, i:j], s[:, i + 1 : j + 1], keys

    def __len__(self) -> int:
        n = self.streams().shape[1] - 1
        return -(-n // self.tgt_len)


class LMDataModule(ResumableDataModule):
    """A word-level corpus as ordered BPTT batches. ``download`` fetches WikiText's files
    from the Hub when they are missing (tasks/lm/download.py), checked against
    ``expected_counts`` (default: the published figures) before they are put in place."""

    def __init__(
        self,
        data_dir: str = "data",
        corpus: str = "ptb",
        batch_size: int = 32,
        eval_batch_size: int = 10,
        tgt_len: int = 70,
        eval_tgt_len: int | None = None,
        download: bool = False,
        hub_source: str = HUB_SOURCE,
        expected_counts: dict[str, int] | None = None,
    ):
        super().__init__()
        self.data_dir, self.corpus_name = data_dir, corpus
        self.download, self.hub_source, self.expected_counts = download, hub_source, expected_counts
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.tgt_len, self.eval_tgt_len = tgt_len, eval_tgt_len or tgt_len
        self.corpus: Corpus | None = None

    def prepare_data(self) -> None:  # on one process: fetch the files, build the cache
        if self.download:
            files = corpus_paths(self.data_dir, self.corpus_name)
            download_wikitext(
                files["train"].parent,
                self.corpus_name,
                files,
                self.hub_source,
                self.expected_counts,
            )
        Corpus.load(self.data_dir, self.corpus_name)

    def setup(self, stage: str | None = None) -> None:
        if self.corpus is None:
            self.corpus = Corpus.load(self.data_dir, self.corpus_name)
            # a split too short for its batch fails now, not after an epoch of training
            self._stream("train", self.batch_size, self.tgt_len).streams()
            for split in ("valid", "test"):
                self._stream(split, self.eval_batch_size, self.eval_tgt_len).streams()

    def _stream(self, split: str, batch: int, tgt_len: int) -> BPTTStream:
        assert self.corpus is not None
        return BPTTStream(self.corpus.splits[split], batch, tgt_len, name=split)

    def _loader(self, split: str, batch: int, tgt_len: int) -> DataLoader:
        return DataLoader(self._stream(split, batch, tgt_len), batch_size=None)

    def make_train_loader(self) -> ResumableLoader:
        stream = self._stream("train", self.batch_size, self.tgt_len)
        stream.indexed = self.indexed
        order = {"tokens": len(stream.data), "batch": self.batch_size, "tgt_len": self.tgt_len}
        return ResumableLoader(
            stream, batch_size=None, order={**order, "processes": rank_and_world()[1]}
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", self.eval_batch_size, self.eval_tgt_len)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, self.eval_tgt_len)
