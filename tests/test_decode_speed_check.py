"""quantize's speed check on a KV-cache decoder times one decode step, the workload generation runs."""

from __future__ import annotations

import json

import numpy as np

from bench.decoder_model import CONFIGS, build_decoder, empty_cache, step_feed, token_ids

CONFIG = CONFIGS["tiny"]


def test_a_decoder_is_timed_on_one_new_token_after_its_prompt(run_cli, tmp_path):
    model = build_decoder(CONFIG, tmp_path / "decoder.onnx")
    feed = step_feed(token_ids(CONFIG, 4, 8), empty_cache(CONFIG, 4))
    np.savez(tmp_path / "prompts.npz", **feed)
    result = run_cli("quantize", model, "--mode", "weight-only", "-d", tmp_path / "prompts.npz",
                     "-o", tmp_path / "int4.onnx", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["speed_measured_with"] is not None, summary["notes"]
    assert "one decode step" in summary["speed_measured_with"] and summary["latency_batch"] == 1


def test_other_models_are_timed_on_their_data(run_cli, tmp_path, cnn_path, calib_npz):
    result = run_cli("quantize", cnn_path, "--mode", "dynamic", "-d", calib_npz, "-o", tmp_path / "d.onnx", "--json")
    assert result.exit_code == 0, result.stderr
    how = json.loads(result.stdout)["speed_measured_with"]
    assert how and "decode step" not in how and "interleaved runs" in how


def test_calibrated_weight_only_with_a_matmul_excluded(run_cli, tmp_path):
    """Calibration statistics are read for every MatMul input; those of layers left float are simply unused."""
    model = build_decoder(CONFIG, tmp_path / "decoder.onnx")
    np.savez(tmp_path / "prompts.npz", **step_feed(token_ids(CONFIG, 2, 8), empty_cache(CONFIG, 2)))
    result = run_cli("quantize", model, "--mode", "weight-only", "-d", tmp_path / "prompts.npz", "--exclude",
                     "*down_proj*", "--no-speed-check", "-o", tmp_path / "int4.onnx", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["quantized_nodes"] and not any("down_proj" in n for n in summary["quantized_nodes"])


def test_a_cache_the_decode_feed_cannot_extend_is_timed_on_the_data(run_cli, tmp_path, monkeypatch):
    """A cache layout measure.decode cannot drive (an exporter's odd axes) costs the decode-step timing, not
    the quantize: the speed check falls back to the data's own batches."""
    from compressq.errors import DataError
    from compressq.quantize import api

    def undrivable(*args, **kwargs):
        raise DataError("the cache's length axis is not clear")

    monkeypatch.setattr(api, "decode_step_feeds", undrivable)
    model = build_decoder(CONFIG, tmp_path / "decoder.onnx")
    np.savez(tmp_path / "prompts.npz", **step_feed(token_ids(CONFIG, 4, 8), empty_cache(CONFIG, 4)))
    result = run_cli("quantize", model, "--mode", "dynamic", "-d", tmp_path / "prompts.npz", "-o",
                     tmp_path / "int8.onnx", "--json")
    assert result.exit_code == 0, result.stderr
    how = json.loads(result.stdout)["speed_measured_with"]
    assert how and "decode step" not in how
