"""WikiText through `task.datamodule.download=true`, offline: a local copy of the Hugging Face
Hub repository in its exact layout (README config metadata, parquet shards of `text` rows)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deqlab.tasks.lm.data import Corpus, LMDataModule, corpus_paths
from deqlab.tasks.lm.download import PUBLISHED, count, download_wikitext

from .helpers.runs import TINY_LM, run_cli

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("datasets")

REAL_DATA = Path(os.environ.get("DEQLAB_DATA", "/nonexistent"))
HAS_WT2 = (REAL_DATA / "wikitext-2" / "wiki.valid.tokens").is_file()
HUB_SPLIT = {"train": "train", "valid": "validation", "test": "test"}


def hub_rows(text: str) -> list[str]:
    """A release file as the Hub's builder stores it: one row per line, the newline kept,
    blank lines as empty rows."""
    return [line + "\n" if line.strip() else "" for line in text.split("\n")[:-1]]


def write_hub_repo(root: Path, config: str, splits: dict[str, str], shards: int = 2) -> Path:
    """``root`` laid out as Salesforce/wikitext: ``<config>/<split>-0000i-of-0000n.parquet``
    and the README whose YAML names each config's data files."""
    for split, text in splits.items():
        rows = hub_rows(text)
        n = shards if split == "train" else 1
        per = -(-len(rows) // n)
        (root / config).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            table = pa.table({"text": pa.array(rows[i * per : (i + 1) * per], pa.string())})
            pq.write_table(table, root / config / f"{HUB_SPLIT[split]}-{i:05d}-of-{n:05d}.parquet")
    data_files = "\n".join(
        f"  - split: {s}\n    path: {config}/{s}-*" for s in ("test", "train", "validation")
    )
    (root / "README.md").write_text(
        f"---\nconfigs:\n- config_name: {config}\n  data_files:\n{data_files}\n---\n"
    )
    return root


def lines(words: int, seed: int) -> str:
    """Release-like text: headings, blank lines (a single space), sentences with <unk>."""
    import random

    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(40)] + ["<unk>", "@-@", ","]
    out = []
    for k in range(words // 10):
        out.append(" " if k % 3 else f" = Heading {k} = ")
        out.append(" " + " ".join(rng.choice(vocab) for _ in range(10)) + " ")
    return "\n".join(out) + "\n"


def fixture_counts(splits: dict[str, str]) -> dict[str, int]:
    counts = {s: count(t.split("\n")[:-1])[0] for s, t in splits.items()}
    counts["vocab"] = len(count(splits["train"].split("\n")[:-1])[1]) + 1
    return counts


def test_download_writes_the_release_files_checked_and_only_once(tmp_path):
    splits = {"train": lines(3000, 0), "valid": lines(400, 1), "test": lines(400, 2)}
    hub = write_hub_repo(tmp_path / "hub", "wikitext-2-v1", splits)
    files = corpus_paths(tmp_path / "data", "wikitext2")
    root = files["train"].parent
    assert download_wikitext(root, "wikitext2", files, str(hub), fixture_counts(splits))
    for split, text in splits.items():  # byte for byte the release's files
        assert files[split].read_text(encoding="utf-8") == text
    assert not list(root.glob(".*"))  # no temporary file left behind
    corpus = Corpus.load(tmp_path / "data", "wikitext2")
    assert len(corpus) == fixture_counts(splits)["vocab"]
    assert {s: len(t) for s, t in corpus.splits.items()} == {
        s: fixture_counts(splits)[s] for s in splits
    }
    mtime = files["train"].stat().st_mtime_ns
    assert not download_wikitext(root, "wikitext2", files, str(hub / "nowhere"))  # in place
    assert files["train"].stat().st_mtime_ns == mtime


def test_a_corpus_that_differs_from_the_published_figures_is_refused(tmp_path):
    splits = {"train": lines(300, 0), "valid": lines(100, 1), "test": lines(100, 2)}
    hub = write_hub_repo(tmp_path / "hub", "wikitext-103-v1", splits)
    files = corpus_paths(tmp_path / "data", "wikitext103")
    with pytest.raises(ValueError, match=r"train: \d[\d,]* \(expected 103,227,021\)"):
        download_wikitext(files["train"].parent, "wikitext103", files, str(hub))
    assert not any(p.exists() for p in files.values())
    assert not list(files["train"].parent.glob(".*"))


def test_no_network_names_the_files_to_put_in_place(tmp_path):
    files = corpus_paths(tmp_path, "wikitext2")
    with pytest.raises(RuntimeError, match=r"cannot read split 'train'.*wiki\.train\.tokens under"):
        download_wikitext(files["train"].parent, "wikitext2", files, str(tmp_path / "no_repo"))
    with pytest.raises(FileNotFoundError, match=r"task\.datamodule\.download=true"):
        LMDataModule(str(tmp_path), "wikitext2").prepare_data()


@pytest.mark.skipif(not HAS_WT2, reason="set DEQLAB_DATA to a folder holding wikitext-2/")
def test_the_counting_convention_reproduces_the_published_figures(tmp_path):
    """The release's WikiText-2 valid and test files, through the Hub's row format and back,
    are byte-identical and count exactly Merity et al.'s 217,646 and 245,569 tokens."""
    real = {
        s: (REAL_DATA / "wikitext-2" / f"wiki.{s}.tokens").read_text(encoding="utf-8")
        for s in ("valid", "test")
    }
    splits = {"train": real["valid"], **real}  # no training split in the offline copy
    hub = write_hub_repo(tmp_path / "hub", "wikitext-2-v1", splits)
    files = corpus_paths(tmp_path / "data", "wikitext2")
    expected = {k: PUBLISHED["wikitext2"][k] for k in ("valid", "test")}
    download_wikitext(files["train"].parent, "wikitext2", files, str(hub), expected)
    for split in ("valid", "test"):
        assert files[split].read_text(encoding="utf-8") == real[split]


def test_runner_smoke_run_downloads_wikitext103_from_a_local_hub_copy(tmp_path):
    splits = {"train": lines(4000, 0), "valid": lines(600, 1), "test": lines(600, 2)}
    hub = write_hub_repo(tmp_path / "hub", "wikitext-103-v1", splits)
    counts = fixture_counts(splits)
    expected = "{" + ",".join(f"{k}:{v}" for k, v in counts.items()) + "}"
    args = [*TINY_LM, "task=wikitext103", "task.module.net.cutoffs=[]", "task.datamodule.batch_size=4",
            "task.datamodule.tgt_len=8", "task.module.mem_len=8", f"paths.data_dir={tmp_path / 'data'}",
            "task.datamodule.download=true", f"task.datamodule.hub_source={hub}",
            f"task.datamodule.expected_counts={expected}", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    proc = run_cli(args, tmp_path)
    assert "deqlab: train done" in proc.stdout
    assert (tmp_path / "data" / "wikitext-103" / "wiki.train.tokens").read_text() == splits["train"]
