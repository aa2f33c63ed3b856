"""Big models, memory (issue 12 item 2): peak RSS of every command against the model's size on disk.

    python -m bench.run big_models              the half-gb decoder (0.51 GB of weights in external data)
    CQ_BIG_MODELS_LARGE=1 python -m bench.run big_models      also the over-2gb one (2.33 GB; minutes)

The model is bench/decoder_model.py's generated LLaMA-style decoder, built once in .bench/big and reused. Each
command runs in a fresh process (bench/ort_baseline.run_fresh) whose own peak RSS (VmHWM, the whole process:
interpreter, imports, onnxruntime) is divided by the model's size on disk (graph + .data):

  inspect                   <= 0.5x
  quantize --mode dynamic   <= 1.5x   (int8, --no-speed-check: timing runs onnxruntime on both models)
  quantize --mode weight-only --bits 4 --block-size 32   <= 1.5x   (no calibration data, --no-speed-check)
  prune -s 0.5              <= 1.5x   (unstructured, no calibration data)

next to onnxruntime's own quantize_dynamic (int8, external data) and MatMulNBitsQuantizer (4 bits, blocks of 32,
symmetric; bench/llm_bench.ort_matmul_nbits) on the same file. Every output is then loaded in onnxruntime.

The commands run through compressq's CLI with its load step reading the weights mapped
(`load_model(read_weights=False)`), as the streaming rewrite needs: `cli/quantize.py` and `cli/prune.py` still
call `load_model(model)`, which reads every weight (one line each to change; `compressq_streaming` below patches
exactly that call and nothing else). On the half-gb model two rows without a bar show `quantize --mode dynamic`
as users run it by default, with the speed check (onnxruntime then holds both models' weights): with the load
mapped, and with the CLI as it is today.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.table import log

SECTION = "big_models"
WORK = Path(".bench/big")
BARS = {"inspect": 0.5, "quantize dynamic": 1.5, "quantize weight-only int4": 1.5, "prune 50%": 1.5}
BLOCK_SIZE = 32


# --------------------------------------------------------------------------------------------- entry points
# Called in fresh processes by bench.rss_runner; heavy imports stay inside so that each process pays only its own.


def compressq_streaming(arguments: list[str], map_weights: bool = True) -> dict:
    """`compressq ARGUMENTS...`; with `map_weights` the CLI loads the model's weights mapped (the one call the
    CLI still makes differently), everything else as a user runs it."""
    import functools

    import compressq.cli.prune as prune_command
    import compressq.cli.quantize as quantize_command
    from bench.llm_bench import compressq_cli
    from compressq.io import load_model

    if map_weights:
        for command in (quantize_command, prune_command):
            command.load_model = functools.partial(load_model, read_weights=False)  # type: ignore[attr-defined]
    return compressq_cli(arguments)


def ort_dynamic(model_path: str, out_path: str) -> dict:
    """onnxruntime's quantize_dynamic as its documentation shows (int8 weights, external data for big models)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)
    quantize_dynamic(model_path, out_path, weight_type=QuantType.QInt8, use_external_data_format=True)
    return {}


def reloads(path: str) -> dict:
    """Whether onnxruntime loads the output (its own check: graph, kernels, external data)."""
    from compressq.runtime import create_session

    session = create_session(path)
    return {"outputs": len(session.get_outputs())}


# --------------------------------------------------------------------------------------------- the section


def decoder_path(size: str) -> Path:
    """The generated decoder of `size` in .bench/big, built on first use."""
    from bench.decoder_model import CONFIGS, build_decoder

    path = WORK / f"decoder-{size}.onnx"
    if not (path.exists() and path.with_name(path.name + ".data").exists()):
        WORK.mkdir(parents=True, exist_ok=True)
        log(f"building the {size} decoder in {WORK} (once)")
        build_decoder(CONFIGS[size], path)
    return path


def commands(model: Path, out: Path) -> dict[str, list[str]]:
    return {
        "inspect": ["inspect", str(model), "--json"],
        "quantize dynamic": ["quantize", str(model), "--mode", "dynamic", "--no-speed-check", "-o",
                             str(out / "dynamic.onnx")],
        "quantize weight-only int4": ["quantize", str(model), "--mode", "weight-only", "--bits", "4",
                                      "--block-size", str(BLOCK_SIZE), "--no-speed-check", "-o",
                                      str(out / "int4.onnx")],
        "prune 50%": ["prune", str(model), "-s", "0.5", "-o", str(out / "pruned.onnx"), "--json"],
    }


def measure_size(table, size: str, plain_cli: bool) -> None:
    import shutil
    import tempfile

    from bench.ort_baseline import run_fresh
    from compressq.io import file_size

    model = decoder_path(size)
    model_bytes = file_size(model)
    table.add(SECTION, f"decoder {size}: on disk (graph + .data)", f"{model_bytes / 2**30:.2f} GiB", None)
    with tempfile.TemporaryDirectory(prefix="big-", dir=WORK) as folder:
        out = Path(folder)
        ort_runs = {
            "quantize dynamic": run_fresh(f"bench.{SECTION}_bench:ort_dynamic",
                                          {"model_path": str(model), "out_path": str(out / "ort-dynamic.onnx")}),
            "quantize weight-only int4": run_fresh("bench.llm_bench:ort_matmul_nbits",
                                                   {"model_path": str(model), "out_path": str(out / "ort-int4.onnx"),
                                                    "block_size": BLOCK_SIZE}),
        }
        for name, process in ort_runs.items():
            log(f"onnxruntime {name}: {process.peak_rss_bytes / model_bytes:.2f}x"
                + (f" FAILED: {process.error}" if process.error else ""))
        for name, arguments in commands(model, out).items():
            process = run_fresh(f"bench.{SECTION}_bench:compressq_streaming", {"arguments": arguments})
            ratio = process.peak_rss_bytes / model_bytes
            log(f"compressq {name}: {ratio:.2f}x in {process.seconds:.0f} s"
                + (f" FAILED: {process.error}" if process.error else ""))
            reference = ort_runs.get(name)
            table.add(SECTION, f"{size}: {name}, peak RSS / model size (GiB)",
                      f"{ratio:.2f}x ({process.peak_rss_bytes / 2**30:.2f})" if not process.error
                      else f"failed: {process.error[:80]}",
                      f"onnxruntime {reference.peak_rss_bytes / model_bytes:.2f}x" if reference and not
                      reference.error else None,
                      f"<= {BARS[name]}x", not process.error and ratio <= BARS[name])
            output = _output_of(arguments)
            if output is not None and not process.error:
                loaded = run_fresh(f"bench.{SECTION}_bench:reloads", {"path": str(output)})
                table.add(SECTION, f"{size}: {name} output loads in onnxruntime",
                          "yes" if not loaded.error else f"no: {loaded.error[:80]}", None, "loads",
                          not loaded.error)
                _remove_output(output)
        if plain_cli:
            _speed_check_rows(table, size, model, model_bytes, out)
        shutil.rmtree(out, ignore_errors=True)


def _speed_check_rows(table, size: str, model: Path, model_bytes: int, out: Path) -> None:
    """quantize --mode dynamic as a user runs it by default (the speed check runs onnxruntime on both models, on
    real-looking prompts), with the load mapped and as the CLI loads today; no bar: onnxruntime holds the weights."""
    import numpy as np

    from bench.decoder_model import CONFIGS, empty_cache, step_feed, token_ids
    from bench.ort_baseline import run_fresh

    config = CONFIGS[size]
    prompts = out / "prompts.npz"
    np.savez(prompts, **step_feed(token_ids(config, 4, 16, seed=3), empty_cache(config, 4)))
    arguments = ["quantize", str(model), "--mode", "dynamic", "-d", str(prompts), "-o", str(out / "checked.onnx")]
    for mapped, how in ((True, "load mapped"), (False, "CLI as it is: load reads weights")):
        process = run_fresh(f"bench.{SECTION}_bench:compressq_streaming",
                            {"arguments": arguments, "map_weights": mapped})
        table.add(SECTION, f"{size}: quantize dynamic with the speed check (4x16 prompts), {how}, peak RSS / size",
                  f"{process.peak_rss_bytes / model_bytes:.2f}x" if not process.error
                  else f"failed: {process.error[:80]}", None)


def _output_of(arguments: list[str]) -> Path | None:
    return Path(arguments[arguments.index("-o") + 1]) if "-o" in arguments else None


def _remove_output(path: Path) -> None:
    for leftover in (path, path.with_name(path.name + ".data")):
        leftover.unlink(missing_ok=True)


def run(table) -> None:
    measure_size(table, "half-gb", plain_cli=True)
    if os.environ.get("CQ_BIG_MODELS_LARGE") == "1":
        measure_size(table, "over-2gb", plain_cli=False)
