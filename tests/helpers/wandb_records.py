"""Read an offline W&B run (``run-*.wandb``) as the records ``wandb sync`` would upload.

The file is a 7-byte header (``:W&B``, magic, version) followed by a LevelDB log: 32 KiB
blocks of chunks, each ``crc32c (4) | length (2, little endian) | type (1) | data``, where a
record is one FULL chunk or FIRST, MIDDLE..., LAST chunks, and the data is W&B's own
``wandb_internal_pb2.Record`` protobuf. Tests wait for the run's exit record, which the
writer appends last, instead of assuming the file is complete when ``wandb.finish`` returns.
"""

from __future__ import annotations

import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

HEADER = 7
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log")
    records, pending, pos = [], b"", HEADER
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        if len(chunk) < length or kind == 0:  # the writer has not finished this chunk
            break
        pos += 7 + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def finished_run(run_dir: Path, timeout: float = 120) -> list[wandb_internal_pb2.Record]:
    """The records of the offline run in ``run_dir`` once its exit record is written."""
    deadline = time.monotonic() + timeout
    while True:
        files = list(run_dir.glob("run-*.wandb"))
        records = read_records(files[0]) if len(files) == 1 else []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"{run_dir}: no exit record after {timeout} s")
        time.sleep(0.1)


def exit_code(records: list[wandb_internal_pb2.Record]) -> int:
    return next(r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit")


def logged_keys(records: list[wandb_internal_pb2.Record]) -> set[str]:
    """Every metric key of the run's history."""
    return {
        item.key or "/".join(item.nested_key)
        for r in records
        if r.WhichOneof("record_type") == "history"
        for item in r.history.item
    }


def config(records: list[wandb_internal_pb2.Record]) -> dict[str, str]:
    """The run's config (set at start and updated later), key -> JSON value."""
    out = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):
            updates = r.run.config.update if kind == "run" else r.config.update
            out.update({item.key: item.value_json for item in updates})
    return out


def tags(records: list[wandb_internal_pb2.Record]) -> list[str]:
    return [t for r in records if r.WhichOneof("record_type") == "run" for t in r.run.tags]


def summaries(records: list[wandb_internal_pb2.Record]) -> dict[str, set[str]]:
    """``define_metric`` summaries: metric name -> the aggregates kept (``max``, ``min``...)."""
    out: dict[str, set[str]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "metric" and r.metric.name:
            kept = {f.name for f, v in r.metric.summary.ListFields() if v}
            out.setdefault(r.metric.name, set()).update(kept)
    return out


def run_info(records: list[wandb_internal_pb2.Record]) -> wandb_internal_pb2.RunRecord:
    """The run record: name (``display_name``), group, tags, config."""
    return next(r.run for r in records if r.WhichOneof("record_type") == "run")
