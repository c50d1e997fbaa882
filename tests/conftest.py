import onnx
import pytest
from helpers import small_model


@pytest.fixture
def small_model_path(tmp_path):
    path = tmp_path / "small.onnx"
    onnx.save(small_model(), path)
    return path
