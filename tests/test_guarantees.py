"""What README's "Guarantees" section promises, each tested under its real condition: runs
that never mix, values checked before any work, damaged files named, checkpoints checked on
load, evaluation subsets that see every class. (Resume after SIGKILL: tests/test_resume.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from deqlab.runner.checkpoint import CheckpointError
from deqlab.runner.config import ConfigError
from deqlab.runner.data import EpochShuffle, ResumableLoader
from deqlab.runner.main import run
from deqlab.tasks.cifar.data import CifarDataModule, load_split
from deqlab.tasks.lm import data as lm_data
from deqlab.tasks.lm.data import Corpus, LMDataModule

from .helpers import wandb_records
from .helpers.runs import (
    CLI_ENV,
    ROOT,
    TINY,
    TINY_LM,
    compose_cfg,
    run_cli,
    write_cifar_folder,
    write_ptb_folder,
)
from .test_lm import write_corpus

NO_DATA = "paths.data_dir=/nonexistent/deqlab-data"  # any attempt to read data would fail


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_cifar_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def cifar_ckpt(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cifar_run")
    run(compose_cfg([f"paths.data_dir={data_dir}", *TINY], out))
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def ptb(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny corpus and the last checkpoint of a model trained on it."""
    root = write_ptb_folder(tmp_path_factory.mktemp("ptb_data"), lines=80)
    out = tmp_path_factory.mktemp("ptb_run")
    run(compose_cfg([*TINY_LM, f"paths.data_dir={root}"], out))
    return root, out / "checkpoints" / "last.ckpt"


# -- resume -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "test"])
def test_ckpt_last_without_a_checkpoint_fails_before_any_work(mode, tmp_path):
    cfg = compose_cfg([*TINY, NO_DATA, f"mode={mode}", "ckpt_path=last"], tmp_path / "fresh")
    with pytest.raises(CheckpointError, match=r"ckpt_path=last: there is no .*last\.ckpt"):
        run(cfg)


def test_last_checkpoint_follows_every_validation_improved_or_not(data_dir, tmp_path):
    # lr=0: val/acc stays where it was at the first validation (step 2), so best.ckpt stays
    # there, while last.ckpt must follow the second validation (step 4) all the same.
    args = [
        f"paths.data_dir={data_dir}",
        *TINY,
        "optim.optimizer.lr=0",
        "+trainer.val_check_interval=2",
    ]
    run(compose_cfg(args, tmp_path))

    def step(name: str) -> int:
        return torch.load(tmp_path / "checkpoints" / name, weights_only=True)["global_step"]

    assert step("best.ckpt") == 2 and step("last.ckpt") == 4


def test_data_order_is_sharded_seeded_and_resumable(monkeypatch):
    orders = []
    for rank in (0, 1):
        monkeypatch.setattr("deqlab.runner.data.rank_and_world", lambda rank=rank: (rank, 2))
        sampler = EpochShuffle(11, seed=3)
        sampler.set_epoch(4)
        orders.append(list(sampler))
        assert len(sampler) == 5
    assert not set(orders[0]) & set(orders[1])  # each rank its own samples, 10 of 11 in all
    sampler.skip(2)
    assert list(sampler) == orders[1][2:] and list(sampler) == orders[1]  # skip: next pass only
    sampler.set_epoch(5)
    assert list(sampler) != orders[1]

    monkeypatch.undo()

    class Counted(list):  # a dataset that counts the samples it loads
        loaded = 0

        def __getitem__(self, i):
            Counted.loaded += 1
            return super().__getitem__(i)

    data = Counted(range(10))
    loader = ResumableLoader(data, batch_size=3, sampler=EpochShuffle(10, 0), order={"n": 10})
    full = [b.tolist() for b in loader]
    loader.load_state_dict({"batches": 2, "order": {"n": 10}})
    Counted.loaded = 0
    assert [b.tolist() for b in loader] == full[2:] and loader.state_dict()["batches"] == 4
    assert Counted.loaded == 4  # the 6 samples of the 2 batches already trained on: never loaded
    with pytest.raises(ValueError, match="data order"):
        loader.load_state_dict({"batches": 1, "order": {"n": 12}})


# -- runs never mix ---------------------------------------------------------------------------


@pytest.mark.slow
def test_runs_started_in_the_same_second_get_their_own_folders(data_dir, tmp_path):
    args = [sys.executable, "-m", "deqlab", f"paths.data_dir={data_dir}", *TINY]
    env = {**__import__("os").environ, **CLI_ENV}
    procs = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL) for _ in "ab"]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 2
    for folder in runs:
        assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == [
            "best.ckpt",
            "last.ckpt",
        ]
        assert [p.name for p in (folder / "csv").iterdir()] == ["version_0"]


@pytest.mark.slow
def test_sweep_with_failing_jobs_keeps_every_job_to_itself(data_dir, tmp_path):
    """Jobs 0 and 1 are rejected (tol < 0), job 2 fails after its W&B run started (no data),
    job 3 trains: the rejected jobs leave no folder, job 2's W&B run ends with exit code 1 and
    job 3 gets a run of its own; the sweep exits non-zero."""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [
            "-m",
            "solver.tol=-1,0.01",
            f"paths.data_dir=/nonexistent/deqlab-data,{data_dir}",
            "logger=wandb",
            f"hydra.sweep.dir={sweep}",
            *TINY,
        ],
        tmp_path,
        check=False,
    )
    assert proc.returncode != 0 and "solver.tol must be > 0" in proc.stderr
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["2_solver.tol=0.01", "3_solver.tol=0.01"]  # 0 and 1 left nothing
    records = []
    for job in jobs:
        (run_dir,) = (sweep / job / "wandb").glob("offline-run-*")
        records.append(wandb_records.finished_run(run_dir))
    failed, trained = records
    assert wandb_records.exit_code(failed) == 1 and wandb_records.exit_code(trained) == 0
    paths = [json.loads(wandb_records.config(r)["paths"]) for r in (failed, trained)]
    assert paths[0]["data_dir"] == "/nonexistent/deqlab-data"
    assert paths[1]["data_dir"] == str(data_dir)
    assert "val/acc" in wandb_records.logged_keys(trained)
    assert "val/acc" not in wandb_records.logged_keys(failed)


# -- bad input fails early and by name ------------------------------------------------------


@pytest.mark.parametrize(
    "override,message",
    [
        ("solver.tol=-1", "solver.tol must be > 0"),
        ("grad.tol=0", "grad.tol must be > 0"),
        ("grad.tau=2", "grad.tau must lie in"),
        ("jac_reg.freq=2", "jac_reg.freq is a probability"),
        ("optim.schedule=cosin", "optim.schedule must be"),
        ("core.n_states=0", "core.n_states must be >= 1"),
        ("+task.module.fit.jiter=1", "unknown task.module.fit key 'jiter'"),
        ("+solver.max_itr=5", "unknown solver key 'max_itr'"),
        ("mode=test", "mode=test evaluates a checkpoint"),
    ],
)
def test_invalid_values_fail_before_any_data_is_read(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        run(compose_cfg([*TINY, NO_DATA, override], tmp_path / "run"))


def test_root_keys_are_typed_at_composition(tmp_path):
    for override, allowed in (
        ("mode=evaluate", "[train, test, eval]"),
        ("test_ckpt=newest", "[best, last]"),
    ):
        with pytest.raises(Exception, match=f"Error merging override {override}") as failure:
            compose_cfg([override], tmp_path)
        assert f"expected one of {allowed}" in str(failure.value.__cause__)


def test_no_model_data_or_logger_is_built_before_the_config_is_checked(tmp_path, monkeypatch):
    import deqlab.runner.main as entry

    def built(*args, **kwargs):
        raise AssertionError("something was built before the config was checked")

    monkeypatch.setattr(entry, "instantiate", built)
    with pytest.raises(ConfigError, match=r"solver\.tol"):
        run(compose_cfg([*TINY, NO_DATA, "solver.tol=-1"], tmp_path / "run"))


def test_rejected_config_leaves_no_run_folder(tmp_path):
    out = tmp_path / "run"
    proc = run_cli([*TINY, NO_DATA, "solver.tol=-1", f"hydra.run.dir={out}"], tmp_path, check=False)
    assert proc.returncode == 1
    # the message alone: no traceback, no Hydra "Error executing job" around it
    assert proc.stderr.strip().splitlines() == [
        "deqlab: solver.tol must be > 0 (or null: exactly max_iter steps), got -1.0"
    ], proc.stderr
    assert not out.exists()


def test_damaged_image_is_named(tmp_path):
    write_cifar_folder(tmp_path, train_per_class=2, test_per_class=1)
    png = next((tmp_path / "cifar10" / "train" / "cat").glob("*.png"))
    jpeg = png.with_suffix(".jpg")
    Image.open(png).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[:400])  # cut short, as an interrupted copy leaves it
    with pytest.raises(ValueError, match=rf"{jpeg}: cannot decode this image"):
        load_split(tmp_path, train=True)


def test_corpus_that_is_not_utf8_is_named(tmp_path):
    write_corpus(tmp_path)
    valid = tmp_path / "ptb" / "ptb.valid.txt"
    valid.write_bytes(valid.read_bytes() + b"caf\xe9 au lait\n")  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=rf"{valid}, line 2: not valid UTF-8"):
        Corpus.load(tmp_path, "ptb")


def test_empty_split_is_named(tmp_path):
    write_corpus(tmp_path)
    (tmp_path / "ptb" / "ptb.test.txt").write_text("")
    with pytest.raises(ValueError, match=r"ptb\.test\.txt: the test split holds no text"):
        Corpus.load(tmp_path, "ptb")


def test_split_too_short_for_its_batch_is_named_at_setup(tmp_path):
    write_ptb_folder(tmp_path, lines=80)
    dm = LMDataModule(str(tmp_path), "ptb", batch_size=4, eval_batch_size=400, tgt_len=8)
    with pytest.raises(ValueError, match=r"the valid split .* too short for 400 streams"):
        dm.setup("fit")


def _damage(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("task", ["cifar", "lm"])
def test_damaged_cache_is_rebuilt_with_a_warning_that_names_it(task, tmp_path):
    if task == "cifar":
        write_cifar_folder(tmp_path, train_per_class=2, test_per_class=1)
        cache, load = tmp_path / "cifar10" / "test.decoded.pt", lambda: load_split(tmp_path, False)
    else:
        write_corpus(tmp_path)
        cache, load = tmp_path / "ptb" / lm_data.CACHE, lambda: Corpus.load(tmp_path, "ptb").splits
    first = load()
    _damage(cache)
    with pytest.warns(UserWarning, match=rf"cache {cache} is unreadable"):
        again = load()
    assert str(first) == str(again)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rewritten whole: read without complaint
        load()


def test_cache_is_never_left_half_written(tmp_path, monkeypatch):
    write_cifar_folder(tmp_path, train_per_class=2, test_per_class=1)

    def killed_while_writing(obj, fh):
        fh.write(b"half a cache")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        load_split(tmp_path, train=False)
    assert list((tmp_path / "cifar10").glob("*.pt")) == []  # neither the cache nor a temporary
    assert not list((tmp_path / "cifar10").glob(".*"))


def test_checkpoint_is_never_left_half_written(tmp_path, monkeypatch):
    """A write interrupted half-way leaves the previous checkpoint whole and no temporary."""
    from deqlab.runner.checkpoint import AtomicCheckpointIO

    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(3)}}, path)

    def killed_while_writing(obj, fh, *args, **kwargs):
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_training_time_is_carried_across_a_resume():
    """train/elapsed_s counts the training time of every launch: the checkpoint carries it,
    and a resumed run continues from it rather than from zero."""
    import time

    from deqlab.runner.module import DEQLitModule

    first = DEQLitModule(None)
    first.clock.fit_t0 = time.perf_counter() - 100.0  # 100 s of training so far
    checkpoint: dict = {}
    first.on_save_checkpoint(checkpoint)
    resumed = DEQLitModule(None)
    resumed.on_load_checkpoint({**checkpoint, "state_dict": {}})
    resumed.on_fit_start()  # a resumed run keeps the restored start
    elapsed = time.perf_counter() - resumed.clock.fit_t0
    assert 100.0 <= elapsed < 105.0


# -- checkpoints are checked on load ----------------------------------------------------------


def test_checkpoint_of_another_network_is_refused_in_one_line(data_dir, cifar_ckpt, tmp_path):
    wider = [f"paths.data_dir={data_dir}", *TINY, "mode=test", f"ckpt_path={cifar_ckpt}"]
    with pytest.raises(CheckpointError, match=r"network differs .* shape .* in the checkpoint"):
        run(compose_cfg([*wider, "task.module.net.channels=16"], tmp_path / "a"))
    with pytest.raises(CheckpointError, match="network differs"):
        run(compose_cfg([*wider, "norm=weight_norm"], tmp_path / "b"))


def test_checkpoint_of_another_task_is_refused(ptb, data_dir, tmp_path):
    _root, lm_ckpt = ptb
    cfg = compose_cfg(
        [f"paths.data_dir={data_dir}", *TINY, "mode=test", f"ckpt_path={lm_ckpt}"], tmp_path
    )
    with pytest.raises(
        CheckpointError, match=r"written by deqlab\.tasks\.lm\.module\.LMModule, this run"
    ):
        run(cfg)


def test_lm_checkpoint_on_a_reordered_vocabulary_is_refused(ptb, tmp_path):
    root, ckpt = ptb
    moved = tmp_path / "data"
    (moved / "ptb").mkdir(parents=True)
    for split in ("train", "valid", "test"):  # same words, w0 and w1 swapped: other order
        text = (root / "ptb" / f"ptb.{split}.txt").read_text()
        text = text.replace("w0 ", "@ ").replace("w1 ", "w0 ").replace("@ ", "w1 ")
        (moved / "ptb" / f"ptb.{split}.txt").write_text(text)
    assert Corpus.load(moved, "ptb").itos != Corpus.load(root, "ptb").itos
    cfg = compose_cfg(
        [*TINY_LM, f"paths.data_dir={moved}", "mode=test", f"ckpt_path={ckpt}"], tmp_path
    )
    with pytest.raises(
        ValueError, match=r"trained on a vocabulary of 32 words .* this corpus has 32"
    ):
        run(cfg)


def test_damaged_checkpoint_is_named_without_unsafe_advice(cifar_ckpt, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(cifar_ckpt.read_bytes()[:5000])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "object": ROOT}, foreign)  # a pickled Path: not plain data
    for path in (truncated, foreign):
        cfg = compose_cfg([*TINY, NO_DATA, "mode=test", f"ckpt_path={path}"], tmp_path / "x")
        with pytest.raises(CheckpointError, match=f"{path} is not a readable checkpoint") as err:
            run(cfg)
        assert "weights_only" not in str(err.value)


# -- evaluation that means something ----------------------------------------------------------


def test_subsets_are_stratified_and_every_prefix_sees_all_classes(tmp_path):
    write_cifar_folder(tmp_path, train_per_class=20, test_per_class=10)
    dm = CifarDataModule(str(tmp_path), batch_size=4, eval_batch_size=10, val_size=10, subset=60)
    dm.setup()
    counts = lambda s: torch.bincount(s.labels, minlength=10).tolist()
    assert counts(dm.val_set) == [1] * 10  # 10 of the 60: one image of each class
    assert counts(dm.train_set) == [5] * 10
    assert counts(dm.test_set) == [6] * 10  # subset=60 test images of the 100
    for loader in (dm.val_dataloader(), dm.test_dataloader()):  # limit_*_batches=1
        _x, y = next(iter(loader))
        assert sorted(y.tolist()) == list(range(10))
    other = CifarDataModule(str(tmp_path), batch_size=4, val_size=10, subset=60, seed=1)
    other.setup()
    assert not torch.equal(other.test_set.images, dm.test_set.images)  # seeded


@pytest.mark.parametrize("switch", ["solver.capture", "grad.capture"])
def test_compile_and_a_captured_solve_are_refused_together(switch, tmp_path):
    from deqlab.runner.config import ConfigError, compose, validate

    with pytest.raises(ConfigError, match=f"compile=true and {switch}=true both compile"):
        validate(compose(["compile=true", f"{switch}=true"], tmp_path))
    validate(compose([f"{switch}=true"], tmp_path))


def test_validating_on_the_test_split_must_test_the_last_checkpoint(tmp_path):
    from deqlab.runner.config import ConfigError, compose, validate

    cfg = compose(["experiment=cifar_tutorial", "test_ckpt=best"], tmp_path)
    with pytest.raises(ConfigError, match="set test_ckpt=last"):
        validate(cfg)
    validate(compose(["experiment=cifar_tutorial"], tmp_path))  # the recipe itself is valid


def test_val_size_zero_trains_on_every_image_and_validates_on_test(tmp_path):
    from deqlab.tasks.cifar.data import CifarDataModule

    write_cifar_folder(tmp_path, train_per_class=3, test_per_class=2)
    dm = CifarDataModule(str(tmp_path), batch_size=4, val_size=0)
    with pytest.warns(UserWarning, match="runs on the test split"):
        dm.setup()
    assert len(dm.train_set) == 30 and dm.val_set is dm.test_set and len(dm.test_set) == 20
