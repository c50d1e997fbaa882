"""Calibration data: every accepted format, and a one-line CalibrationError for each bad input."""

import pickle

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch.utils.data import DataLoader, TensorDataset

import qpass
import qpass.calib_data
from qpass.calib_data import CalibrationSet, load_calibration


def one_input_proto() -> onnx.ModelProto:
    """x[N, 4] float -> Relu -> y."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def two_input_proto() -> onnx.ModelProto:
    """x[N, 3, 8, 8] float -> Relu -> y; ids[N, S] int64 -> Gather(table[10, 4]) -> e."""
    table = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "table")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Gather", ["table", "ids"], ["e"])],
        "two",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "S"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8]),
            helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", "S", 4]),
        ],
        [table],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def one():
    return qpass.load_model(one_input_proto())


@pytest.fixture(scope="module")
def two():
    return qpass.load_model(two_input_proto())


def rng(seed=0):
    return np.random.default_rng(seed)


def two_sample(seq=5, seed=0, batch=1):
    r = rng(seed)
    return {
        "x": r.standard_normal((batch, 3, 8, 8)).astype(np.float32),
        "ids": r.integers(0, 10, (batch, seq)).astype(np.int64),
    }


def assert_feeds(feeds, names, dtypes):
    for feed in feeds:
        assert list(feed) == names
        for name, dtype in zip(names, dtypes):
            assert isinstance(feed[name], np.ndarray) and feed[name].dtype == dtype


# --- formats ---------------------------------------------------------------------------


def test_npz_file_yields_one_sample_per_row(one, tmp_path):
    data = rng().standard_normal((5, 4))  # float64: cast to the model's float32
    np.savez(tmp_path / "c.npz", x=data)
    calib = load_calibration(tmp_path / "c.npz", one)
    assert isinstance(calib, CalibrationSet) and len(calib) == 5 and not calib.is_random
    assert calib.input_names == ("x",)
    feeds = list(calib)
    assert len(feeds) == 5 and all(f["x"].shape == (1, 4) for f in feeds)
    assert all(f["x"].dtype == np.float32 for f in feeds)
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), data.astype(np.float32))
    assert list(calib) and len(list(calib)) == 5  # re-iterable


def test_npz_two_inputs_in_model_order(two, tmp_path):
    r = rng()
    np.savez(tmp_path / "c.npz", ids=r.integers(0, 10, (3, 6)), x=r.standard_normal((3, 3, 8, 8)).astype(np.float32))
    feeds = list(load_calibration(str(tmp_path / "c.npz"), two))
    assert len(feeds) == 3
    assert_feeds(feeds, ["x", "ids"], [np.float32, np.int64])
    assert feeds[0]["ids"].shape == (1, 6) and feeds[0]["x"].shape == (1, 3, 8, 8)


def test_npy_file_for_one_input_model(one, tmp_path):
    np.save(tmp_path / "c.npy", rng().standard_normal((4, 4)).astype(np.float32))
    feeds = list(load_calibration(tmp_path / "c.npy", one))
    assert len(feeds) == 4 and feeds[0]["x"].shape == (1, 4)


def test_static_batch_axis_splits_by_batch_size(tmp_path):
    proto = one_input_proto()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 2
    model = qpass.load_model(proto)
    feeds = list(load_calibration({"x": np.ones((6, 4), np.float32)}, model))
    assert len(feeds) == 3 and all(f["x"].shape == (2, 4) for f in feeds)
    with pytest.raises(qpass.CalibrationError, match="fixed batch size 2"):
        load_calibration({"x": np.ones((5, 4), np.float32)}, model)


def test_directory_of_npz(two, tmp_path):
    for i, seq in enumerate([3, 7, 5]):
        np.savez(tmp_path / f"{i:03d}.npz", **two_sample(seq, seed=i))
    calib = load_calibration(tmp_path, two)
    assert len(calib) == 3
    feeds = list(calib)
    assert [f["ids"].shape[1] for f in feeds] == [3, 7, 5]  # sorted by name, lengths vary
    np.testing.assert_array_equal(feeds[1]["x"], two_sample(7, seed=1)["x"])
    assert_feeds(feeds, ["x", "ids"], [np.float32, np.int64])


def test_directory_of_npy(one, tmp_path):
    for i in range(4):
        np.save(tmp_path / f"s{i}.npy", np.full((2, 4), i, np.float32))
    (tmp_path / ".DS_Store").write_bytes(b"ignored")
    feeds = list(load_calibration(tmp_path, one))
    assert [float(f["x"][0, 0]) for f in feeds] == [0, 1, 2, 3]


def test_directory_is_read_lazily(one, tmp_path):
    np.save(tmp_path / "a.npy", np.ones((1, 4), np.float32))
    np.save(tmp_path / "b.npy", np.ones((1, 4), np.float32))
    calib = load_calibration(tmp_path, one)  # first file checked up front
    np.save(tmp_path / "b.npy", np.full((1, 4), np.nan, np.float32))  # the second is read on iteration
    it = iter(calib)
    next(it)
    with pytest.raises(qpass.CalibrationError, match=r"sample 1 .*b\.npy.*'x' contains NaN or Inf"):
        next(it)


def test_list_of_dicts_varying_sequence_length(two):
    samples = [two_sample(seq, seed=seq) for seq in (2, 9, 4)]
    calib = load_calibration(samples, two)
    assert len(calib) == 3
    feeds = list(calib)
    assert [f["ids"].shape for f in feeds] == [(1, 2), (1, 9), (1, 4)]
    assert_feeds(feeds, ["x", "ids"], [np.float32, np.int64])


def test_list_of_torch_tensor_dicts(two):
    samples = [{k: torch.from_numpy(v) for k, v in two_sample(4).items()}]
    feeds = list(load_calibration(samples, two))
    assert_feeds(feeds, ["x", "ids"], [np.float32, np.int64])


def test_generator_is_lazy_and_one_shot(two):
    produced = []

    def gen():
        for i in range(4):
            produced.append(i)
            yield two_sample(3 + i, seed=i)

    calib = load_calibration(gen(), two)
    assert produced == [0]  # only the first sample was read up front
    with pytest.raises(TypeError):
        len(calib)
    assert calib.num_samples is None and bool(calib)
    feeds = list(calib)
    assert len(feeds) == 4 and feeds[0]["ids"].shape == (1, 3)
    with pytest.raises(qpass.CalibrationError, match="read only once"):
        iter(calib)


def test_torch_dataloader_tensor_dataset(two):
    x = torch.randn(10, 3, 8, 8)
    ids = torch.randint(0, 10, (10, 6))
    loader = DataLoader(TensorDataset(x, ids), batch_size=4)
    calib = load_calibration(loader, two)
    assert len(calib) == 3
    feeds = list(calib)
    assert [f["x"].shape[0] for f in feeds] == [4, 4, 2]
    assert_feeds(feeds, ["x", "ids"], [np.float32, np.int64])
    np.testing.assert_array_equal(feeds[0]["x"], x[:4].numpy())
    assert len(list(calib)) == 3  # re-iterable


def test_torch_dataloader_one_input_and_dicts(one):
    loader = DataLoader(TensorDataset(torch.randn(6, 4)), batch_size=2)
    assert [f["x"].shape for f in load_calibration(loader, one)] == [(2, 4)] * 3
    dict_loader = DataLoader([{"x": torch.randn(4)} for _ in range(3)], batch_size=2)
    assert [f["x"].shape for f in load_calibration(dict_loader, one)] == [(2, 4), (1, 4)]
    single = [torch.randn(2, 4), np.ones((3, 4), np.float32)]  # bare arrays, one-input model
    assert [f["x"].shape for f in load_calibration(single, one)] == [(2, 4), (3, 4)]


def test_in_memory_dict_is_stacked(one):
    feeds = list(load_calibration({"x": torch.randn(3, 4)}, one))
    assert len(feeds) == 3 and feeds[0]["x"].shape == (1, 4)


def test_random_data_is_marked_and_deterministic(two):
    calib = load_calibration(None, two, random_samples=3, seed=5)
    assert calib.is_random and len(calib) == 3
    a, b = list(calib), list(load_calibration(None, two, random_samples=3, seed=5))
    for fa, fb in zip(a, b):
        for name in ("x", "ids"):
            np.testing.assert_array_equal(fa[name], fb[name])
    assert not np.array_equal(a[0]["x"], a[1]["x"])  # seeds 5, 6, 7 differ
    assert_feeds(a, ["x", "ids"], [np.float32, np.int64])
    assert a[0]["ids"].max() < 10  # ids index the Gather table
    other = list(load_calibration(None, two, random_samples=1, seed=6))
    np.testing.assert_array_equal(other[0]["x"], a[1]["x"])


def test_float64_is_cast_and_int32_widened(two):
    sample = {"x": np.ones((1, 3, 8, 8), np.float64), "ids": np.ones((1, 4), np.int32)}
    (feed,) = list(load_calibration([sample], two))
    assert feed["x"].dtype == np.float32 and feed["ids"].dtype == np.int64


def test_bool_input_accepts_bool_and_01_ints():
    graph = helper.make_graph(
        [helper.make_node("Not", ["m"], ["y"])],
        "b",
        [helper.make_tensor_value_info("m", TensorProto.BOOL, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.BOOL, ["N", 3])],
    )
    model = qpass.load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    feeds = list(load_calibration([{"m": np.array([[True, False, True]])}, {"m": np.array([[0, 1, 1]])}], model))
    assert all(f["m"].dtype == np.bool_ for f in feeds)
    with pytest.raises(qpass.CalibrationError, match="other than 0 and 1"):
        load_calibration([{"m": np.array([[0, 2, 1]])}], model)
    with pytest.raises(qpass.CalibrationError, match="float32 data but the model input is bool"):
        load_calibration([{"m": np.zeros((1, 3), np.float32)}], model)


@pytest.mark.parametrize("kind", ["npz", "list", "generator", "loader", "random"])
def test_limit(one, tmp_path, kind):
    data = rng().standard_normal((10, 4)).astype(np.float32)
    if kind == "npz":
        np.savez(tmp_path / "c.npz", x=data)
        source = tmp_path / "c.npz"
    elif kind == "list":
        source = [{"x": data[i : i + 1]} for i in range(10)]
    elif kind == "generator":
        source = ({"x": data[i : i + 1]} for i in range(10))
    elif kind == "loader":
        source = DataLoader(TensorDataset(torch.from_numpy(data)), batch_size=1)
    else:
        source = None
    calib = load_calibration(source, one, limit=3, random_samples=10 if kind == "random" else 0)
    assert len(list(calib)) == 3
    if kind != "generator":
        assert len(calib) == 3
        big = load_calibration(source, one, limit=50, random_samples=10 if kind == "random" else 0)
        assert len(big) == 10 and len(list(big)) == 10


def test_limit_on_directory(one, tmp_path):
    for i in range(5):
        np.save(tmp_path / f"{i}.npy", np.ones((1, 4), np.float32))
    calib = load_calibration(tmp_path, one, limit=2)
    assert len(calib) == 2 and len(list(calib)) == 2


# --- bad input -------------------------------------------------------------------------

Err = qpass.CalibrationError


def test_missing_file_and_directory(one, tmp_path):
    with pytest.raises(Err, match="does not exist"):
        load_calibration(tmp_path / "nope.npz", one)
    with pytest.raises(Err, match="does not exist"):
        load_calibration(str(tmp_path / "nodir"), one)


def test_unreadable_file_and_directory(one, tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    np.savez(path, x=np.ones((2, 4), np.float32))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(qpass.calib_data, "open", denied, raising=False)  # chmod does not stop root
    with pytest.raises(Err, match=r"cannot read calibration file '.*c\.npz': Permission denied"):
        load_calibration(path, one)
    monkeypatch.undo()
    monkeypatch.setattr(type(tmp_path), "iterdir", denied)
    with pytest.raises(Err, match="cannot read calibration directory .*Permission denied"):
        load_calibration(tmp_path, one)


def test_not_npz_or_npy(one, tmp_path):
    (tmp_path / "c.csv").write_text("1,2,3,4\n")
    with pytest.raises(Err, match=r"is not a \.npz or \.npy file"):
        load_calibration(tmp_path / "c.csv", one)
    (tmp_path / "fake.npz").write_text("hello, not numpy")
    with pytest.raises(Err, match=r"is not a \.npz or \.npy file"):
        load_calibration(tmp_path / "fake.npz", one)


def test_corrupt_npz(one, tmp_path):
    np.savez(tmp_path / "good.npz", x=np.ones((100, 4), np.float32))
    raw = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "bad.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(Err, match="corrupt or truncated"):
        load_calibration(tmp_path / "bad.npz", one)


def test_directory_with_foreign_file_or_empty(one, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Err, match="calibration set is empty"):
        load_calibration(tmp_path / "empty", one)
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "a.npy", np.ones((1, 4), np.float32))
    (data / "notes.txt").write_text("x")
    with pytest.raises(Err, match=r"notes\.txt' is not a \.npz or \.npy file"):
        load_calibration(data, one)


def test_npy_directory_needs_one_input_model(two, tmp_path):
    np.save(tmp_path / "a.npy", np.ones((1, 3, 8, 8), np.float32))
    with pytest.raises(Err, match=r"one unnamed array but the model has 2 inputs \('x', 'ids'\)"):
        load_calibration(tmp_path, two)


def test_pickled_data_refused(one, tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([1, "a"], dtype=object))
    with pytest.raises(Err, match="pickled data"):
        load_calibration(tmp_path / "obj.npz", one)
    np.save(tmp_path / "obj.npy", np.array([1, "a"], dtype=object))
    with pytest.raises(Err, match="pickled data"):
        load_calibration(tmp_path / "obj.npy", one)
    (tmp_path / "p.npz").write_bytes(pickle.dumps({"x": np.ones((1, 4))}))
    with pytest.raises(Err, match="pickled data"):
        load_calibration(tmp_path / "p.npz", one)
    d = tmp_path / "d"
    d.mkdir()
    (d / "0.npz").write_bytes(pickle.dumps({"x": np.ones((1, 4))}))
    with pytest.raises(Err, match=r"calibration sample 0 .*0\.npz.* pickled data"):
        load_calibration(d, one)


def test_unknown_input_name_lists_expected(two, tmp_path):
    sample = two_sample()
    sample["pixels"] = sample.pop("x")
    with pytest.raises(Err, match=r"sample 0: input 'pixels' is not a model input; .* 'x', 'ids'"):
        load_calibration([sample], two)
    np.savez(tmp_path / "c.npz", **{"pixels": np.ones((1, 3, 8, 8), np.float32), "ids": np.ones((1, 2), np.int64)})
    with pytest.raises(Err, match="input 'pixels' is not a model input"):
        load_calibration(tmp_path / "c.npz", two)


def test_missing_input(two):
    good = two_sample()
    with pytest.raises(Err, match=r"sample 1: model input 'ids' is missing"):
        list(load_calibration([good, {"x": good["x"]}], two))


def test_wrong_rank(two):
    sample = two_sample()
    sample["x"] = sample["x"][0]
    with pytest.raises(Err, match=r"sample 0: input 'x' has rank 3 .* expects rank 4 \[N, 3, 8, 8\].*expand_dims"):
        load_calibration([sample], two)


def test_wrong_static_dimension(two):
    sample = two_sample()
    sample["x"] = np.ones((1, 4, 8, 8), np.float32)
    with pytest.raises(Err, match=r"sample 0: input 'x' has shape \[1, 4, 8, 8\] .* \(axis 1 must be 3\)"):
        load_calibration([sample], two)


def test_symbolic_dims_accept_any_size(two):
    samples = [two_sample(seq, batch=b) for seq, b in [(1, 1), (30, 3)]]
    assert [f["ids"].shape for f in load_calibration(samples, two)] == [(1, 1), (3, 30)]


def test_shared_symbolic_dim_must_agree(two):
    sample = {"x": np.ones((2, 3, 8, 8), np.float32), "ids": np.ones((3, 4), np.int64)}
    with pytest.raises(Err, match=r"input 'ids' has size 3 on axis 0 \('N'\) but input 'x' has 2"):
        load_calibration([sample], two)


def test_integer_data_for_float_input(two, tmp_path):
    sample = two_sample()
    sample["x"] = np.ones((1, 3, 8, 8), np.uint8)
    with pytest.raises(Err, match=r"sample 0: input 'x' holds uint8 data but the model input is float32"):
        load_calibration([sample], two)
    np.savez(tmp_path / "c.npz", x=np.ones((2, 4), np.int64))
    with pytest.raises(Err, match="input 'x' holds int64 data"):
        load_calibration(tmp_path / "c.npz", qpass.load_model(one_input_proto()))


def test_float_data_for_integer_input(two):
    sample = two_sample()
    sample["ids"] = sample["ids"].astype(np.float32)
    with pytest.raises(Err, match=r"input 'ids' holds float32 data but the model input is int64"):
        load_calibration([sample], two)


def test_integer_out_of_range_for_narrower_input():
    graph = helper.make_graph(
        [helper.make_node("Identity", ["i"], ["y"])],
        "i32",
        [helper.make_tensor_value_info("i", TensorProto.INT32, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["N"])],
    )
    model = qpass.load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    (feed,) = list(load_calibration([{"i": np.array([1, 2], np.int64)}], model))
    assert feed["i"].dtype == np.int32
    with pytest.raises(Err, match="outside the range"):
        load_calibration([{"i": np.array([2**40], np.int64)}], model)


@pytest.mark.parametrize("bad_id", [10, -11])
def test_token_ids_outside_the_embedding_table(two, tmp_path, bad_id):
    """ids index a 10-row table: [-10, 9] is accepted, anything else names the input and the table size."""
    ok = two_sample()
    ok["ids"][0, :2] = [9, -10]
    (feed,) = list(load_calibration([ok], two))
    assert feed["ids"].tolist() == ok["ids"].tolist()
    bad = two_sample(seed=1)
    bad["ids"][0, 3] = bad_id
    with pytest.raises(Err, match=rf"calibration sample 1: input 'ids' holds {bad_id}, but it indexes a table of 10 rows"):
        list(load_calibration([two_sample(), bad], two))
    stacked = {k: np.concatenate([two_sample()[k], bad[k]]) for k in bad}  # the .npz path checks all rows at once
    np.savez(tmp_path / "c.npz", **stacked)
    with pytest.raises(Err, match="indexes a table of 10 rows"):
        load_calibration(tmp_path / "c.npz", two)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_names_input_and_sample(two, tmp_path, bad):
    samples = [two_sample(seed=i) for i in range(3)]
    samples[2]["x"][0, 1, 2, 3] = bad
    with pytest.raises(Err, match=r"calibration sample 2: input 'x' contains NaN or Inf"):
        list(load_calibration(samples, two))
    x = rng().standard_normal((6, 4)).astype(np.float32)
    x[4, 0] = bad
    np.savez(tmp_path / "c.npz", x=x)
    with pytest.raises(Err, match=r"calibration sample 4 \(.*c\.npz'\): input 'x' contains NaN or Inf"):
        load_calibration(tmp_path / "c.npz", qpass.load_model(one_input_proto()))


def test_nan_in_first_sample_caught_up_front(one):
    def gen():
        yield {"x": np.full((1, 4), np.nan, np.float32)}

    with pytest.raises(Err, match="sample 0: input 'x' contains NaN or Inf"):
        load_calibration(gen(), one)


def test_empty_sources(one, tmp_path):
    with pytest.raises(Err, match="calibration set is empty"):
        load_calibration([], one)
    with pytest.raises(Err, match="calibration set is empty"):
        load_calibration(iter(()), one)
    np.savez(tmp_path / "c.npz", x=np.ones((0, 4), np.float32))
    with pytest.raises(Err, match="calibration set is empty.*0 samples"):
        load_calibration(tmp_path / "c.npz", one)
    with pytest.raises(Err, match="no calibration data given"):
        load_calibration(None, one)


def test_zero_size_array(two):
    sample = two_sample()
    sample["ids"] = np.ones((1, 0), np.int64)
    with pytest.raises(Err, match=r"sample 0: input 'ids' is empty \(shape \[1, 0\]\)"):
        load_calibration([sample], two)


def test_dataloader_with_labels_is_refused(one):
    loader = DataLoader(TensorDataset(torch.randn(4, 4), torch.zeros(4)), batch_size=2)
    with pytest.raises(Err, match=r"sample 0 holds 2 arrays but the model has 1 inputs \('x'\)"):
        load_calibration(loader, one)


def test_bad_sample_type_and_bad_options(one):
    with pytest.raises(Err, match="sample 0 is a str"):
        load_calibration(["x"], one)
    with pytest.raises(Err, match="cannot read calibration data from int"):
        load_calibration(3, one)
    with pytest.raises(Err, match="limit must be"):
        load_calibration([{"x": np.ones((1, 4), np.float32)}], one, limit=0)
    with pytest.raises(Err, match="either calibration data or random_samples"):
        load_calibration([{"x": np.ones((1, 4), np.float32)}], one, random_samples=2)
    with pytest.raises(Err, match="not numeric|not a numeric"):
        load_calibration([{"x": np.array([["a", "b", "c", "d"]])}], one)


def test_error_inside_user_iterable_becomes_calibration_error(one):
    def gen():
        yield {"x": np.ones((1, 4), np.float32)}
        raise RuntimeError("disk gone")

    calib = load_calibration(gen(), one)
    with pytest.raises(Err, match="reading calibration sample 1 .* failed: disk gone"):
        list(calib)


def test_messages_are_one_line(two, tmp_path):
    sample = two_sample()
    sample["x"] = sample["x"].astype(np.int32)
    with pytest.raises(Err) as info:
        load_calibration([sample], two)
    assert "\n" not in str(info.value)
