"""Where a run's time goes: spans per role, written as a Chrome trace (``logger.timeline``).

``timeline.json`` opens in https://ui.perfetto.dev or chrome://tracing: one track per role
(generation engines, reward, reference, policy, critic, weight sync, controller), one span per
call, so what overlaps and what waits is visible at a glance.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Timeline:
    """Spans (track, name, start, end) in wall-clock seconds; safe to add to from several threads.
    A disabled timeline records nothing."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.origin = time.time()
        self._spans: list[tuple[str, str, float, float, dict]] = []
        self._lock = threading.Lock()

    def add(self, track: str, name: str, start: float, end: float, **args) -> None:
        """A span of ``track`` from ``start`` to ``end`` (``time.time()`` values)."""
        if self.enabled:
            with self._lock:
                self._spans.append((track, name, start, end, args))

    @contextmanager
    def span(self, track: str, name: str, **args) -> Iterator[None]:
        start = time.time()
        try:
            yield
        finally:
            self.add(track, name, start, time.time(), **args)

    def spans(self) -> list[tuple[str, str, float, float, dict]]:
        with self._lock:
            return list(self._spans)

    def chrome_trace(self) -> dict:
        """The Chrome trace-event JSON object: a complete ("X") event per span, a thread per track."""
        spans = self.spans()
        tracks = list(dict.fromkeys(track for track, *_ in spans))
        tid = {track: i + 1 for i, track in enumerate(tracks)}
        events = [
            {"name": "thread_name", "ph": "M", "pid": 1, "tid": tid[t], "args": {"name": t}} for t in tracks
        ] + [
            {"name": "thread_sort_index", "ph": "M", "pid": 1, "tid": tid[t], "args": {"sort_index": tid[t]}}
            for t in tracks
        ]
        for track, name, start, end, args in spans:
            events.append({
                "name": name, "ph": "X", "pid": 1, "tid": tid[track], "args": args,
                "ts": round((start - self.origin) * 1e6), "dur": max(round((end - start) * 1e6), 1),
            })
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def write(self, path: Path) -> None:
        """Write the trace to ``path`` atomically (a crash leaves the previous one)."""
        if not self.enabled:
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.chrome_trace()))
        tmp.replace(path)
