"""What a shared cluster does to a run: a second process in a run folder is refused by name, a
dead process's lock is taken over, and a scheduler's signal mid-epoch ends the run with a
checkpoint from which the resumed run equals the uninterrupted one bitwise (real signals to
real processes; SLURM's requeue through a stand-in `scontrol`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deqlab.runner.cluster import LOCK_NAME, RunFolderInUse, hold_run_folder

from .helpers.runs import CLI_ENV, TINY, last_value, metrics, run_cli, write_cifar_folder

HOLDER = """
import sys
from deqlab.runner.cluster import hold_run_folder
with hold_run_folder(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def start_holder(folder: Path) -> subprocess.Popen:
    """Another process that holds ``folder``'s lock until it is killed or its stdin closed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **CLI_ENV},
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_by_name_and_the_lock_is_released(tmp_path):
    holder = start_holder(tmp_path)
    try:
        with pytest.raises(RunFolderInUse) as refused, hold_run_folder(tmp_path):
            pass
        assert f"run folder {tmp_path} is in use by pid {holder.pid} on " in str(refused.value)
        assert "hydra.run.dir=<new folder>" in str(refused.value)
    finally:
        holder.stdin.close()  # the holder leaves its block and ends
        assert holder.wait() == 0
    # a holder that ends normally removes its lock file; the next one takes the folder
    assert not (tmp_path / LOCK_NAME).exists()
    with hold_run_folder(tmp_path) as stale:
        assert stale is None
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    holder = start_holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LOCK_NAME).exists()  # left behind, with nobody holding it
    with hold_run_folder(tmp_path) as stale:
        assert stale["pid"] == holder.pid


def test_cli_refuses_a_run_folder_in_use_before_reading_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"being written")
    holder = start_holder(run)
    try:
        proc = run_cli(
            [*TINY, f"paths.data_dir={tmp_path}", f"hydra.run.dir={run}", "ckpt_path=last"],
            tmp_path,
            check=False,
        )
    finally:
        holder.stdin.close()
        holder.wait()
    assert proc.returncode == 1
    assert f"is in use by pid {holder.pid}" in proc.stderr
    assert "not a readable checkpoint" not in proc.stderr  # refused before reading it
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == b"being written"


# 32 training images in batches of 8: 4 steps an epoch, 3 epochs, validated every 2 steps
CIFAR = [
    *TINY,
    "task.datamodule.val_size=28",
    "trainer.max_epochs=3",
    "+trainer.val_check_interval=2",
    "jac_reg=hutchinson",
    "task.module.fit.jitter=1",
]


def signal_at(name: str, step: int, during: str) -> list[str]:
    return [
        "+callbacks.signal._target_=tests.helpers.runs.SendSignal",
        f"+callbacks.signal.signal={name}",
        f"+callbacks.signal.step={step}",
        f"+callbacks.signal.during={during}",
    ]


def assert_same_run(full: Path, resumed: Path) -> None:
    a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for key in ("val/acc", "test/acc", "val/loss", "train/loss"):
        assert last_value(metrics(resumed), key) == last_value(metrics(full), key), key


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, step, during, saved_step",
    [
        ("SIGTERM", 5, "train", 6),  # mid-epoch, between two validations: step 6 finishes
        ("SIGUSR1", 2, "validation", 2),  # in a validation: it finishes first
    ],
)
def test_signal_mid_epoch_checkpoints_and_the_resumed_run_is_bitwise_equal(
    name, step, during, saved_step, tmp_path
):
    data = write_cifar_folder(tmp_path / "data")
    args = [*CIFAR, f"paths.data_dir={data}"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    run_cli([*args, f"hydra.run.dir={full}"], tmp_path)

    proc = run_cli(
        [*args, f"hydra.run.dir={stopped}", *signal_at(name, step, during)], tmp_path, check=False
    )
    assert proc.returncode == 128 + getattr(signal, name), proc.stderr[-3000:]
    assert f"deqlab: received {name}: checkpointing after this step" in proc.stdout
    ckpt = torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == saved_step  # the step in progress, finished
    assert not (stopped / LOCK_NAME).exists()
    run_cli([*args, f"hydra.run.dir={stopped}", "ckpt_path=last"], tmp_path)
    assert_same_run(full, stopped)


SCONTROL = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/scontrol.calls"
"""


@pytest.mark.slow
def test_slurm_job_requeues_itself_and_resumes_in_its_folder(tmp_path):
    data = write_cifar_folder(tmp_path / "data")
    args = [*CIFAR, f"paths.data_dir={data}"]
    full = tmp_path / "full"
    run_cli([*args, f"hydra.run.dir={full}"], tmp_path)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "train",
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
    }

    def job(extra: list[str], restarts: int) -> subprocess.CompletedProcess:
        env = {**os.environ, **CLI_ENV, **slurm, "SLURM_RESTART_COUNT": str(restarts)}
        return subprocess.run(
            [sys.executable, "-m", "deqlab", *args, *extra],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    first = job(signal_at("SIGUSR1", 5, "train"), restarts=0)
    assert first.returncode == 128 + signal.SIGUSR1, first.stderr[-3000:]
    assert (bin_dir / "scontrol.calls").read_text().split() == ["requeue", "4242"]
    folder = tmp_path / "outputs" / "runs" / "slurm_4242"
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert not list(folder.glob("hpc_ckpt_*.ckpt"))  # it became last.ckpt

    second = job([], restarts=1)  # what SLURM starts: the same command, the same job id
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Restoring states from the checkpoint path" in second.stdout + second.stderr
    assert_same_run(full, folder)


FILL_A_DISK = r"""
import json, sys, torch
from pathlib import Path
from deqlab.runner.files import DiskFull, save_atomic

folder = Path(sys.argv[1])
path = folder / "last.ckpt"
save_atomic({"w": torch.zeros(10_000)}, path)  # 40 kB: fits in 256 kB
try:
    save_atomic({"w": torch.ones(100_000)}, path)  # 400 kB: does not
    print(json.dumps({"error": None}))
except DiskFull as e:
    kept = torch.load(path, weights_only=True)["w"]
    files = sorted(p.name for p in folder.iterdir())
    print(json.dumps({"error": str(e), "kept": [kept.numel(), kept.sum().item()], "files": files}))
"""


def test_full_disk_is_named_and_the_previous_checkpoint_survives(tmp_path):
    """On a real 256 kB tmpfs (a private mount namespace: no root needed where user namespaces
    are allowed)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mount = 'mount -t tmpfs -o size=256k tmpfs "$1" || exit 97; exec "$2" -c "$3" "$1"'
    try:
        proc = subprocess.run(
            ["unshare", "-rm", "sh", "-c", mount, "sh", str(folder), sys.executable, FILL_A_DISK],
            capture_output=True,
            text=True,
            env={**os.environ, **CLI_ENV},
            timeout=120,
        )
    except FileNotFoundError:
        pytest.skip("no unshare(1) here to mount a small tmpfs")
    if proc.returncode == 97 or "unshare:" in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    message = result["error"]
    assert message is not None, "the write that cannot fit succeeded"
    assert f"no space left on device writing {folder / 'last.ckpt'}: about 0.4 MB needed, " in (
        message
    )
    free = float(message.split("needed, ")[1].split(" MB free")[0])
    assert 0 < free < 0.25
    assert result["kept"] == [10_000, 0.0]  # the previous checkpoint, whole
    assert result["files"] == ["last.ckpt"]  # no partial file left


def test_torchs_write_error_on_a_full_disk_is_translated(tmp_path, monkeypatch):
    """torch's C++ writer reports a full disk as an iostream error, without errno."""
    from deqlab.runner import files
    from deqlab.runner.checkpoint import AtomicCheckpointIO

    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(4)}, path)

    def full(obj, f):
        f.write(b"partial")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:778] . unexpected pos 94848 vs 94740"
        )

    monkeypatch.setattr(files.torch, "save", full)
    disk_usage = shutil.disk_usage
    monkeypatch.setattr(
        files.shutil, "disk_usage", lambda p: disk_usage(p)._replace(free=3 * 2**20)
    )
    with pytest.raises(files.DiskFull) as e:
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(2**20)}, path)  # 4 MB
    assert str(e.value) == (
        f"[Errno 28] no space left on device writing {path}: about 4.0 MB needed, 3.0 MB free. "
        "Free space there, or write elsewhere (hydra.run.dir=<folder on a larger disk>); the "
        "previous file is intact"
    )
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    # an error that is not about space is not disguised as one
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: disk_usage(p)._replace(free=2**40))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(2**20)}, path)
