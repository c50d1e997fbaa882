import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import small_model
from onnx import helper

from qpass.cli import main


def invoke(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def assert_user_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.strip().splitlines() if l]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("qpass: error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_everywhere():
    for args in ([], ["run"], ["inspect"], ["passes"], ["recipes"], ["demo"]):
        result = invoke(*args, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output


def test_passes_and_recipes_list_names_and_summaries():
    out = invoke("passes").output
    assert "fold-batchnorm" in out and "Fold inference BatchNormalization" in out
    out = invoke("recipes").output
    assert "fold" in out and "fuse-layernorm" in out


def test_run_writes_output_and_prints_table(small_model_path, tmp_path):
    out = tmp_path / "out.onnx"
    report = tmp_path / "stats.json"
    result = invoke("run", small_model_path, "-o", out, "--recipe", "fold", "--report", report)
    assert result.exit_code == 0, result.output
    assert "fold-constants" in result.output and "wrote" in result.output
    onnx.checker.check_model(onnx.load(out))
    assert json.loads(report.read_text())["verified"] is True


def test_run_with_pass_list_add_and_remove(small_model_path, tmp_path):
    out = tmp_path / "out.onnx"
    result = invoke("run", small_model_path, "-o", out, "--passes", "fold-constants,remove-noops",
                    "--remove-pass", "remove-noops", "--add-pass", "eliminate-dead-nodes", "--no-verify")
    assert result.exit_code == 0, result.output
    assert "eliminate-dead-nodes" in result.output and "remove-noops" not in result.output


def test_inspect_reports_model_facts(small_model_path):
    result = invoke("inspect", small_model_path, "--json")
    info = json.loads(result.output)
    assert info["opset"] == 17
    assert info["parameters"] == 4 * 3 + 3
    assert info["op_histogram"] == {"MatMul": 1, "Add": 1, "Relu": 1}
    assert info["quantizable"] == {"weight": 1, "activation": 0}
    assert info["inputs"][0]["shape"] == ["N", 4]
    assert "quantizable: 1 nodes" in invoke("inspect", small_model_path).output


def test_demo_runs_offline():
    result = invoke("demo")
    assert result.exit_code == 0, result.output
    assert "demo-cnn" in result.output and "demo-transformer" in result.output


# --- bad input: one line, exit 2, input unchanged -------------------------------------------


@pytest.fixture
def written(tmp_path):
    def write(name, data):
        path = tmp_path / name
        path.write_bytes(data)
        return path
    return write


def test_corrupt_and_truncated_and_non_onnx_files(written, tmp_path):
    good = small_model().SerializeToString()
    for path in (written("trunc.onnx", good[: len(good) // 2]), written("text.onnx", b"hello, not a model\n"), written("zeros.onnx", b"\x00" * 64)):
        before = path.read_bytes()
        assert_user_error(invoke("run", path, "-o", tmp_path / "o.onnx"), str(path.name))
        assert path.read_bytes() == before
    assert not (tmp_path / "o.onnx").exists()


def test_missing_file_and_directory(tmp_path):
    assert_user_error(invoke("inspect", tmp_path / "nope.onnx"), "does not exist")
    assert_user_error(invoke("inspect", tmp_path), "is a directory")


def test_unsupported_opset(tmp_path):
    model = small_model(opset=6)
    path = tmp_path / "old.onnx"
    onnx.save(model, path)
    assert_user_error(invoke("inspect", path), "opset 6", ">= 7")


def test_checker_failure(tmp_path):
    model = small_model()
    model.graph.node[0].input[1] = "undefined_weight"
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    assert_user_error(invoke("inspect", path), "fails the ONNX checker")


def test_unknown_domain(tmp_path):
    model = small_model()
    model.graph.node.append(helper.make_node("Foo", ["y"], ["z"], domain="com.example"))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    path = tmp_path / "dom.onnx"
    onnx.save(model, path)
    assert_user_error(invoke("inspect", path), "unknown domain")


def test_nan_weight_is_named(tmp_path):
    model = small_model()
    w = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[0, 0] = np.nan
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, "W"))
    path = tmp_path / "nan.onnx"
    onnx.save(model, path)
    assert_user_error(invoke("inspect", path), "'W'", "NaN")


def test_missing_and_truncated_external_data(tmp_path):
    model = small_model(weight_scale=1.0)
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data", size_threshold=0)
    data = tmp_path / "ext.data"
    full = data.read_bytes()
    data.write_bytes(full[:10])
    assert_user_error(invoke("inspect", path), "truncated")
    data.unlink()
    assert_user_error(invoke("inspect", path), "missing")


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    model = small_model()
    sub = tmp_path / "m"
    sub.mkdir()
    onnx.save(model, tmp_path / "x.onnx", save_as_external_data=True, location="shared.data", size_threshold=0)
    loaded = onnx.load(tmp_path / "x.onnx", load_external_data=False)
    for t in loaded.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../shared.data"
    onnx.save(loaded, sub / "evil.onnx")
    assert_user_error(invoke("inspect", sub / "evil.onnx"), "outside the model's folder")


def test_output_equal_to_input(small_model_path):
    before = small_model_path.read_bytes()
    assert_user_error(invoke("run", small_model_path, "-o", small_model_path), "is the input model")
    assert small_model_path.read_bytes() == before


def test_unwritable_or_missing_output_directory(small_model_path, tmp_path):
    assert_user_error(invoke("run", small_model_path, "-o", tmp_path / "no" / "out.onnx"), "does not exist")
    if os.path.isdir("/proc"):  # unwritable even for root
        assert_user_error(invoke("run", small_model_path, "-o", "/proc/out.onnx"), "/proc")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions
            pytest.skip("running as root: directory permissions are not enforced")
        assert_user_error(invoke("run", small_model_path, "-o", locked / "out.onnx"), "not writable")
    finally:
        locked.chmod(0o700)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_user_error(invoke("run", small_model_path, "-o", blocker / "out.onnx"), "not a directory")


def test_unknown_pass_option_and_recipe(small_model_path, tmp_path):
    out = tmp_path / "o.onnx"
    assert_user_error(invoke("run", small_model_path, "-o", out, "--passes", "fold-everything"), "unknown pass 'fold-everything'")
    assert_user_error(invoke("run", small_model_path, "-o", out, "--recipe", "w2a2-magic"), "unknown recipe 'w2a2-magic'")
    assert_user_error(invoke("run", small_model_path, "-o", out, "--passes", "fold-constants(speed=11)"), "no option 'speed'")
    assert not out.exists()


def test_entry_point_exit_code_and_no_traceback(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"junk")
    proc = subprocess.run([sys.executable, "-m", "qpass.cli", "inspect", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "qpass.cli", "--debug", "inspect", str(path)], capture_output=True, text=True)
    assert "Traceback" in proc.stderr


def test_output_format_option(small_model_path, tmp_path):
    for command in ("run", "quantize"):
        help_text = " ".join(invoke(command, "--help").output.split())
        assert "--format qdq|qoperator" in help_text and "QLinearConv" in help_text and "--contrib-ops" in help_text
    out = tmp_path / "o.onnx"
    assert_user_error(invoke("run", small_model_path, "-o", out, "--format", "QOp"), "unknown output format 'QOp'", "qdq, qoperator")
    assert_user_error(invoke("run", small_model_path, "-o", out, "--contrib-ops"), "format 'qoperator'")
    assert not out.exists()
    result = invoke("run", small_model_path, "-o", out, "--recipe", "fold", "--format", "qoperator")
    assert result.exit_code == 0, result.output  # nothing quantized: nothing to lower, still a valid model
    onnx.checker.check_model(onnx.load(out))
