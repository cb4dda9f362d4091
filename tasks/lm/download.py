"""WikiText from the Hugging Face Hub, written as the release's ``wiki.{train,valid,test}.tokens``.

The release's own link (Merity et al., 2016) is gone, so the word-level corpora come from the
Hub's copy, ``Salesforce/wikitext`` (configs ``wikitext-103-v1`` and ``wikitext-2-v1``),
through its own client, the ``datasets`` library (``pip install -e '.[lm]'``). Its rows are
the release's lines: a line with text keeps its trailing newline, a blank line (" " in the
release) is an empty row; the split called ``validation`` there is ``valid`` here.

What is written is checked against the release's published figures before it is put in place,
counted as the language-modeling code of the field counts them (and as ``tasks/lm/data.py``
reads them): every whitespace-separated word of every line plus one ``<eos>`` per line, blank
lines included; the vocabulary is the training split's distinct words plus ``<eos>``
(``<unk>`` is a word of the release). This convention reproduces Merity et al.'s Table 1
exactly on the release (WikiText-2 valid: 213,886 words + 3,760 lines = 217,646).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from deqlab.runner.files import sync_folder, write_text

HUB_SOURCE = "Salesforce/wikitext"
HUB_CONFIGS = {"wikitext103": "wikitext-103-v1", "wikitext2": "wikitext-2-v1"}
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}

# Merity et al. (2016), "Pointer Sentinel Mixture Models", Table 1: tokens per split and the
# vocabulary (the DEQ reference code's n_token for WikiText-103 is 267,735 too).
PUBLISHED = {
    "wikitext103": {"train": 103_227_021, "valid": 217_646, "test": 245_569, "vocab": 267_735},
    "wikitext2": {"train": 2_088_628, "valid": 217_646, "test": 245_569, "vocab": 33_278},
}


def count(lines: Any) -> tuple[int, set[str]]:
    """Tokens (words + one <eos> per line) and distinct words of an iterable of lines."""
    tokens, words = 0, set()
    for line in lines:
        parts = line.split()
        tokens += len(parts) + 1
        words.update(parts)
    return tokens, words


def download_wikitext(
    root: Path,
    corpus: str,
    files: dict[str, Path],
    source: str = HUB_SOURCE,
    expected: dict[str, int] | None = None,
) -> bool:
    """Write the corpus's ``files`` from the Hub (or from ``source``, any path or repository
    ``datasets.load_dataset`` reads in the Hub's layout) unless they are all present; returns
    whether anything was written. ``expected``: the figures to check (default: published)."""
    if all(p.is_file() for p in files.values()):
        return False
    if corpus not in HUB_CONFIGS:
        raise ValueError(
            f"{corpus}: no Hub download (only {', '.join(HUB_CONFIGS)}); put the release's "
            f"files {', '.join(p.name for p in files.values())} under {root.resolve()}"
        )
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"task.datamodule.download=true fetches {corpus} with the Hugging Face `datasets` "
            "library, which is not installed: pip install -e '.[lm]' (or pip install datasets), "
            f"or put the release's {', '.join(p.name for p in files.values())} under "
            f"{root.resolve()} yourself"
        ) from None
    expected = expected or PUBLISHED[corpus]
    root.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    measured: dict[str, int] = {}
    # The library's cache lives beside the data and goes once the files are written: the
    # release files are what is kept (and no stale cache of another copy can be read back).
    cache = tempfile.TemporaryDirectory(prefix=".hub-cache-", dir=root)
    try:
        for split, path in files.items():
            try:
                rows = datasets.load_dataset(
                    source, HUB_CONFIGS[corpus], split=HUB_SPLITS[split], cache_dir=cache.name
                )
            except Exception as e:  # no network, no such repository or split
                raise RuntimeError(
                    f"{corpus}: cannot read split {HUB_SPLITS[split]!r} of {source} "
                    f"({HUB_CONFIGS[corpus]}): {type(e).__name__}: {e}. Without network, put "
                    f"the release's {path.name} under {root.resolve()}"
                ) from e
            lines = [text if text else " \n" for text in rows["text"]]
            tokens, words = count(lines)
            measured[split] = tokens
            if split == "train":
                measured["vocab"] = len(words) + 1  # + <eos>
            # a temporary name, renamed once every split is checked: an interrupted download
            # never leaves a file that looks complete
            tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
            written[split] = tmp
            write_text(tmp, "".join(lines))
        wrong = {k: (measured[k], v) for k, v in expected.items() if measured.get(k) != v}
        if wrong:
            detail = "; ".join(
                f"{k}: {got:,} (expected {want:,})" for k, (got, want) in wrong.items()
            )
            raise ValueError(
                f"{corpus} from {source} does not match the release's figures ({detail}); "
                "nothing was written. A different revision or configuration of the dataset "
                "(e.g. the raw-v1 one) would give other counts."
            )
        for split, tmp in written.items():  # every file checked: now put them in place
            os.replace(tmp, files[split])
        for folder in {p.parent for p in files.values()}:  # the renames, durable
            sync_folder(folder)
    finally:
        for tmp in written.values():
            tmp.unlink(missing_ok=True)
        cache.cleanup()
    return True
