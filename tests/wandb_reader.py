"""Read back an offline W&B run (history rows, summary, config) from its ``.wandb`` transaction log, no network.

The ``.wandb`` file is a LevelDB-style log (the format of wandb's old ``sdk/internal/datastore.py``, written by
wandb-core): a 7-byte file header ``<4sHB`` = (b":W&B", 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a
7-byte header ``<IHB`` = (crc32 over type byte + data, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4); a block tail
shorter than a header is zero padding. Each reassembled payload is a serialized ``wandb_internal_pb2.Record``.

wandb-core writes the file asynchronously: ``run.finish()`` can return before it is flushed (seen: only the 7-byte
header right after ``finish()``, complete ~1 ms later). So this waits until the final ``exit`` record is there.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path


def _records(data: bytes):
    """Yield ``(record_type, Record)`` for every complete record in a ``.wandb`` log."""
    from wandb.proto import wandb_internal_pb2 as pb

    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0), f"not a W&B v0 log: {data[:7]!r}"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if (left := 32768 - pos % 32768) < 7:  # block trailer padding
            pos += left
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 or len(chunk) < length:  # zero fill / tail still being written
            return
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))), f"bad crc before offset {pos}"
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record.FromString(buf)
            yield rec.WhichOneof("record_type"), rec


def _path(item) -> list[str]:  # HistoryItem / SummaryItem / ConfigItem: repeated ``nested_key``, else ``key``
    return list(item.nested_key) or [item.key]


def _history_value(item):  # typed oneof ``value`` (none/boolean/integer/number/text/json), else ``value_json``
    kind = item.WhichOneof("value")
    if kind is None:
        return json.loads(item.value_json) if item.value_json else None
    return None if kind == "none" else json.loads(item.json) if kind == "json" else getattr(item, kind)


def read_offline_run(wandb_dir: Path, timeout: float = 10.0, last: bool = False) -> dict:
    """``wandb_dir`` is the ``wandb`` folder inside ``wandb.init(dir=...)``; it must hold exactly one offline run
    (``last``: the newest of several, e.g. a resumed run's second part).

    Returns {"history": [{key: value, ..., "_step": int}], "summary": {...}, "config": {...}, "group", "name"}.
    """
    runs = sorted(Path(wandb_dir).glob("offline-run-*"))
    (run_dir,) = runs[-1:] if last else runs
    (log,) = run_dir.glob("*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        recs = list(_records(log.read_bytes()))
        if any(kind == "exit" for kind, _ in recs):
            break
        assert time.monotonic() < deadline, f"{log}: no exit record after {timeout}s (run not finished?)"
        time.sleep(0.01)
    out: dict = {"history": [], "summary": {}, "config": {}, "group": "", "name": ""}
    for kind, rec in recs:
        if kind == "run":
            out.update(group=rec.run.run_group, name=rec.run.display_name)
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
            for i in rec.config.remove:
                out["config"].pop(i.key, None)
        elif kind == "history":
            row = {".".join(_path(i)): _history_value(i) for i in rec.history.item}
            row["_step"] = int(row.get("_step", rec.history.step.num))
            out["history"].append(row)
        elif kind == "summary":
            for i, remove in [(i, False) for i in rec.summary.update] + [(i, True) for i in rec.summary.remove]:
                *parents, leaf = _path(i)
                d = out["summary"]
                for p in parents:
                    d = d.setdefault(p, {})
                if remove:
                    d.pop(leaf, None)
                else:
                    d[leaf] = json.loads(i.value_json)
    return out
