"""Graph shapes from real exporters: a stateful voice-activity-style model whose whole network sits in the two
branches of an If on a scalar sample rate (issue 14), quantized and pruned by the CLI, as users run it.

    python -m bench.run graph_shapes

The model (built here with onnx.helper, random weights, weights in Constant nodes as the exporter writes them):
inputs x [1, 256] (one audio frame's features), sr (scalar), state [2, 1, 512]; each branch runs a recurrent
cell h = tanh(x Wx + state[0] Wh), two more layers and a sigmoid speech probability; state_out = [h, state[0]].
The task metric runs whole sequences with the state fed back (not one step): per-step probabilities against
fp32 (largest difference, decisions at 0.5 that agree), final state cosine. Size on disk and CPU time per
sequence (1 thread, thread CPU time) next to fp32, all measured in this run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SECTION = "graph_shapes"
FRAME, HIDDEN, STEPS, SEQUENCES = 256, 512, 64, 8
RATES = (16000, 8000)


def log(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def _branch(prefix: str, rng: np.random.Generator) -> onnx.GraphProto:
    def weight(name, *shape, scale):
        return helper.make_node("Constant", [], [f"{prefix}_{name}"], name=f"{prefix}_const_{name}",
                                value=numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32),
                                                              f"{prefix}_{name}"))
    p = prefix
    nodes = [weight("Wx", FRAME, HIDDEN, scale=0.06), weight("Wh", HIDDEN, HIDDEN, scale=0.04),
             weight("W2", HIDDEN, HIDDEN, scale=0.05), weight("Wo", HIDDEN, 1, scale=0.08),
             helper.make_node("Gather", ["state", "zero"], [f"{p}_h0"], axis=0, name=f"{p}_previous"),
             helper.make_node("MatMul", ["x", f"{p}_Wx"], [f"{p}_xw"], name=f"{p}_input"),
             helper.make_node("MatMul", [f"{p}_h0", f"{p}_Wh"], [f"{p}_hw"], name=f"{p}_recurrent"),
             helper.make_node("Add", [f"{p}_xw", f"{p}_hw"], [f"{p}_pre"], name=f"{p}_add"),
             helper.make_node("Tanh", [f"{p}_pre"], [f"{p}_h"], name=f"{p}_tanh"),
             helper.make_node("MatMul", [f"{p}_h", f"{p}_W2"], [f"{p}_d"], name=f"{p}_dense"),
             helper.make_node("Relu", [f"{p}_d"], [f"{p}_r"], name=f"{p}_relu"),
             helper.make_node("MatMul", [f"{p}_r", f"{p}_Wo"], [f"{p}_logit"], name=f"{p}_head"),
             helper.make_node("Sigmoid", [f"{p}_logit"], [f"{p}_prob"], name=f"{p}_sigmoid"),
             helper.make_node("Unsqueeze", [f"{p}_h", "zero_axis"], [f"{p}_h1"], name=f"{p}_h_axis"),
             helper.make_node("Unsqueeze", [f"{p}_h0", "zero_axis"], [f"{p}_h01"], name=f"{p}_h0_axis"),
             helper.make_node("Concat", [f"{p}_h1", f"{p}_h01"], [f"{p}_state"], axis=0, name=f"{p}_state_out")]
    return helper.make_graph(nodes, prefix, [], [
        helper.make_tensor_value_info(f"{p}_prob", TensorProto.FLOAT, [1, 1]),
        helper.make_tensor_value_info(f"{p}_state", TensorProto.FLOAT, [2, 1, HIDDEN])])


def vad_like_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Equal", ["sr", "rate16k"], ["is16k"], name="is_16k"),
             helper.make_node("If", ["is16k"], ["prob", "state_out"], name="by_rate",
                              then_branch=_branch("r16k", rng), else_branch=_branch("r8k", rng))]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, FRAME]),
              helper.make_tensor_value_info("sr", TensorProto.INT64, []),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 1, HIDDEN])]
    outputs = [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 1]),
               helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, 1, HIDDEN])]
    initializers = [numpy_helper.from_array(np.array(16000, np.int64), "rate16k"),
                    numpy_helper.from_array(np.array(0, np.int64), "zero"),
                    numpy_helper.from_array(np.array([0], np.int64), "zero_axis")]
    graph = helper.make_graph(nodes, "vad_like", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def sequences(seed: int) -> list[tuple[int, np.ndarray]]:
    """(sample rate, frames [STEPS, 1, FRAME]); frames drift slowly like features of real audio."""
    rng = np.random.default_rng(seed)
    found = []
    for index in range(SEQUENCES):
        steps = np.cumsum(rng.standard_normal((STEPS, 1, FRAME)) * 0.3, axis=0) + rng.standard_normal((1, 1, FRAME))
        found.append((RATES[index % 2], steps.astype(np.float32)))
    return found


class Runner:
    """Runs whole sequences with the state fed back, on one thread, timing the work by thread CPU time."""

    def __init__(self, path: Path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(self, rate: int, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        state = np.zeros((2, 1, HIDDEN), np.float32)
        probabilities = []
        started = time.thread_time()
        for frame in frames:
            prob, state = self.session.run(None, {"x": frame, "sr": np.array(rate, np.int64), "state": state})
            probabilities.append(float(prob[0, 0]))
        return np.array(probabilities), state, time.thread_time() - started


def calibration_data(model_path: Path, path: Path) -> None:
    """Stacked complete feeds (stack layout) with the states the fp32 model really reaches."""
    runner = Runner(model_path)
    xs, rates, states = [], [], []
    for rate, frames in sequences(seed=1)[:4]:
        state = np.zeros((2, 1, HIDDEN), np.float32)
        for frame in frames[::4]:
            xs.append(frame)
            rates.append(rate)
            states.append(state)
            _, state = runner.session.run(None, {"x": frame, "sr": np.array(rate, np.int64), "state": state})
    np.savez(path, x=np.stack(xs), sr=np.array(rates, np.int64), state=np.stack(states))


def compressq(*args: str | Path) -> dict:
    command = [sys.executable, "-m", "compressq", *map(str, args), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout)


def compare(reference: Runner, candidate: Runner, data) -> dict[str, float]:
    worst, agree, total, cosines, time_ref, time_new = 0.0, 0, 0, [], 0.0, 0.0
    for rate, frames in data:
        p_ref, s_ref, t_ref = reference.run(rate, frames)
        p_new, s_new, t_new = candidate.run(rate, frames)
        worst = max(worst, float(np.abs(p_ref - p_new).max()))
        agree += int(np.sum((p_ref > 0.5) == (p_new > 0.5)))
        total += len(p_ref)
        cosines.append(float(s_ref.ravel() @ s_new.ravel() / (np.linalg.norm(s_ref) * np.linalg.norm(s_new))))
        time_ref, time_new = time_ref + t_ref, time_new + t_new
    return {"max_prob_diff": worst, "decisions_agree": 100 * agree / total, "state_cosine": min(cosines),
            "speedup": time_ref / time_new}


def run(table) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-graph-shapes-") as folder:
        folder = Path(folder)
        fp32 = folder / "vad_like.onnx"
        onnx.save_model(vad_like_model(), str(fp32))
        calibration = folder / "calibration.npz"
        calibration_data(fp32, calibration)
        variants = {
            "static int8": ["quantize", fp32, "-d", calibration, "--data-layout", "stack"],
            # The same with every planned node kept int8 whatever the timing says: accuracy of int8 in branches.
            "static int8 (speed check off)": ["quantize", fp32, "-d", calibration, "--data-layout", "stack",
                                              "--no-speed-check"],
            "dynamic int8": ["quantize", fp32, "--mode", "dynamic"],
            "weight-only int4": ["quantize", fp32, "--mode", "weight-only"],
            "prune 50% unstructured": ["prune", fp32, "-s", "0.5", "--prune-first", "--prune-last"],
        }
        reference = Runner(fp32)
        data = sequences(seed=2)
        for label, args in variants.items():
            out = folder / f"variant_{len(list(folder.glob('variant_*')))}.onnx"
            started = time.perf_counter()
            summary = compressq(*args, "-o", out)
            log(f"{label}: {time.perf_counter() - started:.1f} s; notes: {summary.get('notes', [])[:2]}")
            figures = compare(reference, Runner(out), data)
            size = out.stat().st_size / fp32.stat().st_size
            where = f"If branches, {SEQUENCES} sequences x {STEPS} steps, state fed back"
            table.add(SECTION, f"vad-like If model, {label}: size vs fp32", f"{size:.3f}x", None,
                      "never bigger", size <= 1.0)
            table.add(SECTION, f"vad-like If model, {label}: CPU time speedup ({where})", figures["speedup"])
            table.add(SECTION, f"vad-like If model, {label}: decisions agreeing with fp32 (%)",
                      figures["decisions_agree"])
            table.add(SECTION, f"vad-like If model, {label}: largest probability difference",
                      figures["max_prob_diff"])
            table.add(SECTION, f"vad-like If model, {label}: final state cosine (worst sequence)",
                      figures["state_cosine"])
