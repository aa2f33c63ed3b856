"""onnxruntime's own static quantizer as the baseline compressq must beat, measured honestly.

    python -m bench.ort_baseline [SUBJECT ...] [--methods minmax,entropy] [--runs 20] [--json OUT]
    python -m bench.ort_baseline --micro            single-op models: which ops ORT runs faster in int8
    python -m bench.ort_baseline --list

Subjects: the real models of bench/real_models.py (when present in .bench/models), the digits sample models
and the generated ResNet-18 (224x224) and BERT (2 layers, seq 128). For each: fp32 vs ORT's QDQ output
(latency with 1 intra-op thread, interleaved; file size; output agreement per calibration method), what
ORT's graph optimizer turned the QDQ graph into (integer kernels vs Q/DQ left around float ops), and a
per-op-type profile of both graphs. Every quantization runs in a fresh subprocess (bench/rss_runner.py) so
its wall time and peak RSS can be compared with compressq's, measured the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from compressq.runtime import create_session, optimized_graph

REPO = Path(__file__).resolve().parent.parent
WORK = Path(".bench/ort_baseline")
METHODS = ("minmax", "percentile", "entropy", "distribution")
INTEGER_KERNELS = {
    "QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QGemm",
    "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
    "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat", "QLinearSoftmax",
    "QLinearWhere", "QLinearReduceMean", "QAttention", "QLinearConvTranspose", "NhwcQLinearConv",
}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


# --------------------------------------------------------------------------------------------- quantizing


class FeedsReader:
    """onnxruntime's CalibrationDataReader over a list of feeds (built lazily: the ABC lives in ORT)."""

    def __new__(cls, feeds: Sequence[dict]):
        from onnxruntime.quantization import CalibrationDataReader

        class _Reader(CalibrationDataReader):
            def __init__(self, items: Sequence[dict]):
                self.items = list(items)
                self.position = 0

            def get_next(self):
                if self.position >= len(self.items):
                    return None
                self.position += 1
                return self.items[self.position - 1]

            def rewind(self):
                self.position = 0

        return _Reader(feeds)


def ort_quantize_static(model_path: str | os.PathLike, feeds: Sequence[dict], out_path: str | os.PathLike,
                        method: str = "minmax", preprocess: bool = True, activations: str = "uint8",
                        nodes_to_exclude: Sequence[str] = ()) -> dict:
    """quantize_static as onnxruntime's documentation suggests: quant_pre_process first, QDQ format,
    per-channel int8 weights, uint8 activations. Returns notes (how pre-processing went).
    `activations` and `nodes_to_exclude` exist for the single-op experiments only."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy, "distribution": CalibrationMethod.Distribution}
    notes: dict = {"method": method, "preprocess": "skipped"}
    with tempfile.TemporaryDirectory(prefix="ort-preprocess-") as folder:
        source = str(model_path)
        opset = _onnx_opset(source)
        if opset < PER_CHANNEL_OPSET:
            # quantize_static keeps opset 11/12 and writes per-channel DequantizeLinear with `axis`, which
            # only exists from opset 13: the output does not load. Users have to convert first.
            source = os.path.join(folder, "opset13.onnx")
            onnx.save(onnx.version_converter.convert_version(onnx.load(str(model_path)), PER_CHANNEL_OPSET), source)
            notes["opset"] = f"converted {opset} -> {PER_CHANNEL_OPSET} (ORT's per-channel output is invalid below 13)"
        if preprocess:
            source, notes["preprocess"] = _pre_process(source, os.path.join(folder, "pre.onnx"))
        activation_type = QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8
        settings = dict(quant_format=QuantFormat.QDQ, per_channel=True, activation_type=activation_type,
                        weight_type=QuantType.QInt8, calibrate_method=methods[method],
                        nodes_to_exclude=list(nodes_to_exclude))
        try:
            quantize_static(source, str(out_path), FeedsReader(feeds), **settings)
        except ValueError as exc:
            if "truth value of an array" not in str(exc):
                raise
            # ORT 1.32 crashes in _adjust_weight_scale_for_int32_bias on some graphs (magika); its own
            # option to skip that step is the documented way around it (the time includes both tries)
            notes["retry"] = "crashed in _adjust_weight_scale_for_int32_bias; QDQDisableWeightAdjustForInt32Bias"
            quantize_static(source, str(out_path), FeedsReader(feeds), **settings,
                            extra_options={"QDQDisableWeightAdjustForInt32Bias": True})
    return notes


PER_CHANNEL_OPSET = 13


def _onnx_opset(path: str) -> int:
    model = onnx.load(path, load_external_data=False)
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@contextlib.contextmanager
def _in_scratch_folder():
    before = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="ort-pre-process-") as folder:
        os.chdir(folder)
        try:
            yield
        finally:
            os.chdir(before)


def _pre_process(model_path: str, out_path: str) -> tuple[str, str]:
    """quant_pre_process (symbolic shape inference + ORT basic optimization + ONNX shape inference);
    when it fails, retry without symbolic shape inference, then give up and quantize the original."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    errors = []
    model_path, out_path = os.path.abspath(model_path), os.path.abspath(out_path)
    for skip_symbolic in (False, True):
        try:
            with _in_scratch_folder():  # its symbolic shape inference leaves temp .onnx/.data files in the cwd
                quant_pre_process(model_path, out_path, skip_symbolic_shape=skip_symbolic)
            return out_path, "ok" if not skip_symbolic else f"ok without symbolic shapes ({errors[0]})"
        except Exception as exc:  # ORT raises bare Exceptions from its shape inference
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
    return model_path, "failed, original used: " + " | ".join(errors)


def ort_quantize_files(model_path: str, calibration_npz: str, out_path: str, method: str = "minmax",
                       batch_size: int = 1) -> dict:
    """Entry point for a fresh subprocess: calibration arrays (samples first) from an .npz."""
    with np.load(calibration_npz) as data:
        arrays = {key: data[key] for key in data.files}
    count = len(next(iter(arrays.values())))
    feeds = [{k: v[start:start + batch_size] for k, v in arrays.items()} for start in range(0, count, batch_size)]
    return ort_quantize_static(model_path, feeds, out_path, method)


# --------------------------------------------------------------------------------------------- peak RSS


@dataclass
class ProcessRun:
    seconds: float          # the function call, timed inside the child
    peak_rss_bytes: int     # the child's VmHWM (whole process, imports included; 0 if it never reported)
    process_seconds: float  # the child from spawn to exit
    result: object = None
    error: str | None = None
    cpu_seconds: float = float("nan")  # the child's user + system CPU, its threads included (RUSAGE_CHILDREN)


RSS_LIMIT_BYTES = 8 * 2**30  # the machine has 24 GiB shared with others: stop a calibration that hoards


def run_fresh(target: str, arguments: dict, timeout: float = 1800,
              rss_limit: int = RSS_LIMIT_BYTES) -> ProcessRun:
    """Call MODULE:FUNCTION(**arguments) in a fresh Python process; its own time, CPU time and peak memory.
    A child whose resident memory passes `rss_limit` is killed and reported as such."""
    before = _children_cpu_seconds()
    run = _run_child(target, arguments, timeout, rss_limit)
    run.cpu_seconds = _children_cpu_seconds() - before
    return run


def _children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run_child(target: str, arguments: dict, timeout: float, rss_limit: int) -> ProcessRun:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "bench.rss_runner", target, json.dumps(arguments)]
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, cwd=os.getcwd())
        try:
            status = _wait(child, timeout, rss_limit)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            return ProcessRun(float("nan"), 0, time.perf_counter() - started, error=f"timed out after {timeout} s")
        except MemoryError:
            child.kill()
            child.wait()
            return ProcessRun(float("nan"), rss_limit, time.perf_counter() - started,
                              error=f"killed: resident memory passed {rss_limit / 2**30:.0f} GiB")
        process_seconds = time.perf_counter() - started
        stdout.seek(0)
        stderr.seek(0)
        lines = stdout.read().decode(errors="replace").strip().splitlines()
        # The child's own VmHWM: wait4's ru_maxrss would also count the parent's pages at fork time
        report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
        peak = int(report.get("peak_rss_bytes", 0))
        if status != 0 or "seconds" not in report:
            tail = stderr.read().decode(errors="replace").strip().splitlines()[-2:]
            error = report.get("error") or " | ".join(tail)[-400:]
            return ProcessRun(float("nan"), peak, process_seconds, error=error)
        return ProcessRun(report["seconds"], peak, process_seconds, report.get("result"))


def _wait(child: subprocess.Popen, timeout: float, rss_limit: int) -> int:
    """The child's exit code; raises TimeoutExpired, or MemoryError when its RSS passes `rss_limit`."""
    deadline = time.monotonic() + timeout
    while True:
        status = child.poll()
        if status is not None:
            return status
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(child.args, timeout)
        if _resident_bytes(child.pid) > rss_limit:
            raise MemoryError
        time.sleep(0.02)


def _resident_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_of(fn_module_path: str, args: dict, timeout: float = 1800) -> tuple[float, int]:
    """(seconds of the call, peak RSS in bytes) of MODULE:FUNCTION(**args) run in a fresh process."""
    run = run_fresh(fn_module_path, args, timeout)
    if run.error:
        raise RuntimeError(f"{fn_module_path} failed: {run.error}")
    return run.seconds, run.peak_rss_bytes


# --------------------------------------------------------------------------------------------- subjects


@dataclass
class Subject:
    name: str
    path: Path
    calibration: list[dict]           # feeds, in the batch size they are calibrated with
    evaluation: list[dict]
    data: str                         # rendered | real | synthetic | trained-sample
    agreement: Callable[[list, list], dict]
    labels: np.ndarray | None = None  # per evaluation sample, when the data has them
    batch_note: str = "batch 1"


def _generic_agreement(reference: list, test: list) -> dict:
    from compressq.measure.metrics import cosine_similarity, top1_agreement

    ref, got = np.concatenate(reference), np.concatenate(test)
    result = {"cosine": cosine_similarity(ref, got)}
    if ref.ndim == 2:
        result["top1_agreement"] = top1_agreement(ref, got)
    return result


def _split(arrays: dict[str, np.ndarray], batch: int, limit: int | None = None) -> list[dict]:
    count = len(next(iter(arrays.values())))
    count = min(count, limit) if limit else count
    return [{k: v[s:min(s + batch, count)] for k, v in arrays.items()} for s in range(0, count, batch)]


def subjects(names: Sequence[str], calib_samples: int, eval_samples: int) -> list[Subject]:
    from bench import real_models

    found = real_models.present()
    chosen = []
    for name in names:
        if name in real_models.BY_NAME:
            if name not in found:
                print(f"skipping {name}: not in .bench/models (run python -m bench.real_models)", file=sys.stderr)
                continue
            big = name in ("ocr_det", "captcha_det")
            calib = real_models.calibration_feeds(name, calib_samples // 4 if big else calib_samples, seed=0)
            evaluation = real_models.calibration_feeds(name, eval_samples // 2 if big else eval_samples, seed=1)
            kind = "real" if name in ("magika", "minilm") else "rendered"
            chosen.append(Subject(name, found[name], calib, evaluation, kind,
                                  lambda r, t, n=name, f=evaluation: real_models.agreement(n, r, t, f)))
        elif name in ("digits_cnn", "digits_mobilenet"):
            with np.load(REPO / "sample_models/digits_calib.npz") as c:
                calib = {"input": c["input"]}
            with np.load(REPO / "sample_models/digits_eval.npz") as e:
                evaluation, labels = {"input": e["input"]}, e["labels"]
            chosen.append(Subject(name, REPO / f"sample_models/{name}.onnx", _split(calib, 32), _split(evaluation, 60),
                                  "trained-sample", _generic_agreement, labels, "batch 60 (eval), 32 (calib)"))
        elif name in ("resnet18", "bert2"):
            chosen.append(_generated_subject(name, calib_samples, eval_samples))
        else:
            raise SystemExit(f"unknown subject {name}")
    return chosen


def _generated_subject(name: str, calib_samples: int, eval_samples: int) -> Subject:
    from sample_models.generated import bert_model, make_inputs, resnet_model

    path = WORK / f"{name}.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(resnet_model() if name == "resnet18" else bert_model(layers=2), str(path))
    model = onnx.load(str(path))
    count = max(4, calib_samples // 4)  # full-size models: fewer samples keep ORT's histograms in memory

    def feeds(seed0: int, n: int) -> list[dict]:
        out = []
        for i in range(n):
            feed = make_inputs(model, batch=1, seed=seed0 + i)
            if "attention_mask" in feed:  # padded sequences, so the -10000 mask fill is exercised
                valid = int(np.random.default_rng(seed0 + i).integers(32, 129))
                feed["attention_mask"][:, valid:] = 0
            out.append(feed)
        return out

    return Subject(name, path, feeds(0, count), feeds(10_000, max(4, eval_samples // 4)), "synthetic",
                   _generic_agreement)


# --------------------------------------------------------------------------------------------- measuring


def run_outputs(path: Path, feeds: list[dict], threads: int = 1) -> list[np.ndarray]:
    session = create_session(str(path), "cpu", threads=threads)
    return [session.run(None, feed)[0] for feed in feeds]


def time_models(paths: dict[str, Path], feeds: list[dict], runs: int, warmup: int = 3) -> dict[str, float]:
    """Median ms per run, sessions taking turns (1 intra-op thread, ORT_ENABLE_ALL)."""
    sessions = {name: create_session(str(path), "cpu", threads=1) for name, path in paths.items()}
    try:
        from compressq.measure.latency import time_interleaved
    except ImportError:  # the local equivalent: A B A B ..., median
        def time_interleaved(sessions, feeds, runs, warmup):
            for turn in range(warmup):
                for s in sessions.values():
                    s.run(None, feeds[turn % len(feeds)])
            samples = defaultdict(list)
            for turn in range(runs):
                for name, s in sessions.items():
                    start = time.perf_counter()
                    s.run(None, feeds[turn % len(feeds)])
                    samples[name].append((time.perf_counter() - start) * 1000)
            return {n: type("S", (), {"median_ms": float(np.median(v))}) for n, v in samples.items()}
    stats = time_interleaved(sessions, feeds, runs=runs, warmup=warmup)
    return {name: stat.median_ms for name, stat in stats.items()}


def kernel_census(path: Path) -> dict:
    """What ORT's optimizer made of a graph: op counts (domain-qualified when not ONNX), integer kernels,
    and the float ops that Q/DQ pairs were left around (DQ -> op and op -> Q edges)."""
    model = optimized_graph(onnx.load(str(path)))
    nodes = list(model.graph.node)
    initializers = {t.name for t in model.graph.initializer}
    producer = {out: node for node in nodes for out in node.output}
    consumers = defaultdict(list)
    for node in nodes:
        for name in node.input:
            consumers[name].append(node)
    ops = Counter(_qualified(node) for node in nodes)
    dq_into, q_after, weight_dq_into = Counter(), Counter(), Counter()
    for node in nodes:
        if node.op_type == "DequantizeLinear":
            target = weight_dq_into if node.input[0] in initializers else dq_into
            for consumer in consumers[node.output[0]]:
                target[_qualified(consumer)] += 1
        elif node.op_type == "QuantizeLinear" and node.input[0] in producer:
            q_after[_qualified(producer[node.input[0]])] += 1
    integer = {op: n for op, n in ops.items() if op.split(".")[-1] in INTEGER_KERNELS}
    return {"ops": dict(ops.most_common()), "integer_kernels": integer,
            "quantize_linear": ops.get("QuantizeLinear", 0), "dequantize_linear": ops.get("DequantizeLinear", 0),
            "activation_dq_into": dict(dq_into.most_common()), "weight_dq_into": dict(weight_dq_into.most_common()),
            "q_after": dict(q_after.most_common())}


def _qualified(node: onnx.NodeProto) -> str:
    domain = node.domain if node.domain not in ("", "ai.onnx") else ""
    return f"{domain.split('.')[-1]}.{node.op_type}" if domain else node.op_type


def profile_by_op(path: Path, feeds: list[dict], runs: int = 10) -> dict[str, float]:
    """ms per inference spent in each op type (ORT's profiler, 1 thread, after 2 warm-up runs)."""
    per_op: dict[str, float] = defaultdict(float)
    for _, op_name, ms, _ in _node_events(path, feeds, runs):
        per_op[op_name] += ms
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


CONV_KERNELS = {"Conv", "FusedConv", "QLinearConv", "ConvInteger", "NhwcQLinearConv", "NhwcFusedConv"}


def conv_profile(path: Path, feeds: list[dict], runs: int = 10) -> dict[str, dict]:
    """ms per inference of every convolution, grouped by configuration: 'dw3x3 s1 c128 @28x28' or
    'conv1x1 s1 64->128 @56x56'. Configurations come from the optimized graph (group, kernel, weight) and
    the profiler's shapes, so the fp32 and quantized graphs can be compared configuration by configuration."""
    graph = optimized_graph(onnx.load(str(path))).graph
    nodes = {node.name: node for node in graph.node}
    weights = {t.name: list(t.dims) for t in graph.initializer}
    groups: dict[str, dict] = defaultdict(lambda: {"ms": 0.0, "count": 0, "kernels": set()})
    for name, op_name, duration_ms, output_shape in _node_events(path, feeds, runs):
        node = nodes.get(name)
        if node is None or op_name not in CONV_KERNELS:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = weights.get(node.input[3] if op_name == "QLinearConv" else node.input[1])
        if not weight or len(weight) != 4:
            continue
        cout, cin_per_group, kh, _ = weight
        group = int(attrs.get("group", 1))
        strides = attrs.get("strides", [1, 1])
        channels_last = output_shape and output_shape[-1] == cout and output_shape[1] != cout
        spatial = output_shape[1:3] if channels_last else output_shape[2:4]
        # fp32 NCHWc kernels pad channels to blocks of 16 (sometimes 8): round both graphs the same way
        if group > 1 and group == cout and cin_per_group == 1:
            key = f"dw{kh}x{kh} s{strides[0]} c{_block(cout)} @{spatial[0]}x{spatial[1]}"
        else:
            prefix = f"group{group} " if group > 1 else ""
            key = (f"{prefix}conv{kh}x{kh} s{strides[0]} {_block(cin_per_group * group)}->{_block(cout)} "
                   f"@{spatial[0]}x{spatial[1]}")
        groups[key]["ms"] += duration_ms
        groups[key]["count"] += 1
        groups[key]["kernels"].add(f"{node.domain.split('.')[-1] + '.' if node.domain else ''}{op_name}")
    return {k: {"ms": v["ms"], "count": v["count"], "kernels": sorted(v["kernels"])} for k, v in groups.items()}


def _block(channels: int) -> int:
    return channels if channels < 4 else -(-channels // 16) * 16


def _node_events(path: Path, feeds: list[dict], runs: int) -> list[tuple[str, str, float, list[int]]]:
    """(node name, op, ms per inference, output shape) for every node, averaged over `runs` after warm-up."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="ort-profile-") as folder:
        options.profile_file_prefix = os.path.join(folder, "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for i in range(2 + runs):
            session.run(None, feeds[i % len(feeds)])
        with open(session.end_profiling()) as handle:
            events = json.load(handle)
    per_run: list[list[dict]] = []
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            per_run.append([])
        elif event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time") and per_run:
            per_run[-1].append(event)
    # model_run events are written when a run ends, after its node events: attribute nodes to the run they
    # precede, and drop the first two (warm-up) runs
    # the median over runs per node, not the mean: on a shared 2-core machine a preempted run would
    # otherwise charge its wait to whichever node happened to be running
    timed_runs = per_run[2:]
    durations: dict[str, list[float]] = defaultdict(list)
    info: dict[str, tuple[str, list[int]]] = {}
    for run in timed_runs:
        per_node: dict[str, float] = defaultdict(float)
        for event in run:
            name = event["name"][: -len("_kernel_time")]
            per_node[name] += event["dur"] / 1000.0
            if name not in info:
                shapes = event["args"].get("output_type_shape") or [{}]
                shape = next(iter(shapes[0].values()), []) if shapes[0] else []
                info[name] = (event["args"].get("op_name", "?"), shape)
        for name, ms in per_node.items():
            durations[name].append(ms)
    return [(name, info[name][0], float(np.median(values + [0.0] * (len(timed_runs) - len(values)))), info[name][1])
            for name, values in durations.items()]


@dataclass
class SubjectResult:
    name: str
    data: str
    fp32_bytes: int
    ort_bytes: int | None = None
    fp32_ms: float | None = None
    ort_ms: float | None = None
    accuracy_fp32: float | None = None
    methods: dict = field(default_factory=dict)    # method -> {agreement..., seconds, peak_rss, preprocess}
    census: dict = field(default_factory=dict)
    profile_fp32: dict = field(default_factory=dict)
    profile_ort: dict = field(default_factory=dict)
    conv_fp32: dict = field(default_factory=dict)
    conv_ort: dict = field(default_factory=dict)


def measure(subject: Subject, methods: Sequence[str], runs: int, profile_runs: int) -> SubjectResult:
    from compressq.measure.metrics import top1_accuracy

    folder = WORK / subject.name
    folder.mkdir(parents=True, exist_ok=True)
    result = SubjectResult(subject.name, subject.data, subject.path.stat().st_size)
    npz = folder / "calibration.npz"
    np.savez(npz, **{k: np.concatenate([f[k] for f in subject.calibration]) for k in subject.calibration[0]})
    batch = len(next(iter(subject.calibration[0].values())))
    reference = run_outputs(subject.path, subject.evaluation)
    if subject.labels is not None:
        result.accuracy_fp32 = top1_accuracy(np.concatenate(reference), subject.labels)
    for method in methods:
        out = folder / f"ort_{method}.onnx"
        run = run_fresh("bench.ort_baseline:ort_quantize_files",
                        {"model_path": str(subject.path), "calibration_npz": str(npz), "out_path": str(out),
                         "method": method, "batch_size": batch})
        entry = {"seconds": run.seconds, "peak_rss_mb": run.peak_rss_bytes / 2**20,
                 "process_seconds": run.process_seconds}
        if run.error:
            entry["error"] = run.error
        else:
            entry.update({k: v for k, v in (run.result or {}).items() if k in ("preprocess", "opset", "retry")})
            outputs = run_outputs(out, subject.evaluation)
            entry.update(subject.agreement(reference, outputs))
            if subject.labels is not None:
                entry["accuracy"] = top1_accuracy(np.concatenate(outputs), subject.labels)
        result.methods[method] = entry
        print(f"  {subject.name} {method}: {json.dumps(entry, default=_round)}", file=sys.stderr)
    quantized = next((folder / f"ort_{m}.onnx" for m in methods if "error" not in result.methods[m]), None)
    if quantized is None:
        return result
    result.ort_bytes = quantized.stat().st_size
    timing_feeds = subject.evaluation[:4]
    times = time_models({"fp32": subject.path, "ort": quantized}, timing_feeds, runs)
    result.fp32_ms, result.ort_ms = times["fp32"], times["ort"]
    result.census = kernel_census(quantized)
    if profile_runs:
        result.profile_fp32 = profile_by_op(subject.path, timing_feeds, profile_runs)
        result.profile_ort = profile_by_op(quantized, timing_feeds, profile_runs)
        result.conv_fp32 = conv_profile(subject.path, timing_feeds, profile_runs)
        result.conv_ort = conv_profile(quantized, timing_feeds, profile_runs)
    return result


def _round(value):
    return round(value, 4) if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------------------------- single ops


@dataclass(frozen=True)
class MicroCase:
    name: str
    family: str
    build: Callable[[], onnx.ModelProto]
    exclude: tuple[str, ...] = ()  # node names ORT's quantizer leaves in float
    activations: str = "uint8"


def _micro_model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "micro", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _conv_case(cin: int, cout: int, size: int, kernel: int, group: int = 1, stride: int = 1, act: str | None = None,
               seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, np.sqrt(2.0 / (cin // group * kernel * kernel)), (cout, cin // group, kernel, kernel))
    bias = rng.normal(0, 0.1, cout)
    inits = [numpy_helper.from_array(weight.astype(np.float32), "w"),
             numpy_helper.from_array(bias.astype(np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], group=group, kernel_shape=[kernel, kernel],
                              strides=[stride, stride], pads=[kernel // 2] * 4)]
    last = "c"
    if act == "relu":
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    elif act == "hardswish":
        nodes.append(helper.make_node("HardSwish", ["c"], ["y"]))
    elif act == "silu":  # PyTorch's export: x * sigmoid(x)
        nodes += [helper.make_node("Sigmoid", ["c"], ["s"]), helper.make_node("Mul", ["c", "s"], ["y"])]
    elif act == "paddle_hardswish":  # paddle2onnx: x * clip(x + 3, 0, 6) / 6
        inits += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
                  (("three", 3.0), ("zero", 0.0), ("six", 6.0))]
        nodes += [helper.make_node("Add", ["c", "three"], ["a"]),
                  helper.make_node("Clip", ["a", "zero", "six"], ["cl"]),
                  helper.make_node("Mul", ["c", "cl"], ["m"]), helper.make_node("Div", ["m", "six"], ["y"])]
    elif act == "hardsigmoid_mul":  # paddle's SE gate / hardswish: x * HardSigmoid(x)
        nodes += [helper.make_node("HardSigmoid", ["c"], ["h"], alpha=0.2, beta=0.5),
                  helper.make_node("Mul", ["c", "h"], ["y"])]
    if act:
        last = "y"
    out_size = (size + stride - 1) // stride
    return _micro_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, size, size])],
                        [helper.make_tensor_value_info(last, TensorProto.FLOAT, [1, cout, out_size, out_size])], inits)


def _matmul_case(rows: int, inner: int, cols: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, inner ** -0.5, (inner, cols)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.02, cols).astype(np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    return _micro_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows, inner])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, cols])], inits)


def _pointwise_case(op: str, channels: int, size: int) -> onnx.ModelProto:
    """Conv 1x1 -> OP -> Conv 1x1: the op between two quantized convs, as in a real network."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, channels ** -0.5, (channels, channels, 1, 1)).astype(np.float32), n)
             for n in ("w1", "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], kernel_shape=[1, 1])]
    if op == "Add":  # residual add of the conv output and the block input
        nodes.append(helper.make_node("Add", ["a", "x"], ["b"]))
    elif op == "GlobalAveragePool+Mul":  # squeeze-excitation style gate
        nodes += [helper.make_node("GlobalAveragePool", ["a"], ["g"]), helper.make_node("Sigmoid", ["g"], ["s"]),
                  helper.make_node("Mul", ["a", "s"], ["b"])]
    elif op == "Resize":
        inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
        nodes.append(helper.make_node("Resize", ["a", "", "scales"], ["b"], mode="nearest"))
    else:
        nodes.append(helper.make_node(op, ["a"], ["b"]))
    nodes.append(helper.make_node("Conv", ["b", "w2"], ["y"], kernel_shape=[1, 1]))
    return _micro_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)


def _block_case(channels: int, expand: int, size: int, act: str) -> onnx.ModelProto:
    """An inverted-residual block (MobileNetV2/V3, EfficientNet): 1x1 expand -> act -> depthwise 3x3 -> act
    -> 1x1 project -> residual Add. Nodes are named expand / dw / project so they can be excluded."""
    rng = np.random.default_rng(0)
    wide = channels * expand
    inits, nodes = [], []

    def conv(name: str, x: str, cin: int, cout: int, kernel: int, group: int = 1) -> str:
        shape = (cout, cin // group, kernel, kernel)
        inits.append(numpy_helper.from_array(rng.normal(0, np.sqrt(2.0 / (shape[1] * kernel * kernel)), shape)
                                             .astype(np.float32), f"{name}.w"))
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, cout).astype(np.float32), f"{name}.b"))
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], name=name, group=group,
                                      kernel_shape=[kernel, kernel], pads=[kernel // 2] * 4))
        return name

    def activation(x: str) -> str:
        out = f"{x}.act"
        if act == "relu6":
            if not any(t.name == "zero" for t in inits):
                inits.extend(numpy_helper.from_array(np.array(v, np.float32), n)
                             for n, v in (("zero", 0.0), ("six", 6.0)))
            nodes.append(helper.make_node("Clip", [x, "zero", "six"], [out], name=out))
        elif act == "hardswish":
            nodes.append(helper.make_node("HardSwish", [x], [out], name=out))
        else:  # silu
            nodes.append(helper.make_node("Sigmoid", [x], [f"{x}.sigmoid"], name=f"{x}.sigmoid"))
            nodes.append(helper.make_node("Mul", [x, f"{x}.sigmoid"], [out], name=out))
        return out

    y = activation(conv("expand", "x", channels, wide, 1))
    y = activation(conv("dw", y, wide, wide, 3, group=wide))
    y = conv("project", y, wide, channels, 1)
    nodes.append(helper.make_node("Add", [y, "x"], ["y"], name="residual"))
    return _micro_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, size, size])], inits)


def micro_cases() -> list[MicroCase]:
    cases = []
    for cin, cout, size, k in ((16, 16, 112, 1), (64, 64, 56, 1), (128, 128, 28, 1), (256, 256, 14, 1),
                               (512, 512, 7, 1), (16, 16, 112, 3), (64, 64, 56, 3), (128, 128, 28, 3),
                               (256, 256, 14, 3), (512, 512, 7, 3), (3, 32, 224, 3), (8, 16, 56, 3)):
        cases.append(MicroCase(f"conv {k}x{k} {cin}->{cout} @{size}", "conv",
                               lambda a=(cin, cout, size, k): _conv_case(*a)))
    for channels, size, k in ((16, 112, 3), (64, 56, 3), (128, 28, 3), (256, 14, 3), (512, 7, 3), (128, 28, 5),
                              (480, 14, 5)):
        cases.append(MicroCase(f"depthwise {k}x{k} {channels} @{size}", "depthwise",
                               lambda a=(channels, size, k): _conv_case(a[0], a[0], a[1], a[2], group=a[0])))
    cases.append(MicroCase("group 3x3 64->64 g=4 @56", "group", lambda: _conv_case(64, 64, 56, 3, group=4)))
    cases.append(MicroCase("group 3x3 128->128 g=32 @28", "group", lambda: _conv_case(128, 128, 28, 3, group=32)))
    for act in ("relu", "hardswish", "silu", "paddle_hardswish", "hardsigmoid_mul"):
        cases.append(MicroCase(f"conv 3x3 64->64 @56 + {act}", "conv+act",
                               lambda a=act: _conv_case(64, 64, 56, 3, act=a)))
        cases.append(MicroCase(f"depthwise 3x3 128 @28 + {act}", "depthwise+act",
                               lambda a=act: _conv_case(128, 128, 28, 3, group=128, act=a)))
    for op in ("Relu", "Sigmoid", "HardSwish", "HardSigmoid", "Add", "GlobalAveragePool+Mul", "Resize"):
        cases.append(MicroCase(f"1x1 -> {op} -> 1x1, 128 @28", "between convs",
                               lambda o=op: _pointwise_case(o, 128, 28)))
    for rows, inner, cols in ((128, 768, 768), (128, 768, 3072), (128, 3072, 768), (1, 768, 768), (1, 512, 1000),
                              (40, 120, 6625)):
        cases.append(MicroCase(f"matmul {rows}x{inner} @ {inner}x{cols}", "matmul",
                               lambda a=(rows, inner, cols): _matmul_case(*a)))
    cases.append(MicroCase("matmul 128x768 @ 768x768, int8 activations", "int8 activations",
                           lambda: _matmul_case(128, 768, 768), activations="int8"))
    cases.append(MicroCase("conv 3x3 64->64 @56, int8 activations", "int8 activations",
                           lambda: _conv_case(64, 64, 56, 3), activations="int8"))
    for channels, expand, size in ((16, 6, 56), (32, 6, 28), (64, 6, 14), (96, 6, 7)):
        for act in ("relu6", "hardswish", "silu"):
            label = f"block {channels}x{expand} @{size} {act}"
            arguments = (channels, expand, size, act)
            cases.append(MicroCase(f"{label}: all int8", "inverted residual", lambda a=arguments: _block_case(*a)))
            cases.append(MicroCase(f"{label}: depthwise float", "inverted residual",
                                   lambda a=arguments: _block_case(*a), exclude=("dw",)))
            cases.append(MicroCase(f"{label}: depthwise+acts float", "inverted residual",
                                   lambda a=arguments: _block_case(*a),
                                   exclude=("dw", "expand.act", "dw.act", "expand.act.sigmoid", "dw.act.sigmoid")))
    return cases


GLUE_OPS = {"QuantizeLinear", "DequantizeLinear", "Transpose", "ReorderInput", "ReorderOutput"}


def _compute_and_glue(path: Path, feeds: list[dict], runs: int) -> tuple[float, float]:
    """Profiled ms per inference in compute kernels vs in glue (Q/DQ, layout transposes and reorders)."""
    compute = glue = 0.0
    for _, op_name, ms, _ in _node_events(path, feeds, runs):
        if op_name in GLUE_OPS:
            glue += ms
        else:
            compute += ms
    return compute, glue


def micro_bench(runs: int = 30, only: str | None = None) -> list[dict]:
    """fp32 vs ORT quantize_static (minmax, QDQ, per-channel) for each single-op model: latency at
    1 thread, and which kernel ORT's optimizer picked for the quantized graph."""
    rows = []
    folder = WORK / "micro"
    folder.mkdir(parents=True, exist_ok=True)
    for case in micro_cases():
        if only and only not in case.name:
            continue
        model = case.build()
        fp32 = folder / "fp32.onnx"
        quantized = folder / "qdq.onnx"
        onnx.save(model, str(fp32))
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        rng = np.random.default_rng(1)
        feeds = [{"x": rng.normal(0, 1, shape).astype(np.float32)} for _ in range(8)]
        ort_quantize_static(fp32, feeds, quantized, "minmax", preprocess=False, activations=case.activations,
                            nodes_to_exclude=case.exclude)
        times = time_models({"fp32": fp32, "qdq": quantized}, feeds[:2], runs=runs)
        census = kernel_census(quantized)
        kernel_fp32, glue_fp32 = _compute_and_glue(fp32, feeds[:2], runs)
        kernel_qdq, glue_qdq = _compute_and_glue(quantized, feeds[:2], runs)
        float_ops = sorted({op for op in census["ops"] if op.split(".")[-1] not in INTEGER_KERNELS | QDQ_OPS})
        row = {"case": case.name, "family": case.family, "fp32_ms": times["fp32"], "qdq_ms": times["qdq"],
               "speedup": times["fp32"] / times["qdq"], "kernel_fp32_ms": kernel_fp32, "kernel_qdq_ms": kernel_qdq,
               "glue_fp32_ms": glue_fp32, "glue_qdq_ms": glue_qdq,
               "kernel_speedup": kernel_fp32 / kernel_qdq if kernel_qdq else float("nan"),
               "integer": sorted(census["integer_kernels"]), "float": float_ops,
               "q": census["quantize_linear"], "dq": census["dequantize_linear"]}
        rows.append(row)
        print(f"  {case.name:<42} fp32 {row['fp32_ms']:8.3f} ms  qdq {row['qdq_ms']:8.3f} ms  x{row['speedup']:.2f} "
              f"(kernels x{row['kernel_speedup']:.2f})  int={row['integer']} float={float_ops} "
              f"Q={row['q']} DQ={row['dq']}", file=sys.stderr)
    return rows


# --------------------------------------------------------------------------------------------- report


SHOWN_METRICS = ("cosine", "top1_agreement", "text_agreement", "char_agreement", "mask_iou", "box_iou", "accuracy",
                 "embedding_cosine_min", "neighbour_agreement")


def markdown(results: list[SubjectResult]) -> str:
    lines = ["| model | data | fp32 ms | ORT-QDQ ms | speedup | fp32 KB | ORT KB | " +
             " | ".join(f"{m}" for m in METHODS) + " |", "|" + "---|" * (7 + len(METHODS))]
    for r in results:
        cells = []
        for method in METHODS:
            entry = r.methods.get(method)
            if entry is None:
                cells.append("")
            elif "error" in entry:
                cells.append("error")
            else:
                cells.append(", ".join(f"{k.replace('_agreement', '').replace('top1', 'top1')}={v:.3f}"
                                       for k, v in entry.items() if k in SHOWN_METRICS))
        speed = r.fp32_ms / r.ort_ms if r.fp32_ms and r.ort_ms else float("nan")
        lines.append(f"| {r.name} | {r.data} | {_f(r.fp32_ms)} | {_f(r.ort_ms)} | {speed:.2f}x | "
                     f"{r.fp32_bytes // 1024} | {(r.ort_bytes or 0) // 1024} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def conv_category(key: str) -> str:
    """Coarse class of a conv_profile key: depthwise kxk, group, stem (kxk on <= 4 channels), 1x1 or
    dense kxk, split at 64 input channels."""
    kind = key.split()[0]
    if kind.startswith("dw"):
        return f"depthwise {kind[2:]}"
    if key.startswith("group"):
        return "group conv"
    kernel = kind[len("conv"):]
    cin = int(key.split()[2].split("->")[0])
    if cin <= 4 and kernel != "1x1":
        return "stem conv (cin <= 4)"
    name = "pointwise 1x1" if kernel == "1x1" else f"dense {kernel}"
    return f"{name} (cin {'< 64' if cin < 64 else '>= 64'})"


def conv_categories(result: SubjectResult) -> dict[str, dict]:
    """fp32 vs int8 ms per inference summed over every conv of one category."""
    totals: dict[str, dict] = defaultdict(lambda: {"fp32_ms": 0.0, "int8_ms": 0.0, "convs": 0})
    for key, entry in result.conv_fp32.items():
        totals[conv_category(key)]["fp32_ms"] += entry["ms"]
        totals[conv_category(key)]["convs"] += entry["count"]
    for key, entry in result.conv_ort.items():
        totals[conv_category(key)]["int8_ms"] += entry["ms"]
    return dict(sorted(totals.items()))


def conv_markdown(results: list[SubjectResult]) -> str:
    lines = ["| model | conv category | convs | fp32 ms | ORT int8 ms | int8 speedup |", "|---|---|---|---|---|---|"]
    for result in results:
        for category, entry in conv_categories(result).items():
            speed = entry["fp32_ms"] / entry["int8_ms"] if entry["int8_ms"] else float("nan")
            lines.append(f"| {result.name} | {category} | {entry['convs']} | {entry['fp32_ms']:.3f} | "
                         f"{entry['int8_ms']:.3f} | {speed:.2f}x |")
    return "\n".join(lines)


def _f(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


ALL_SUBJECTS = ("ocr_cls", "ocr_rec", "ocr_det", "captcha_det", "captcha_ocr", "magika", "minilm", "digits_cnn",
                "digits_mobilenet", "resnet18", "bert2")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("subjects", nargs="*", default=list(ALL_SUBJECTS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--calib", type=int, default=32, help="calibration samples (a quarter for detectors "
                                                               "and for the generated models)")
    parser.add_argument("--eval", type=int, default=32, dest="eval_samples")
    parser.add_argument("--runs", type=int, default=20, help="interleaved timing turns")
    parser.add_argument("--profile-runs", type=int, default=10)
    parser.add_argument("--micro", action="store_true")
    parser.add_argument("--only", help="with --micro: cases whose name contains this")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(ALL_SUBJECTS))
        return 0
    if args.micro:
        rows = micro_bench(args.runs, args.only)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        print("| case | fp32 ms | ORT-QDQ ms | speedup | kernels only: fp32 / int8 ms | kernel speedup | "
              "integer kernels | float ops left |\n|---|---|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['case']} | {row['fp32_ms']:.3f} | {row['qdq_ms']:.3f} | {row['speedup']:.2f}x | "
                  f"{row['kernel_fp32_ms']:.3f} / {row['kernel_qdq_ms']:.3f} | {row['kernel_speedup']:.2f}x | "
                  f"{', '.join(row['integer'])} | {', '.join(row['float'])} (Q={row['q']}, DQ={row['dq']}) |")
        return 0
    methods = [m for m in args.methods.split(",") if m]
    results = []
    for subject in subjects(args.subjects, args.calib, args.eval_samples):
        print(f"== {subject.name} ({subject.data}, {len(subject.calibration)} calibration feeds)", file=sys.stderr)
        results.append(measure(subject, methods, args.runs, args.profile_runs))
        if args.json:
            Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1, default=_round))
    print(markdown(results))
    print()
    print(conv_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
