"""benchmarks/engine_throughput.py at laptop scale: the torch engine and HF generate on a tiny
random checkpoint (CPU), fresh images per call, the table and the JSON; a failed engine is a row
with its error, not a crash."""

from __future__ import annotations

import json

import numpy as np

from benchmarks.engine_throughput import fresh_images, main, table


def test_torch_engine_and_hf_generate_on_a_tiny_checkpoint(tmp_path):
    out = tmp_path / "result.json"
    result = main(["--size", "tiny", "--device", "cpu", "--engines", "torch", "hf",
                   "--batches", "2", "3", "--calls", "2", "--work", str(tmp_path / "work"),
                   "--out", str(out)])  # fmt: skip
    rows = result["rows"]
    assert set(rows) == {"torch", "hf"}
    for name in ("torch", "hf"):
        assert set(rows[name]["actions_per_s"]) == {2, 3}
        assert all(r > 0 for r in rows[name]["actions_per_s"].values())
    assert rows["torch"]["start_s"] > 0
    saved = json.loads(out.read_text())
    assert saved["rows"]["torch"]["actions_per_s"].keys() == {"2", "3"}
    md = out.with_suffix(".md").read_text()
    assert md.startswith("| batch | torch actions/s | hf actions/s | hf / torch |")
    assert md.count("\n") == 4  # header, rule, two batch sizes


def test_every_call_sees_new_images():
    images = fresh_images(np.random.default_rng(0), 3, 2)
    assert len(images) == 3 and images[0].shape == (2, 224, 224, 3)
    assert not np.array_equal(images[0], images[1])  # no prefix cache could serve a repeat


def test_a_failed_engine_is_a_row_with_its_error():
    rows = {"torch": {"actions_per_s": {8: 100.0}},
            "vllm": {"error": "RuntimeError: engine core died"}}  # fmt: skip
    md = table(rows, [8])
    assert "| 8 | 100.0 | RuntimeError: engine core died | - |" in md
    rows["vllm"] = {"actions_per_s": {8: 150.0}}
    assert "| 8 | 100.0 | 150.0 | 1.50x |" in table(rows, [8])


def test_hf_failing_keeps_the_torch_row(tmp_path, monkeypatch):
    import benchmarks.engine_throughput as bench

    def broken(*args, **kwargs):
        raise RuntimeError("generate blew up")

    monkeypatch.setattr(bench, "hf_generate", broken)
    result = main(["--size", "tiny", "--device", "cpu", "--engines", "torch", "hf",
                   "--batches", "2", "--calls", "1", "--work", str(tmp_path)])  # fmt: skip
    assert result["rows"]["torch"]["actions_per_s"][2] > 0
    assert result["rows"]["hf"] == {"error": "RuntimeError: generate blew up"}
    assert "RuntimeError: generate blew up" in result["table"]
