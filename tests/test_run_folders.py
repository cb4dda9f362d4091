"""Nothing lost, nothing run that you did not write: a run folder keeps its data against a
second run, a second writer, a refused run, a requeue, a full disk and torn lines; opening one
(its config, its checkpoints) runs no code. Each promise under its real condition: real
processes, a real SIGKILL, a real full tmpfs, a real pickle payload."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from deqlab.runner import cluster
from deqlab.runner.checkpoint import CheckpointError, load_initial_weights, read_checkpoint
from deqlab.runner.cluster import RunFolderLockError, hold_run_folder, node_local_locks
from deqlab.runner.main import run
from deqlab.runner.trust import UntrustedTarget, check_targets

from .helpers.runs import (
    CLI_ENV,
    TINY,
    TINY_LM,
    compose_cfg,
    run_cli,
    wait_for,
    write_cifar_folder,
    write_ptb_folder,
)

NO_DATA = "paths.data_dir=/nonexistent/deqlab-data"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_cifar_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def first_run(data_dir, tmp_path_factory) -> Path:
    """A finished CLI run's folder (its records written as the CLI writes them)."""
    cwd = tmp_path_factory.mktemp("cwd")
    folder = cwd / "run"
    run_cli([*TINY, f"paths.data_dir={data_dir}", f"hydra.run.dir={folder}"], cwd)
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


# -- 1. a new run in an existing run folder ------------------------------------------------------


def test_a_new_run_in_a_folder_holding_a_run_is_refused_and_changes_no_byte(
    first_run, data_dir, tmp_path
):
    folder = copy_run(first_run, tmp_path / "run")
    before = snapshot(folder)
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", "config_resolved.yaml"} <= set(before)
    assert "deqlab.log" in before and "checkpoints/last.ckpt" in before
    proc = run_cli(
        [*TINY, f"paths.data_dir={data_dir}", f"hydra.run.dir={folder}", "solver=broyden"],
        tmp_path,
        check=False,
    )
    assert proc.returncode == 1
    assert "holds another run's checkpoints" in proc.stderr
    assert "ckpt_path=last" in proc.stderr and "overwrite=true" in proc.stderr
    assert snapshot(folder) == before

    # overwrite=true: the old run moves aside, whole; the new one starts in a clean folder
    run_cli(
        [
            *TINY,
            f"paths.data_dir={data_dir}",
            f"hydra.run.dir={folder}",
            "solver=broyden",
            "overwrite=true",
        ],
        tmp_path,
    )
    (aside,) = tmp_path.glob("run.replaced-*")
    assert snapshot(aside) == before
    config = yaml.safe_load((folder / "config_resolved.yaml").read_text())
    assert config["solver"]["name"] == "broyden"
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_a_resumed_run_keeps_the_first_launchs_records(first_run, data_dir, tmp_path):
    folder = copy_run(first_run, tmp_path / "run")
    first = (folder / ".hydra" / "overrides.yaml").read_bytes()
    run_cli(
        [
            *TINY,
            f"paths.data_dir={data_dir}",
            f"hydra.run.dir={folder}",
            "ckpt_path=last",
            "trainer.max_epochs=2",
        ],
        tmp_path,
    )
    assert (folder / ".hydra" / "overrides.yaml").read_bytes() == first
    (launch,) = (folder / ".hydra" / "launches").iterdir()
    assert launch.name == "1_train"
    assert "ckpt_path=last" in (launch / "overrides.yaml").read_text()


# -- 2. a requeued SLURM job -------------------------------------------------------------------


def test_a_requeued_job_resumes_its_own_folder_not_its_start_checkpoint(
    first_run, data_dir, tmp_path
):
    folder = copy_run(first_run, tmp_path / "outputs" / "runs" / "slurm_4242")
    start = tmp_path / "start.ckpt"
    shutil.copy(first_run / "checkpoints" / "best.ckpt", start)
    env = {
        **os.environ,
        **CLI_ENV,
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "train",
        "SLURM_RESTART_COUNT": "1",
    }
    args = [*TINY, f"paths.data_dir={data_dir}", f"ckpt_path={start}", "trainer.max_epochs=2"]
    proc = subprocess.run(
        [sys.executable, "-m", "deqlab", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert (
        f"Restoring states from the checkpoint path at {folder / 'checkpoints' / 'last.ckpt'}"
        in (said)
    )
    assert str(start) not in said.split("Restoring states")[1].splitlines()[0]


# -- 3. a refused run removes nothing of the user's ---------------------------------------------


def test_a_refused_run_removes_nothing_it_did_not_create(tmp_path):
    folder = tmp_path / "mine"
    (folder / "experiment.log").mkdir(parents=True)
    (folder / "experiment.log" / "notes.txt").write_text("keep")
    (folder / "important.log").write_text("keep me")
    empty = tmp_path / "empty"
    empty.mkdir()
    for target in (folder, empty):
        before = snapshot(target)
        proc = run_cli(
            [*TINY, NO_DATA, "solver.max_iter=-3", f"hydra.run.dir={target}"], tmp_path, check=False
        )
        assert proc.returncode == 1 and "solver.max_iter" in proc.stderr
        assert target.is_dir() and snapshot(target) == before
    assert sorted(p.name for p in empty.iterdir()) == []


# -- 4. a refused second writer -----------------------------------------------------------------

HOLDER = """
import sys
from deqlab.runner.cluster import hold_run_folder
with hold_run_folder(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_refused_second_writer_changes_no_byte_of_the_live_folder(first_run, tmp_path):
    folder = copy_run(first_run, tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **CLI_ENV},
    )
    assert holder.stdout.readline().strip() == "held"
    try:
        before = snapshot(folder)
        proc = run_cli(
            [
                *TINY,
                NO_DATA,
                f"hydra.run.dir={folder}",
                "ckpt_path=last",
                "solver=broyden",
                "seed=99",
            ],
            tmp_path,
            check=False,
        )
        assert proc.returncode == 1 and f"in use by pid {holder.pid}" in proc.stderr
        assert snapshot(folder) == before
    finally:
        holder.stdin.close()
        holder.wait()


# -- 5. one dashboard run per training --------------------------------------------------------


@pytest.mark.slow
def test_wandb_run_id_is_kept_across_a_sigkill_and_a_resume(data_dir, tmp_path):
    folder = tmp_path / "run"
    args = [*TINY, f"paths.data_dir={data_dir}", f"hydra.run.dir={folder}", "logger=wandb"]
    args += ["trainer.max_epochs=20"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "deqlab", *args],
        cwd=tmp_path,
        env={**os.environ, **CLI_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert wait_for(lambda: (folder / "checkpoints" / "last.ckpt").is_file(), timeout=300)
    finally:
        # as a scheduler kills a job: the whole process group (W&B's service process too,
        # which would otherwise hold the run id for a while after its parent died)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    run_cli([*args, "ckpt_path=last", "trainer.max_epochs=2"], tmp_path)
    kept = (folder / ".wandb_run_id").read_text().strip()
    runs = sorted((folder / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    assert {r.name.rsplit("-", 1)[1] for r in runs} == {kept}


def test_mlflow_run_id_is_kept_in_the_run_folder(tmp_path):
    pytest.importorskip("mlflow")
    from deqlab.runner.loggers import mlflow_logger

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = mlflow_logger(tracking_uri=uri, run_folder=str(tmp_path / "run"))
    second = mlflow_logger(tracking_uri=uri, run_folder=str(tmp_path / "run"))
    other = mlflow_logger(tracking_uri=uri, run_folder=str(tmp_path / "other"))
    assert first.run_id == second.run_id != other.run_id
    assert (tmp_path / "run" / ".mlflow_run_id").read_text() == first.run_id


# -- 6. a full disk ---------------------------------------------------------------------------

FILL = r"""
import json, sys, warnings
from pathlib import Path
import torch
from deqlab.runner.files import DiskFull, save_atomic, write_text
from deqlab.runner.loggers import log_figure
from lightning.pytorch.loggers import CSVLogger
import matplotlib.pyplot as plt

folder = Path(sys.argv[1])
out = {}
small = {f"t{i}": torch.zeros(10) for i in range(10)}
save_atomic(small, folder / "last.ckpt")
many = {f"t{i}": torch.zeros(10) for i in range(3000)}  # 120 kB of tensors, 350 kB on disk
try:
    save_atomic(many, folder / "last.ckpt")
except DiskFull as e:
    out["many"] = str(e)
write_text(folder / "config_resolved.yaml", "a: 1\n")
try:
    write_text(folder / "config_resolved.yaml", "b: " + "x" * 400_000)
except DiskFull as e:
    out["text"] = str(e)
out["kept"] = [len(torch.load(folder / "last.ckpt", weights_only=True)),
               (folder / "config_resolved.yaml").read_text()]
ballast = folder / "ballast"
try:  # fill the disk to the last block
    with open(ballast, "wb", buffering=0) as fh:
        while True:
            fh.write(b"x" * 4096)
except OSError:
    pass
logger = CSVLogger(str(folder), name="csv")
fig = plt.figure()
plt.plot(range(100))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    log_figure([logger], "deq/residual_trace", fig, 3)
out["warned"] = [str(w.message) for w in caught]
out["files"] = sorted(p.name for p in folder.iterdir())
print(json.dumps(out))
"""


def test_every_write_on_a_full_disk_is_named_and_figures_only_warn(tmp_path):
    """On a real 256 kB tmpfs (a private mount namespace)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mount = 'mount -t tmpfs -o size=256k tmpfs "$1" || exit 97; exec "$2" -c "$3" "$1"'
    try:
        proc = subprocess.run(
            ["unshare", "-rm", "sh", "-c", mount, "sh", str(folder), sys.executable, FILL],
            capture_output=True,
            text=True,
            env={**os.environ, **CLI_ENV},
            timeout=300,
        )
    except FileNotFoundError:
        pytest.skip("no unshare(1) here to mount a small tmpfs")
    if proc.returncode == 97 or "unshare:" in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # many small tensors: more bytes on disk than in tensors, still named as a full disk
    assert out["many"].startswith(
        f"[Errno 28] no space left on device writing {folder / 'last.ckpt'}"
    )
    assert out["text"].startswith(
        f"[Errno 28] no space left on device writing {folder / 'config_resolved.yaml'}"
    )
    assert out["kept"] == [10, "a: 1\n"]  # the previous files, whole
    (warned,) = [w for w in out["warned"] if "was not written" in w]
    assert "deq_residual_trace_step3.png" in warned and "no space left on device" in warned
    assert out["files"] == ["ballast", "config_resolved.yaml", "csv", "last.ckpt"]


# -- 7. torn lines -----------------------------------------------------------------------------


def test_report_skips_torn_lines_with_a_warning_and_still_reports(first_run, tmp_path):
    from deqlab.runner.manifest import MANIFEST, read_manifest
    from deqlab.runner.report import report

    sweep = tmp_path / "sweep"
    job = copy_run(first_run, sweep / "0_solver=anderson")
    good = json.dumps({"overrides": ["solver=broyden"], "status": "FAILED", "folder": "x"})
    (sweep / MANIFEST).write_text(good + "\n" + '{"overrides": ["sol')
    metrics = job / "csv" / "version_0" / "metrics.csv"
    lines = metrics.read_text().splitlines()
    lines.insert(2, lines[1].replace(lines[1].split(",")[0], "0.1x", 1))  # a torn value
    metrics.write_text("\n".join(lines) + "\n" + lines[1][:5])  # and a line cut short
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(read_manifest(sweep)) == 1
        path = report(sweep)
    said = [str(w.message) for w in caught]
    assert any(f"{sweep / MANIFEST}, line 2" in w for w in said)
    assert any(f"{metrics}, line 3: not a row of numbers" in w for w in said)
    assert any(f"{metrics}, line {len(lines) + 1}: cut short" in w for w in said)
    text = Path(path).read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 3  # the header, the run, the manifest's one whole job
    assert "solver=broyden" in rows[2] or "solver=broyden" in rows[1]


# -- 9. a saved config builds only allowed classes ----------------------------------------------


@pytest.mark.parametrize(
    "target",
    ["torch.load", "os.system", "deqlab.runner.files.torch.load", "deqlab.runner.main.instantiate"],
)
def test_a_saved_config_naming_code_outside_the_allow_list_is_refused(target):
    cfg = {"task": {"module": {"_target_": "deqlab.tasks.cifar.module.CifarModule"}}}
    cfg["task"]["datamodule"] = {"_target_": "x", "inner": [{"deep": {"_target_": target}}]}
    cfg["task"]["datamodule"]["_target_"] = "deqlab.tasks.cifar.data.CifarDataModule"
    with pytest.raises(UntrustedTarget) as refused:
        check_targets(cfg, "run/config_resolved.yaml")
    assert f"task.datamodule.inner[0].deep._target_={target!r}" in str(refused.value)
    assert "--trust-config" in str(refused.value)


def test_analyze_of_a_folder_whose_config_runs_a_payload_runs_nothing(first_run, tmp_path):
    from deqlab.runner.analyze import analyze

    folder = copy_run(first_run, tmp_path / "run")
    marker = tmp_path / "payload-ran"
    payload = tmp_path / "payload.pt"
    torch.save(Payload(marker), payload)
    config = yaml.safe_load((folder / "config_resolved.yaml").read_text())
    config["task"]["datamodule"] = {"_target_": "torch.load", "f": str(payload)}
    config["task"]["datamodule"]["weights_only"] = False
    (folder / "config_resolved.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(UntrustedTarget, match=r"task\.datamodule\._target_='torch\.load'"):
        analyze(folder / "checkpoints" / "last.ckpt", limit=4)
    assert not marker.exists()


# -- 10, 11. every checkpoint load is safe; legacy files load -----------------------------------


class Payload:
    """Pickled, it creates ``marker`` when unpickled: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> tuple[Path, Path]:
    root = write_ptb_folder(tmp_path_factory.mktemp("ptb"), lines=40)
    out = tmp_path_factory.mktemp("lm_run")
    run(compose_cfg([*TINY_LM, f"paths.data_dir={root}"], out))
    return root, out


def hostile(folder: Path, marker: Path) -> Path:
    """``folder``'s checkpoints replaced by one that runs a payload when unpickled."""
    state = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    state["payload"] = Payload(marker)
    for name in ("last.ckpt", "best.ckpt"):
        torch.save(state, folder / "checkpoints" / name)
    return folder / "checkpoints" / "last.ckpt"


def test_no_entry_point_runs_a_checkpoints_payload_even_when_torch_is_told_to(
    first_run, data_dir, lm_run, tmp_path, monkeypatch
):
    from deqlab.runner.analyze import analyze
    from deqlab.tasks.lm.generate import load_model

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "payload-ran"
    bad = hostile(copy_run(first_run, tmp_path / "run"), marker)
    base = [*TINY, f"paths.data_dir={data_dir}"]
    attempts = {
        "init_from": lambda: run(compose_cfg([*base, f"init_from={bad}"], tmp_path / "a")),
        "ckpt_path": lambda: run(compose_cfg([*base, f"ckpt_path={bad}"], tmp_path / "b")),
        "mode=eval": lambda: run(
            compose_cfg([*base, f"ckpt_path={bad}", "mode=eval"], tmp_path / "c")
        ),
        "analyze": lambda: analyze(bad, limit=4),
    }
    for name, attempt in attempts.items():
        with pytest.raises(CheckpointError, match="not a readable checkpoint"):
            attempt()
        assert not marker.exists(), name

    # a requeued SLURM job reads its own folder's last.ckpt
    requeued = copy_run(bad.parent.parent, tmp_path / "outputs" / "runs" / "slurm_77")
    for key, value in (("SLURM_JOB_ID", "77"), ("SLURM_NTASKS", "1"), ("SLURM_JOB_NAME", "t")):
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        run(compose_cfg(base, requeued))
    assert not marker.exists()

    root, lm = lm_run
    lm_bad = hostile(copy_run(lm, tmp_path / "lm"), marker)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_model(lm_bad, str(root))
    assert not marker.exists()


def test_a_legacy_torch_file_loads_without_memory_mapping(tmp_path):
    net = torch.nn.Linear(3, 2)
    path = tmp_path / "released.pth"
    torch.save(net.state_dict(), path, _use_new_zipfile_serialization=False)
    assert set(read_checkpoint(path)) == {"weight", "bias"}
    other = torch.nn.Linear(3, 2)
    assert "loaded 2 tensors" in load_initial_weights(path, other)
    assert torch.equal(other.weight, net.weight)


# -- 12. bad init_from / ckpt_path fail before anything is written ------------------------------


def test_bad_weights_or_checkpoints_fail_before_the_run_folder_exists(
    first_run, data_dir, tmp_path
):
    base = [*TINY, f"paths.data_dir={data_dir}"]
    junk = tmp_path / "junk.pt"
    torch.save([1, 2, 3], junk)
    wide = compose_cfg([*base, "task.module.net.channels=16"], tmp_path / "x")
    cases = {
        "init_from_missing": ([*base, "init_from=/nonexistent/w.pt"], "no such file"),
        "init_from_junk": ([*base, f"init_from={junk}"], "no state dict of tensors"),
        "init_from_misfit": (
            [*base, "task.module.net.channels=16", f"init_from={first_run}/checkpoints/last.ckpt"],
            "do not fit this network",
        ),
        "ckpt_misfit": (
            [*base, "task.module.net.channels=16", f"ckpt_path={first_run}/checkpoints/last.ckpt"],
            "network differs",
        ),
        "url": ([*base, "ckpt_path=https://example.com/m.ckpt"], "a URL; deqlab reads"),
    }
    del wide
    for name, (overrides, message) in cases.items():
        out = tmp_path / name
        with pytest.raises(CheckpointError, match=message) as refused:
            run(compose_cfg(overrides, out))
        assert not out.exists(), name
        if name == "url":
            assert "ckpt_path=https://example.com/m.ckpt" in str(refused.value)


# -- 13. the lock's own failures -----------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EPERM])
def test_a_file_system_that_cannot_lock_is_named_and_leaks_no_descriptor(
    code, tmp_path, monkeypatch
):
    def refuse(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(cluster.fcntl, "flock", refuse)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(RunFolderLockError) as refused, hold_run_folder(tmp_path):
        pass
    assert f"cannot lock run folder {tmp_path} ({errno.errorcode[code]}" in str(refused.value)
    assert len(os.listdir("/proc/self/fd")) == before


def test_node_local_flock_mounts_are_detected():
    mounts = "\n".join(
        [
            "/dev/sda1 / ext4 rw,relatime 0 0",
            "srv:/home /home nfs4 rw,vers=4.2,local_lock=none 0 0",
            "srv:/scratch /scratch nfs rw,vers=3,local_lock=flock 0 0",
            "mgs@tcp:/lfs /lustre lustre rw,localflock 0 0",
        ]
    )
    assert node_local_locks(Path("/scratch/me/runs/x"), mounts) == (
        "/scratch is NFS mounted with local_lock=flock"
    )
    assert (
        node_local_locks(Path("/lustre/me"), mounts) == "/lustre is Lustre mounted with localflock"
    )
    assert node_local_locks(Path("/home/me"), mounts) is None
    assert node_local_locks(Path("/tmp/x"), mounts) is None
