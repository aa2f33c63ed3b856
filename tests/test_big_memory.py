"""Big models in little memory (issue 12 item 2): the mechanism, on the tiny decoder with the thresholds lowered.

A model loaded with `load_model(read_weights=False)` keeps its weights on disk as mapped references; dynamic,
weight-only and unstructured/N:M prune read one weight at a time (memory-mapped), write each new tensor to a
spill file as it is made, and save_model copies the bytes into the output's .data a chunk at a time. What is
asserted here: no weight is read whole, no two weights are in memory at once, the outputs reload and equal the
outputs of the same command on the model in memory, and they are the same bytes from run to run. The memory
figures themselves are measured by the bench (bench/big_models_bench.py), never here.
"""

from __future__ import annotations

import functools
import gc
import os
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import compressq.io as model_io
import compressq.quantize.api as quantize_api
import compressq.quantize.dynamic as dynamic
import compressq.quantize.weight_only as weight_only
from bench.decoder_model import CONFIGS, build_decoder, empty_cache, step_feed, token_ids
from compressq.data import load_dataset
from compressq.io import read_mapped_tensor  # bound before any test patches it
from compressq.prune import PruneConfig, prune_model
from compressq.prune.masks import cut_mask, global_cut, global_masks, lowest_scores_mask
from compressq.quantize import scheme
from compressq.quantize.api import quantize_model
from compressq.quantize.config import QuantizeConfig
from compressq.runtime import create_session
from tests.helpers import BIG_MODEL_COMMANDS
from tests.test_subgraphs import if_model


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    return build_decoder(CONFIGS["tiny"], tmp_path_factory.mktemp("decoder") / "decoder.onnx")


def logits(path: Path) -> np.ndarray:
    ids = token_ids(CONFIGS["tiny"], 2, 6, seed=1)
    return create_session(path).run(["logits"], step_feed(ids, empty_cache(CONFIGS["tiny"], 2)))[0]


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: np.array(model_io.tensor_array(t)) for t in model.graph.initializer}


def _calibrated_weight_only(model: onnx.ModelProto, reconstruction: str = "none") -> onnx.ModelProto:
    """int4 weight-only with scales refined on calibration rows (and GPTQ codes), rows read by a session opened
    on files."""
    config = CONFIGS["tiny"]
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "prompts.npz"
        np.savez(data, **step_feed(token_ids(config, 4, 6, seed=3), empty_cache(config, 4)))
        dataset = load_dataset(data, model)
        return quantize_model(model, dataset, QuantizeConfig(mode="weight-only", speed_check=False, block_size=16,
                                                             weight_reconstruction=reconstruction)).model


RUNS = {
    "weight-only calibrated": _calibrated_weight_only,
    "weight-only gptq": lambda model: _calibrated_weight_only(model, "gptq"),
    "dynamic": lambda model: quantize_model(model, None, QuantizeConfig(mode="dynamic", speed_check=False)).model,
    "weight-only": lambda model: quantize_model(model, None, QuantizeConfig(mode="weight-only", speed_check=False,
                                                                            block_size=16)).model,
    "prune": lambda model: prune_model(model, PruneConfig(sparsity=0.5)).model,
    "prune global": lambda model: prune_model(model, PruneConfig(sparsity=0.5, scope="global")).model,
    "prune 2:4": lambda model: prune_model(model, PruneConfig.from_options(None, "2:4")).model,
    "prune random": lambda model: prune_model(model, PruneConfig(sparsity=0.4, criterion="random",
                                                                 scope="global")).model,
}


def test_a_mapped_model_points_at_its_checked_files_and_only_io_reads_them(decoder, tmp_path, monkeypatch):
    mapped = model_io.load_model(decoder, read_weights=False)
    external = [t for t in mapped.graph.initializer if model_io.is_external(t)]
    assert external and all(model_io.is_mapped(t) for t in external)
    assert model_io.holds_mapped_weights(mapped) and not any(t.HasField("raw_data") for t in external)
    # onnx would resolve a relative location against the current folder: an absolute one it refuses outright
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match="absolute"):
        numpy_helper.to_array(external[0])
    full = model_io.load_model(decoder)
    for name, value in weights(full).items():
        np.testing.assert_array_equal(weights(mapped)[name], value)
    assert model_io.with_weights_read(mapped).SerializeToString() == full.SerializeToString()


@pytest.mark.parametrize("run", list(RUNS))
def test_streamed_output_equals_the_output_made_in_memory(run, decoder, big_threshold, tmp_path):
    streamed = RUNS[run](model_io.load_model(decoder, read_weights=False))
    in_memory = RUNS[run](model_io.load_model(decoder))
    spilled = [t for t in streamed.graph.initializer if model_io.is_mapped(t)
               and Path(model_io._external_entries(t)["location"]).suffix == ".spill"]
    assert spilled, "new tensors are written to the spill file as they are made"
    assert weights(streamed).keys() == weights(in_memory).keys()
    for name, value in weights(in_memory).items():
        np.testing.assert_array_equal(weights(streamed)[name], value, err_msg=name)
    model_io.save_model(streamed, tmp_path / "streamed.onnx")
    model_io.save_model(in_memory, tmp_path / "in_memory.onnx")
    written = onnx.load(str(tmp_path / "streamed.onnx"), load_external_data=False)
    assert not any(model_io.is_mapped(t) for t in written.graph.initializer), "no absolute path reaches a file"
    np.testing.assert_array_equal(logits(tmp_path / "streamed.onnx"), logits(tmp_path / "in_memory.onnx"))


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Every mapped weight read; fails when one is read whole into a proto, or while another is still alive."""
    names: list[str] = []
    alive: list[weakref.ref] = []
    real_array = model_io.tensor_array

    def one_at_a_time(tensor):
        value = real_array(tensor)
        if model_io.is_mapped(tensor) and value.nbytes >= model_io.EXTERNAL_TENSOR_BYTES:
            gc.collect()
            still = [ref for ref in alive if ref() is not None]
            assert not still, f"'{tensor.name}' read while an earlier weight is still in memory"
            alive.append(weakref.ref(value))
            names.append(tensor.name)
        return value

    def read_whole(tensor):
        pytest.fail(f"'{tensor.name}' was read whole into the proto")

    for module in ("compressq.io", "compressq.quantize.dynamic", "compressq.quantize.weight_only", "compressq.prune"):
        if hasattr(__import__(module, fromlist=["_"]), "tensor_array"):
            monkeypatch.setattr(f"{module}.tensor_array", one_at_a_time)
    monkeypatch.setattr(model_io, "read_mapped_tensor", read_whole)
    monkeypatch.setattr("compressq.quantize.api.read_mapped_tensor", read_whole)
    return names


@pytest.mark.parametrize("run", ["weight-only", "weight-only calibrated", "weight-only gptq", "prune", "prune global",
                                 "prune 2:4"])
def test_each_weight_is_read_alone_and_never_into_the_proto(run, decoder, reads):
    mapped = model_io.load_model(decoder, read_weights=False)
    RUNS[run](mapped)
    assert reads, "the weights were read through io.tensor_array"


def test_dynamic_reads_only_the_embedding_table_whole(decoder, reads, monkeypatch):
    """embedding.py (uint8 Gather tables) reads its table from the proto: that one table is read whole, alone."""
    whole: list[str] = []
    monkeypatch.setattr("compressq.quantize.api.read_mapped_tensor", lambda tensor: (
        whole.append(tensor.name), read_mapped_tensor(tensor)))
    RUNS["dynamic"](model_io.load_model(decoder, read_weights=False))
    assert whole == ["model.embed_tokens.weight"]
    assert len(reads) == 7 * CONFIGS["tiny"].layers + 1  # q k v o gate up down per layer, and lm_head


def test_the_speed_check_times_a_mapped_model_from_files(decoder, reads, monkeypatch, tmp_path):
    """onnxruntime gets the models as files written next to their weights: none is read into a proto for it (the
    `reads` fixture fails any such read); real prompts as data, which dynamic mode only times."""
    timed = []
    real = quantize_api.measure_speedup
    monkeypatch.setattr(quantize_api, "measure_speedup", lambda a, b, *args, **kwargs: (
        timed.append((a, b)), real(a, b, *args, **kwargs))[1])
    config = CONFIGS["tiny"]
    data = tmp_path / "prompts.npz"
    np.savez(data, **step_feed(token_ids(config, 4, 6, seed=3), empty_cache(config, 4)))
    monkeypatch.setattr(quantize_api, "read_mapped_tensor", read_mapped_tensor)  # the embedding table (see above)
    mapped = model_io.load_model(decoder, read_weights=False)
    result = quantize_model(mapped, load_dataset(data, mapped), QuantizeConfig(mode="dynamic"))
    assert result.summary.speedup is not None, result.summary.notes
    assert len(timed) == 1 and all(isinstance(path, Path) for path in timed[0])
    assert not any(path.exists() for path in timed[0]), "the staged copies are removed after timing"


@pytest.mark.parametrize("command", list(BIG_MODEL_COMMANDS))
def test_cli_outputs_are_the_same_bytes_every_run(command, decoder, run_cli, tmp_path):
    written = []
    for attempt in range(2):
        out = tmp_path / f"run{attempt}" / "out.onnx"
        out.parent.mkdir()
        result = run_cli(*[a.format(model=decoder, out=out) for a in BIG_MODEL_COMMANDS[command]])
        assert result.exit_code == 0, result.stderr
        written.append((out.read_bytes(), out.with_name("out.onnx.data").read_bytes()))
    assert written[0] == written[1]
    np.testing.assert_array_equal(logits(out), logits(tmp_path / "run0" / "out.onnx"))


def test_modes_that_run_the_model_read_it_first(decoder, run_cli, tmp_path):
    """Static int8 (calibration) and refit run onnxruntime on the model in memory: a mapped model is read for
    them; calibrated weight-only and the speed check run it from files. All work as before."""
    config = CONFIGS["tiny"]
    data = tmp_path / "calibration.npz"
    np.savez(data, **step_feed(token_ids(config, 4, 6, seed=3), empty_cache(config, 4)))
    runs = [["quantize", decoder, "-d", data, "--no-speed-check", "--no-accuracy-check"],
            ["quantize", decoder, "--mode", "weight-only", "--block-size", "16", "-d", data, "--no-speed-check"],
            ["quantize", decoder, "--mode", "dynamic"],
            ["prune", decoder, "-s", "0.3", "--calibration-data", data, "--calibration-samples", "4"]]
    for number, arguments in enumerate(runs):
        out = tmp_path / f"out{number}.onnx"
        result = run_cli(*arguments, "-o", out)
        assert result.exit_code == 0, f"{arguments}: {result.stderr}"
        assert np.isfinite(logits(out)).all()


def test_a_spill_file_lives_until_the_process_ends_and_a_dead_runs_file_is_removed(tmp_path):
    stale = tmp_path / f"{model_io.SPILL_PREFIX}999999999-x.spill"
    stale.write_bytes(b"left by a killed run")
    ours = tmp_path / f"{model_io.SPILL_PREFIX}{os.getpid()}-y.spill"
    ours.write_bytes(b"this process's own, still in use")
    spill = model_io.SpillFile(tmp_path)
    assert not stale.exists() and ours.exists()
    tensor = spill.tensor(np.arange(600, dtype=np.float32).reshape(20, 30), "w")
    np.testing.assert_array_equal(model_io.tensor_array(tensor), np.arange(600, dtype=np.float32).reshape(20, 30))
    assert spill.path.exists()
    spill.remove()
    assert not spill.path.exists()


def test_the_spill_file_is_gone_when_the_process_ends(tmp_path):
    script = ("import pathlib, sys, numpy as np, compressq.io as io; "
              "spill = io._spill_for_folder(pathlib.Path(sys.argv[1])); "
              "spill.tensor(np.zeros(4096, np.float32), 'w'); print(spill.path)")
    finished = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True)
    assert Path(finished.stdout.strip()).parent == tmp_path.resolve()
    assert not list(tmp_path.iterdir())


def test_global_cut_equals_global_masks():
    """The streaming global threshold prunes exactly the weights global_masks prunes, ties included."""
    rng = np.random.default_rng(3)
    for case in range(200):
        scores = {f"layer{i}": np.abs(np.round(rng.standard_normal(tuple(rng.integers(1, 7, size=2))),
                                               int(rng.integers(0, 3)))) for i in range(int(rng.integers(1, 5)))}
        if case % 3 == 0:
            scores = {name: value * 0 for name, value in scores.items()}  # all tied
        sparsity = float(rng.choice([0.0, 0.1, 0.5, 0.9, 1.0, rng.random()]))
        expected = global_masks(scores, sparsity)
        cut = global_cut(functools.partial(iter, list(scores.values())), sparsity)
        ties = 0
        for name, value in scores.items():
            keep, ties = cut_mask(value, cut, ties)
            np.testing.assert_array_equal(keep, expected[name], err_msg=f"case {case}, {name}, {sparsity}")


def test_lowest_scores_mask_prunes_what_a_stable_argsort_prunes():
    """Each layer's mask comes from a partition, not a sort: the same weights go, ties by position."""
    rng = np.random.default_rng(5)
    for case in range(300):
        scores = np.round(rng.standard_normal(tuple(rng.integers(1, 9, size=int(rng.integers(1, 4))))),
                          int(rng.integers(0, 3)))
        if case % 5 == 0:
            scores = scores * 0  # all tied
        prune = int(rng.integers(0, scores.size + 1))
        expected = np.ones(scores.size, dtype=bool)
        expected[np.argsort(scores, axis=None, kind="stable")[:prune]] = False
        np.testing.assert_array_equal(lowest_scores_mask(scores, prune), expected.reshape(scores.shape),
                                      err_msg=f"case {case}, prune {prune}")


def test_a_mapped_model_with_shared_and_one_dimensional_weights_prunes(tmp_path):
    """Layers kept dense for their weight's kind (shared by two nodes, 1-D) are sized by value in plan.py: those
    few weights are read; the others still stream."""
    rng = np.random.default_rng(0)
    shared, own = rng.standard_normal((64, 64), np.float32), rng.standard_normal((64, 64), np.float32)
    vector = rng.standard_normal(64, np.float32)
    nodes = [onnx.helper.make_node("MatMul", ["x", "shared"], ["a"], name="first"),
             onnx.helper.make_node("MatMul", ["a", "own"], ["b"], name="middle"),
             onnx.helper.make_node("MatMul", ["b", "shared"], ["c"], name="again"),
             onnx.helper.make_node("MatMul", ["c", "vector"], ["y"], name="last")]
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(value, name) for name, value in
         (("shared", shared), ("own", own), ("vector", vector))])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    path = tmp_path / "shared.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="shared.onnx.data", size_threshold=0)
    config = PruneConfig(sparsity=0.5, min_parameters=0, keep_first=False, keep_last=False)
    streamed = prune_model(model_io.load_model(path, read_weights=False), config)
    in_memory = prune_model(model_io.load_model(path), config)
    assert [layer.node for layer in streamed.summary.layers] == ["middle"]
    assert streamed.summary.dense_layers == in_memory.summary.dense_layers
    for name, value in weights(in_memory.model).items():
        np.testing.assert_array_equal(weights(streamed.model)[name], value)


@pytest.mark.parametrize("run", ["dynamic", "weight-only", "prune"])
def test_a_mapped_model_with_weights_in_branches(run, tmp_path):
    """Weights inside If branches stream too (and bodies sharing a weight still keep one copy)."""
    model, _ = if_model()
    path = tmp_path / "branches.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="branches.onnx.data", size_threshold=0)
    streamed = RUNS[run](model_io.load_model(path, read_weights=False))
    in_memory = RUNS[run](model_io.load_model(path))
    model_io.save_model(streamed, tmp_path / "streamed.onnx")
    model_io.save_model(in_memory, tmp_path / "in_memory.onnx")
    feed = {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    for rate in (16000, 8000):
        feed["sr"] = np.array(rate, np.int64)
        (expected,) = create_session(tmp_path / "in_memory.onnx").run(None, feed)
        (got,) = create_session(tmp_path / "streamed.onnx").run(None, feed)
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_only_quantizes_a_few_columns_at_a_time_to_the_same_codes(transposed, symmetric, monkeypatch):
    """Blocks run along K within one output column: quantizing 7 columns at a time gives the whole weight's codes."""
    monkeypatch.setattr(weight_only, "COLUMN_CHUNK_BYTES", 4 * 100 * 7)
    weight = np.random.default_rng(0).standard_normal((100, 45)).astype(np.float32)
    stored = numpy_helper.from_array(np.ascontiguousarray(weight.T) if transposed else weight, "w")
    candidate = weight_only._Candidate(onnx.NodeProto(), "w", 100, 45, stored, transposed, None)
    chunked, error = weight_only._quantized_by_columns(candidate, 4, 32, symmetric)
    whole = weight_only.quantize_weight(weight, 4, 32, symmetric)
    np.testing.assert_array_equal(chunked.codes, whole.codes)
    np.testing.assert_array_equal(chunked.scales, whole.scales)
    if symmetric:
        assert chunked.zero_points is None and whole.zero_points is None
    else:
        np.testing.assert_array_equal(chunked.zero_points, whole.zero_points)
    assert error == pytest.approx(weight_only._relative_error(weight, whole.dequantize()), rel=1e-5)


@pytest.mark.parametrize("per_channel", [True, False])
def test_dynamic_scales_and_codes_from_row_blocks_equal_the_whole_weight(per_channel, monkeypatch):
    """int8 scales from per-block column maxima and codes a block of rows at a time: the whole weight's."""
    monkeypatch.setattr(dynamic, "ROW_CHUNK_BYTES", 4 * 30 * 7)  # 7 rows of 30 columns per block
    weight = np.random.default_rng(2).standard_normal((100, 30)).astype(np.float32)
    whole = scheme.weight_params(weight, 1 if per_channel else None)
    blocked = scheme.weight_params(dynamic._column_bounds(weight), 1 if per_channel else None)
    np.testing.assert_array_equal(blocked.scale, whole.scale)
    np.testing.assert_array_equal(dynamic._quantized_by_rows(weight, blocked), scheme.quantize(weight, whole))


def test_session_copies_go_when_timed_and_a_killed_runs_copies_at_the_next_run(tmp_path):
    model = build_decoder(CONFIGS["tiny"], tmp_path / "decoder.onnx")
    stale = tmp_path / f"{model_io.SESSIONS_PREFIX}999999999-x"
    stale.mkdir()
    (stale / "model0.onnx.data").write_bytes(b"left by a killed run")
    mapped = model_io.load_model(model, read_weights=False)
    before = {p.name for p in tmp_path.iterdir()} - {stale.name}
    with model_io.on_disk(mapped) as (path,):
        # a skeleton beside the weights, pointing at them by name: no weight copied
        assert not stale.exists() and path.parent == tmp_path.resolve()
        assert {p.name for p in tmp_path.iterdir()} == before | {path.name}
        assert path.stat().st_size < 64 * 1024
        np.testing.assert_array_equal(logits(path), logits(model))
    assert {p.name for p in tmp_path.iterdir()} == before


def test_weights_in_two_folders_are_copied_for_the_session(tmp_path):
    """A model whose weights live in several folders cannot point at them by name: they are copied."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    first = model_io.load_model(build_decoder(CONFIGS["tiny"], tmp_path / "a" / "decoder.onnx"), read_weights=False)
    second = model_io.load_model(build_decoder(CONFIGS["tiny"], tmp_path / "b" / "decoder.onnx"),
                                 read_weights=False)
    with model_io.on_disk(first, second) as (one, two):
        assert one.parent == two.parent and one.parent.name.startswith(model_io.SESSIONS_PREFIX)
        np.testing.assert_array_equal(logits(one), logits(two))
    assert not one.parent.exists()


def test_leftovers_of_another_machine_are_not_judged_by_this_ones_processes(tmp_path):
    """Two containers sharing one folder: a spill file tagged with another host is kept even when its PID is not
    alive here; this host's dead runs go, its live ones stay."""
    other_host = tmp_path / f"{model_io.SPILL_PREFIX}999999999@0123abcd-x.spill"
    dead_here = tmp_path / f"{model_io.SPILL_PREFIX}999999999@{model_io._owner_tag().split('@')[1]}-y.spill"
    alive_here = tmp_path / f"{model_io.SPILL_PREFIX}{model_io._owner_tag()}-z.spill"
    for path in (other_host, dead_here, alive_here):
        path.write_bytes(b"spill")
    model_io._remove_leftovers(tmp_path, model_io.SPILL_PREFIX)
    assert other_host.exists() and not dead_here.exists() and alive_here.exists()
