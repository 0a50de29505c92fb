"""The timeline is a Chrome trace Perfetto opens: one named thread per track, complete events in µs."""

from __future__ import annotations

import json

from rlhf_dist.driver.timeline import Timeline


def test_chrome_trace_has_a_thread_per_track_and_spans_in_microseconds(tmp_path):
    timeline = Timeline()
    origin = timeline.origin
    timeline.add("generation", "generate step 0", origin + 1.0, origin + 3.5, samples=8)
    timeline.add("policy", "train", origin + 3.5, origin + 4.0)
    timeline.add("generation", "generate step 1", origin + 3.5, origin + 6.0)
    timeline.write(tmp_path / "timeline.json")
    trace = json.loads((tmp_path / "timeline.json").read_text())
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert names == {1: "generation", 2: "policy"}
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert [(e["name"], e["tid"], e["ts"], e["dur"]) for e in spans] == [
        ("generate step 0", 1, 1_000_000, 2_500_000), ("train", 2, 3_500_000, 500_000),
        ("generate step 1", 1, 3_500_000, 2_500_000),
    ]
    assert spans[0]["args"] == {"samples": 8}
    assert not (tmp_path / "timeline.tmp").exists()


def test_a_disabled_timeline_records_and_writes_nothing(tmp_path):
    timeline = Timeline(enabled=False)
    with timeline.span("policy", "train"):
        pass
    timeline.write(tmp_path / "timeline.json")
    assert timeline.spans() == [] and not (tmp_path / "timeline.json").exists()
