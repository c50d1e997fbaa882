"""Demo models built in code (no download): a small CNN and a post-LN transformer block.

Both are written the way exporters write them, so the canonicalization passes have
work to do: BatchNorm after bias-less Convs and after a MatMul+Add, a decomposed
LayerNorm, an erf GELU, Identity nodes and a no-op Reshape. Weights are seeded, so the
models are the same bytes on every machine.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["demo_cnn", "demo_transformer", "demo_vit", "demo_models", "demo_calibration"]


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def _bn(rng, prefix: str, channels: int) -> list[onnx.TensorProto]:
    return [
        _init(f"{prefix}.gamma", rng.uniform(0.5, 1.5, channels).astype(np.float32)),
        _init(f"{prefix}.beta", rng.normal(0, 0.1, channels).astype(np.float32)),
        _init(f"{prefix}.mean", rng.normal(0, 0.1, channels).astype(np.float32)),
        _init(f"{prefix}.var", rng.uniform(0.5, 1.5, channels).astype(np.float32)),
    ]


def demo_cnn(seed: int = 0) -> onnx.ModelProto:
    """Conv-BN-ReLU x2, pooling, MatMul+Add-BN head, Gemm classifier. Input [N, 3, 32, 32]."""
    rng = np.random.default_rng(seed)
    he = lambda *shape: (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)  # noqa: E731
    inits = [
        _init("conv1.weight", he(16, 3, 3, 3)),
        *_bn(rng, "bn1", 16),
        _init("conv2.weight", he(32, 16, 3, 3)),
        _init("conv2.bias", rng.normal(0, 0.1, 32).astype(np.float32)),
        *_bn(rng, "bn2", 32),
        _init("fc1.weight", (rng.standard_normal((32, 64)) / np.sqrt(32)).astype(np.float32)),
        _init("fc1.bias", rng.normal(0, 0.1, 64).astype(np.float32)),
        *_bn(rng, "bn3", 64),
        _init("fc2.weight", (rng.standard_normal((10, 64)) / 8).astype(np.float32)),
        _init("fc2.bias", np.zeros(10, np.float32)),
        _init("flat_shape", np.array([-1, 32], np.int64)),
    ]
    bn = lambda x, p, y: helper.make_node(  # noqa: E731
        "BatchNormalization", [x, f"{p}.gamma", f"{p}.beta", f"{p}.mean", f"{p}.var"], [y], name=p
    )
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        bn("c1", "bn1", "b1"),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        bn("c2", "bn2", "b2"),
        helper.make_node("Relu", ["b2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="pool"),
        helper.make_node("Reshape", ["gap", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("Identity", ["flat"], ["flat_id"], name="identity"),
        helper.make_node("MatMul", ["flat_id", "fc1.weight"], ["m1"], name="fc1"),
        helper.make_node("Add", ["m1", "fc1.bias"], ["a1"], name="fc1.add"),
        bn("a1", "bn3", "b3"),
        helper.make_node("Relu", ["b3"], ["r3"], name="relu3"),
        helper.make_node("Gemm", ["r3", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "demo_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="qpass-demo", ir_version=8)


def demo_transformer(seed: int = 0, hidden: int = 64, heads: int = 4, ffn: int = 256, seq: int = 16) -> onnx.ModelProto:
    """One post-LN BERT block (attention + erf-GELU FFN, decomposed LayerNorms). Input [N, seq, hidden]."""
    rng = np.random.default_rng(seed)
    dh = hidden // heads
    lin = lambda i, o: (rng.standard_normal((i, o)) / np.sqrt(i)).astype(np.float32)  # noqa: E731
    inits = []
    nodes = []
    for name, (i, o) in {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "o": (hidden, hidden), "fc1": (hidden, ffn), "fc2": (ffn, hidden)}.items():
        inits += [_init(f"{name}.weight", lin(i, o)), _init(f"{name}.bias", rng.normal(0, 0.02, o).astype(np.float32))]
    gamma = rng.uniform(0.8, 1.2, hidden).astype(np.float32)
    gamma[[3, 17]] = 8.0  # outlier channels, as trained transformers have
    inits += [
        _init("ln1.gamma", gamma), _init("ln1.beta", rng.normal(0, 0.05, hidden).astype(np.float32)),
        _init("ln2.gamma", rng.uniform(0.8, 1.2, hidden).astype(np.float32)), _init("ln2.beta", np.zeros(hidden, np.float32)),
        _init("heads_shape", np.array([0, 0, heads, dh], np.int64)), _init("merge_shape", np.array([0, 0, hidden], np.int64)),
        _init("same_shape", np.array([0, 0, hidden], np.int64)),
        _init("axes", np.array([-1], np.int64)), _init("two", np.array(2.0, np.float32)), _init("eps", np.array(1e-12, np.float32)),
        _init("scale", np.array(1 / np.sqrt(dh), np.float32)), _init("sqrt2", np.array(np.sqrt(2.0), np.float32)),
        _init("one", np.array(1.0, np.float32)), _init("half", np.array(0.5, np.float32)),
    ]

    def linear(x, name, out):
        nodes.extend([
            helper.make_node("MatMul", [x, f"{name}.weight"], [f"{name}.mm"], name=name),
            helper.make_node("Add", [f"{name}.mm", f"{name}.bias"], [out], name=f"{name}.add"),
        ])

    def layernorm(x, name, out):
        p = name
        nodes.extend([
            helper.make_node("ReduceMean", [x, "axes"], [f"{p}.mean"], name=f"{p}.mean"),
            helper.make_node("Sub", [x, f"{p}.mean"], [f"{p}.d"], name=f"{p}.sub"),
            helper.make_node("Pow", [f"{p}.d", "two"], [f"{p}.d2"], name=f"{p}.pow"),
            helper.make_node("ReduceMean", [f"{p}.d2", "axes"], [f"{p}.var"], name=f"{p}.var"),
            helper.make_node("Add", [f"{p}.var", "eps"], [f"{p}.vare"], name=f"{p}.addeps"),
            helper.make_node("Sqrt", [f"{p}.vare"], [f"{p}.std"], name=f"{p}.sqrt"),
            helper.make_node("Div", [f"{p}.d", f"{p}.std"], [f"{p}.n"], name=f"{p}.div"),
            helper.make_node("Mul", [f"{p}.n", f"{p}.gamma"], [f"{p}.g"], name=f"{p}.mul"),
            helper.make_node("Add", [f"{p}.g", f"{p}.beta"], [out], name=f"{p}.add"),
        ])

    for name in ("q", "k", "v"):
        linear("hidden_states", name, f"{name}.out")
        nodes.append(helper.make_node("Reshape", [f"{name}.out", "heads_shape"], [f"{name}.heads"], name=f"{name}.split_heads"))
        perm = [0, 2, 3, 1] if name == "k" else [0, 2, 1, 3]
        nodes.append(helper.make_node("Transpose", [f"{name}.heads"], [f"{name}.t"], name=f"{name}.transpose", perm=perm))
    nodes += [
        helper.make_node("MatMul", ["q.t", "k.t"], ["scores"], name="attn.qk"),
        helper.make_node("Mul", ["scores", "scale"], ["scores_scaled"], name="attn.scale"),
        helper.make_node("Softmax", ["scores_scaled"], ["probs"], name="attn.softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "v.t"], ["context"], name="attn.pv"),
        helper.make_node("Transpose", ["context"], ["context.t"], name="attn.merge_transpose", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context.t", "merge_shape"], ["context.merged"], name="attn.merge_heads"),
    ]
    linear("context.merged", "o", "attn.out")
    nodes.append(helper.make_node("Add", ["attn.out", "hidden_states"], ["res1"], name="attn.residual"))
    layernorm("res1", "ln1", "h1")
    nodes.append(helper.make_node("Identity", ["h1"], ["h1.id"], name="identity"))
    linear("h1.id", "fc1", "fc1.out")
    nodes += [
        helper.make_node("Div", ["fc1.out", "sqrt2"], ["g.div"], name="gelu.div"),
        helper.make_node("Erf", ["g.div"], ["g.erf"], name="gelu.erf"),
        helper.make_node("Add", ["g.erf", "one"], ["g.add"], name="gelu.add"),
        helper.make_node("Mul", ["fc1.out", "g.add"], ["g.mul"], name="gelu.mul"),
        helper.make_node("Mul", ["g.mul", "half"], ["gelu.out"], name="gelu.half"),
    ]
    linear("gelu.out", "fc2", "ffn.out")
    nodes.append(helper.make_node("Reshape", ["ffn.out", "same_shape"], ["ffn.out.r"], name="ffn.noop_reshape"))
    nodes.append(helper.make_node("Add", ["ffn.out.r", "h1.id"], ["res2"], name="ffn.residual"))
    layernorm("res2", "ln2", "output")
    graph = helper.make_graph(
        nodes,
        "demo_transformer",
        [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, ["batch", seq, hidden])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", seq, hidden])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], producer_name="qpass-demo", ir_version=9)


def demo_vit(
    seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4, tokens: int = 17, sharpness: float = 1.0
) -> onnx.ModelProto:
    """Pre-LN ViT blocks (LayerNormalization -> attention / MLP, residual adds) with outlier
    channels in the LayerNorm gammas, as trained ViTs have. Input [N, tokens, hidden].
    ``sharpness`` scales the q/k weights: > 1 gives peaked attention rows like trained models."""
    rng = np.random.default_rng(seed)
    dh, ffn = hidden // heads, hidden * 4
    inits: list = [
        _init("heads_shape", np.array([0, 0, heads, dh], np.int64)), _init("merge_shape", np.array([0, 0, hidden], np.int64)),
        _init("scale", np.array(1 / np.sqrt(dh), np.float32)),
    ]
    nodes: list = []
    x = "tokens"
    for i in range(layers):
        p = f"blocks.{i}"
        for ln in ("norm1", "norm2"):
            gamma = rng.uniform(0.5, 1.5, hidden).astype(np.float32)
            gamma[rng.choice(hidden, 3, replace=False)] *= 12.0
            inits += [_init(f"{p}.{ln}.weight", gamma), _init(f"{p}.{ln}.bias", rng.normal(0, 0.5, hidden).astype(np.float32))]
        lin = {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "proj": (hidden, hidden), "fc1": (hidden, ffn), "fc2": (ffn, hidden)}
        for name, (a, b) in lin.items():
            gain = sharpness if name in ("q", "k") else 1.0
            inits += [_init(f"{p}.{name}.weight", (gain * rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)),
                      _init(f"{p}.{name}.bias", rng.normal(0, 0.02, b).astype(np.float32))]

        def linear(inp, name, out):
            nodes.extend([helper.make_node("MatMul", [inp, f"{p}.{name}.weight"], [f"{p}.{name}.mm"], name=f"{p}.{name}"),
                          helper.make_node("Add", [f"{p}.{name}.mm", f"{p}.{name}.bias"], [out], name=f"{p}.{name}.add")])

        nodes.append(helper.make_node("LayerNormalization", [x, f"{p}.norm1.weight", f"{p}.norm1.bias"], [f"{p}.n1"], name=f"{p}.norm1", axis=-1))
        for name in ("q", "k", "v"):
            linear(f"{p}.n1", name, f"{p}.{name}.out")
            nodes.append(helper.make_node("Reshape", [f"{p}.{name}.out", "heads_shape"], [f"{p}.{name}.h"], name=f"{p}.{name}.split"))
            perm = [0, 2, 3, 1] if name == "k" else [0, 2, 1, 3]
            nodes.append(helper.make_node("Transpose", [f"{p}.{name}.h"], [f"{p}.{name}.t"], name=f"{p}.{name}.transpose", perm=perm))
        nodes += [
            helper.make_node("MatMul", [f"{p}.q.t", f"{p}.k.t"], [f"{p}.scores"], name=f"{p}.attn.qk"),
            helper.make_node("Mul", [f"{p}.scores", "scale"], [f"{p}.scaled"], name=f"{p}.attn.scale"),
            helper.make_node("Softmax", [f"{p}.scaled"], [f"{p}.probs"], name=f"{p}.attn.softmax", axis=-1),
            helper.make_node("MatMul", [f"{p}.probs", f"{p}.v.t"], [f"{p}.ctx"], name=f"{p}.attn.pv"),
            helper.make_node("Transpose", [f"{p}.ctx"], [f"{p}.ctx.t"], name=f"{p}.attn.merge_t", perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [f"{p}.ctx.t", "merge_shape"], [f"{p}.ctx.m"], name=f"{p}.attn.merge"),
        ]
        linear(f"{p}.ctx.m", "proj", f"{p}.attn.out")
        nodes.append(helper.make_node("Add", [x, f"{p}.attn.out"], [f"{p}.res1"], name=f"{p}.res1"))
        nodes.append(helper.make_node("LayerNormalization", [f"{p}.res1", f"{p}.norm2.weight", f"{p}.norm2.bias"], [f"{p}.n2"], name=f"{p}.norm2", axis=-1))
        linear(f"{p}.n2", "fc1", f"{p}.fc1.out")
        nodes.append(helper.make_node("Gelu", [f"{p}.fc1.out"], [f"{p}.gelu"], name=f"{p}.gelu"))
        linear(f"{p}.gelu", "fc2", f"{p}.mlp.out")
        out = "embedding" if i == layers - 1 else f"{p}.out"
        nodes.append(helper.make_node("Add", [f"{p}.res1", f"{p}.mlp.out"], [out], name=f"{p}.res2"))
        x = out
    graph = helper.make_graph(
        nodes, "demo_vit",
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", tokens, hidden])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", tokens, hidden])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], producer_name="qpass-demo", ir_version=9)


def demo_models() -> dict[str, onnx.ModelProto]:
    return {"demo-cnn": demo_cnn(), "demo-transformer": demo_transformer()}


def demo_calibration(model: onnx.ModelProto, samples: int = 32, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """Generated calibration batches (batch 1) shaped like the model's input."""
    rng = np.random.default_rng(seed)
    inp = model.graph.input[0]
    shape = [d.dim_value if d.HasField("dim_value") else 1 for d in inp.type.tensor_type.shape.dim]
    return [{inp.name: rng.standard_normal(shape).astype(np.float32)} for _ in range(samples)]
