"""Issue 17: external data is read from the model's folder only, for every kind of tensor a model carries.

Each tensor kind gets a model whose one external tensor names a plain relative file. The commands run from
a working directory that holds a file of that name (onnxruntime would resolve the name there). Two cases:
- the model's folder lacks the file: every command refuses the model (exit 2);
- the model's folder has it: the model loads with the folder's values, and runs.
A file-access probe (strace when it works here, else an audit hook on `open`) shows that the file in the
working directory is never opened.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressq.errors import ModelError
from compressq.io import load_model, model_tensors
from compressq.runtime import create_session

REPO_ROOT = Path(__file__).resolve().parents[1]
OPSET = 17
VALUES = np.array([1.5, -2.0, 0.25, 4.0], dtype=np.float32)
KINDS = ["initializer", "sparse_values", "sparse_indices", "constant", "constant_sparse", "constant_of_shape",
         "function_constant", "subgraph_constant"]
COMMANDS = {
    "inspect": ["inspect", "{model}"],
    "report": ["report", "{model}", "--runs", "1", "--warmup", "0"],
    "quantize-static": ["quantize", "{model}", "-d", "{data}", "-o", "{out}"],
    "quantize-dynamic": ["quantize", "{model}", "--mode", "dynamic", "-o", "{out}"],
    "sensitivity": ["sensitivity", "{model}", "-d", "{data}"],
    "prune": ["prune", "{model}", "-s", "0.5", "-o", "{out}"],
}


def _io(name: str, shape=(4,)) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _model(nodes, initializers=(), sparse=(), functions=(), extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", [_io("x")], [_io("y")], list(initializers),
                              sparse_initializer=list(sparse))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), *extra_opsets],
                              functions=list(functions))
    model.ir_version = 8
    return model


def _sparse(name: str) -> onnx.SparseTensorProto:
    values = numpy_helper.from_array(VALUES, name)
    indices = numpy_helper.from_array(np.arange(4, dtype=np.int64), f"{name}_indices")
    return helper.make_sparse_tensor(values, indices, [4])


def build(kind: str) -> tuple[onnx.ModelProto, onnx.TensorProto]:
    """`y = x + C` with C held as `kind`; returns the model and the tensor that will be made external."""
    add = helper.make_node("Add", ["x", "C"], ["y"], name="add")
    constant = helper.make_node("Constant", [], ["C"], name="const", value=numpy_helper.from_array(VALUES, "C"))
    if kind == "initializer":
        model = _model([add], initializers=[numpy_helper.from_array(VALUES, "C")])
        return model, model.graph.initializer[0]
    if kind in ("sparse_values", "sparse_indices"):
        model = _model([add], sparse=[_sparse("C")])
        sparse = model.graph.sparse_initializer[0]
        return model, sparse.values if kind == "sparse_values" else sparse.indices
    if kind == "constant":
        model = _model([constant, add])
        return model, model.graph.node[0].attribute[0].t
    if kind == "constant_sparse":
        model = _model([helper.make_node("Constant", [], ["C"], name="const", sparse_value=_sparse("C")), add])
        return model, model.graph.node[0].attribute[0].sparse_tensor.values
    if kind == "constant_of_shape":
        # y = x + fill: the fill value (one element) is the external tensor; the fill is VALUES[0].
        shape = numpy_helper.from_array(np.array([4], dtype=np.int64), "shape")
        fill = numpy_helper.from_array(VALUES[:1], "fill")
        nodes = [helper.make_node("ConstantOfShape", ["shape"], ["C"], name="fill", value=fill), add]
        model = _model(nodes, initializers=[shape])
        return model, model.graph.node[0].attribute[0].t
    if kind == "function_constant":
        body = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(VALUES, "c")),
                helper.make_node("Add", ["a", "c"], ["b"])]
        function = helper.make_function("local", "AddC", ["a"], ["b"], body,
                                        [helper.make_opsetid("", OPSET)])
        model = _model([helper.make_node("AddC", ["x"], ["y"], domain="local", name="call")],
                       functions=[function], extra_opsets=[helper.make_opsetid("local", 1)])
        return model, model.functions[0].node[0].attribute[0].t
    if kind == "subgraph_constant":
        def branch(values: np.ndarray, name: str) -> onnx.GraphProto:
            node = helper.make_node("Constant", [], [f"{name}_c"], value=numpy_helper.from_array(values, "c"))
            return helper.make_graph([node], name, [], [_io(f"{name}_c")])
        cond = numpy_helper.from_array(np.array(True), "cond")
        nodes = [helper.make_node("If", ["cond"], ["C"], name="choose", then_branch=branch(VALUES, "then"),
                                  else_branch=branch(np.zeros(4, np.float32), "else")), add]
        model = _model(nodes, initializers=[cond])
        return model, model.graph.node[0].attribute[0].g.node[0].attribute[0].t
    raise AssertionError(kind)


def expected_output(kind: str, x: np.ndarray) -> np.ndarray:
    return x + (VALUES[0] if kind == "constant_of_shape" else VALUES)


def make_external(tensor: onnx.TensorProto, location: str) -> bytes:
    """Point `tensor` at `location` (offset 0); returns the bytes that file must hold."""
    data = numpy_helper.to_array(tensor).tobytes()
    tensor.ClearField("raw_data")
    for field in ("float_data", "int64_data", "int32_data", "double_data"):
        tensor.ClearField(field)
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    tensor.external_data.add(key="location", value=location)
    tensor.external_data.add(key="offset", value="0")
    tensor.external_data.add(key="length", value=str(len(data)))
    return data


def decoy_bytes(true_bytes: bytes) -> bytes:
    # Same length, other values: if anything read the working directory's file, the output would show it.
    return bytes((b + 1) % 256 for b in true_bytes)


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> dict:
    """tmp/cwd holds every secret file; tmp/model/<kind>_{absent,present}/ holds the models."""
    root = tmp_path_factory.mktemp("external")
    cwd = root / "cwd"
    cwd.mkdir()
    np.savez(cwd / "calib.npz", x=np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))
    cases = {}
    for kind in KINDS:
        for case in ("absent", "present"):
            folder = root / "model" / f"{kind}_{case}"
            folder.mkdir(parents=True)
            model, tensor = build(kind)
            name = f"secret_{kind}_{case}.bin"
            data = make_external(tensor, name)
            if case == "present":
                (folder / name).write_bytes(data)
            (cwd / name).write_bytes(decoy_bytes(data))
            onnx.save_model(model, str(folder / "m.onnx"))
            cases[(kind, case)] = {"model": folder / "m.onnx", "secret": name}
    return {"root": root, "cwd": cwd, "cases": cases}


# ---------------------------------------------------------------------------------------------------
# In process: the walk, the loader, the session


@pytest.mark.parametrize("kind", KINDS)
def test_walk_finds_the_tensor(kind):
    model, tensor = build(kind)
    make_external(tensor, "w.bin")
    external = [s for s in model_tensors(model) if s.tensor.data_location == TensorProto.EXTERNAL]
    assert len(external) == 1 and external[0].tensor == tensor


@pytest.mark.parametrize("kind", KINDS)
def test_absent_from_model_folder_is_refused(layout, kind, monkeypatch):
    monkeypatch.chdir(layout["cwd"])
    with pytest.raises(ModelError, match="not found"):
        load_model(layout["cases"][(kind, "absent")]["model"])


@pytest.mark.parametrize("kind", KINDS)
def test_present_loads_from_model_folder_and_runs(layout, kind, monkeypatch):
    monkeypatch.chdir(layout["cwd"])  # holds a decoy of the same name
    model = load_model(layout["cases"][(kind, "present")]["model"])
    assert not [s for s in model_tensors(model) if s.tensor.data_location == TensorProto.EXTERNAL]
    x = np.array([0.5, 1.0, -1.0, 2.0], dtype=np.float32)
    (y,) = create_session(model).run(None, {"x": x})
    np.testing.assert_allclose(y, expected_output(kind, x), rtol=0, atol=0)


@pytest.mark.parametrize("location,words", [
    ("/etc/passwd", "absolute"), ("../secret.bin", "outside"), ("sub/../../secret.bin", "outside"),
    ("a\x00b", "NUL"), ("C:secret.bin", "absolute"), ("\\\\host\\share", "absolute"),
])
@pytest.mark.parametrize("kind", ["sparse_values", "function_constant", "subgraph_constant"])
def test_unsafe_locations_refused_for_every_kind(tmp_path, kind, location, words):
    model, tensor = build(kind)
    make_external(tensor, location)
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(ModelError, match=words):
        load_model(path)


def test_symlink_leaving_the_folder_refused(tmp_path):
    model, tensor = build("sparse_indices")
    data = make_external(tensor, "w.bin")
    (tmp_path / "outside.bin").write_bytes(data)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.bin").symlink_to(tmp_path / "outside.bin")
    onnx.save_model(model, str(tmp_path / "model" / "m.onnx"))
    with pytest.raises(ModelError, match="outside the model's folder"):
        load_model(tmp_path / "model" / "m.onnx")


@pytest.mark.parametrize("offset,length", [(0, 64), (40, 16), (-8, 16)])
def test_offset_and_length_inside_the_file(tmp_path, offset, length):
    model, tensor = build("function_constant")
    data = make_external(tensor, "w.bin")
    (tmp_path / "w.bin").write_bytes(data)  # 16 bytes
    for entry in tensor.external_data:
        if entry.key == "offset":
            entry.value = str(offset)
        if entry.key == "length":
            entry.value = str(length)
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    with pytest.raises(ModelError, match="refused|shape and type need"):
        load_model(tmp_path / "m.onnx")


def test_non_regular_external_file_refused(tmp_path):
    model, tensor = build("constant")
    make_external(tensor, "w.bin")
    os.mkfifo(tmp_path / "w.bin")  # reading it would block forever
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    with pytest.raises(ModelError, match="not a regular file"):
        load_model(tmp_path / "m.onnx")


def test_session_refuses_a_proto_that_still_points_somewhere(tmp_path, monkeypatch):
    model, tensor = build("sparse_values")
    (tmp_path / "w.bin").write_bytes(make_external(tensor, "w.bin"))
    monkeypatch.chdir(tmp_path)  # onnxruntime would find w.bin here
    with pytest.raises(ModelError, match="still points at external data"):
        create_session(model)


# ---------------------------------------------------------------------------------------------------
# Every command, in a subprocess under a file-access probe


DRIVER = r"""
import contextlib, io, json, sys
spec = json.load(open(sys.argv[1]))
if spec["probe"] == "audit":
    log = open(spec["log"], "w")
    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes)):
            import os
            log.write(os.path.abspath(args[0] if isinstance(args[0], str) else args[0].decode()) + "\n")
            log.flush()
    sys.addaudithook(hook)
from compressq.cli import app as cli
results = []
for name, argv in spec["runs"]:
    err = io.StringIO()
    code = None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.app(argv, prog_name="compressq")
        except SystemExit as exc:
            code = exc.code
    results.append({"name": name, "code": code, "stderr": err.getvalue()})
json.dump(results, open(spec["results"], "w"))
"""


def strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    probe = subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat", "-o", os.devnull, "true"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def probed_runs(layout) -> dict:
    root, cwd = layout["root"], layout["cwd"]
    runs = []
    for (kind, case), info in layout["cases"].items():
        commands = COMMANDS if case == "absent" else {"inspect": COMMANDS["inspect"], "report": COMMANDS["report"]}
        for command, template in commands.items():
            argv = [a.format(model=info["model"], data=cwd / "calib.npz",
                             out=root / f"out_{kind}_{case}_{command}.onnx") for a in template]
            runs.append([f"{kind}/{case}/{command}", argv])
    probe = "strace" if strace_works() else "audit"
    log = root / "opens.log"
    spec = {"runs": runs, "probe": probe, "log": str(log), "results": str(root / "results.json")}
    (root / "spec.json").write_text(json.dumps(spec))
    command = [sys.executable, "-c", DRIVER, str(root / "spec.json")]
    if probe == "strace":
        command = ["strace", "-f", "-qq", "-e", "trace=open,openat,openat2", "-o", str(log), *command]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = {r["name"]: r for r in json.loads((root / "results.json").read_text())}
    return {"probe": probe, "opens": log.read_text(), "results": results, "cwd": cwd}


def opened(probed: dict, cwd: Path, name: str) -> bool:
    if probed["probe"] == "strace":  # relative opens resolve against the working directory
        return re.search(rf'"(?:[^"]*/{re.escape(cwd.name)}/)?{re.escape(name)}"', probed["opens"]) is not None
    return str(cwd / name) in probed["opens"].splitlines()


def test_probe_sees_external_data_reads(probed_runs, layout):
    # Positive control: the probe does see the model folder's file being read.
    info = layout["cases"][("sparse_values", "present")]
    folder_file = str(info["model"].parent / info["secret"])
    assert folder_file in probed_runs["opens"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_refuses_and_never_opens_the_cwd_file(probed_runs, layout, kind, command):
    run = probed_runs["results"][f"{kind}/absent/{command}"]
    assert run["code"] == 2, run["stderr"]
    lines = [line for line in run["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "not found" in lines[0], run["stderr"]
    assert not opened(probed_runs, probed_runs["cwd"], layout["cases"][(kind, "absent")]["secret"])


@pytest.mark.parametrize("kind", KINDS)
def test_commands_read_only_the_model_folder(probed_runs, layout, kind):
    for command in ("inspect", "report"):
        run = probed_runs["results"][f"{kind}/present/{command}"]
        assert run["code"] == 0, (command, run["stderr"])
    assert not opened(probed_runs, probed_runs["cwd"], layout["cases"][(kind, "present")]["secret"])
