"""Forward: run the model with onnxruntime in batches, returning the tensors the
rules need, with the weights being refined fed as inputs.

An internal copy of the graph (never written out) differs from the user's in
three ways:

1. the refinable weights are graph inputs instead of initializers, so new
   values are fed at run time and no session is rebuilt per layer;
2. every tensor the reverse pass needs is a graph output;
3. a fixed batch dimension (1, 64, ...) is made symbolic, with batch constants
   in the Reshape shapes of activations replaced by 0 ("copy this dim"); so is a
   symbolic batch dimension that cannot really hold 3 samples (batch 1 baked into
   a Reshape constant by the exporter). The change is verified against the
   original graph run in chunks of the fixed size, on every output, with random
   samples; if it does not hold, batches are fed in such chunks instead (padding
   the last one).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModelError

__all__ = [
    "ForwardRunner", "available_providers", "choose_providers", "cuda_starts", "inference_session",
]


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def choose_providers(device: str) -> list[str]:
    """Execution providers for ``auto`` (CUDA if present), ``cpu`` or ``cuda``."""
    available = available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        from ..errors import OnnxfbpError  # noqa: PLC0415

        if "CUDAExecutionProvider" not in available:
            raise OnnxfbpError(
                "--device cuda needs onnxruntime-gpu with the CUDA provider; "
                "install onnxfbp[gpu] or use --device cpu"
            )
        if not cuda_starts():
            raise OnnxfbpError(
                "--device cuda: onnxruntime's CUDA provider is installed but does not start "
                "(its CUDA or cuDNN libraries are not on the loader's path, or no GPU); "
                "see the README's GPU section, or use --device cpu"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available and cuda_starts():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@functools.cache
def cuda_starts() -> bool:
    """Whether onnxruntime's CUDA provider really runs here. A session asked for it
    runs on the CPU instead, with nothing but a logged error, when a CUDA or cuDNN
    library is missing; one tiny probe session (per process) tells."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the answer is the provider list, not a log line
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), options,
            providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
        )
    except Exception:
        return False
    return session.get_providers()[0] == "CUDAExecutionProvider"


# CUDA provider settings. TF32 rounds the inputs of matrix products and convolutions
# to 10 mantissa bits: on an H100 the forward tensors, and with them the residuals
# and the solved weights, moved by ~1e-3 relative to the CPU's, for a model that is
# deployed and scored in float32. Exhaustive cuDNN algorithm search benchmarks every
# convolution on each new session and batch shape, and a refine builds several
# sessions and sees several batch shapes; the heuristic choice skips that (its
# effect was not timed apart from the other changes measured on the H100).
CUDA_OPTIONS = {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}


def inference_session(
    model: onnx.ModelProto, providers: list[str], threads: int | None
) -> ort.InferenceSession:
    """An onnxruntime session for ``model`` (:class:`ModelError` if it does not load),
    the CUDA provider with :data:`CUDA_OPTIONS`."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # NumPy works between runs: idle workers must not spin and take its cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(
            model.SerializeToString(), options,
            providers=[(p, CUDA_OPTIONS) if p == "CUDAExecutionProvider" else p
                       for p in providers],
        )
    except Exception as exc:
        msg = str(exc).splitlines()[0][:300]
        raise ModelError(f"onnxruntime cannot load the model: {msg}") from exc


def _quiet() -> ort.RunOptions:
    """Run options for probes: a failing probe is an answer, not an error to log."""
    options = ort.RunOptions()
    options.log_severity_level = 4
    return options


def _shape_constant(name: str, inits: dict[str, onnx.TensorProto],
                    const_nodes: dict[str, onnx.NodeProto]) -> np.ndarray | None:
    """The value of a shape input stored as an initializer or a Constant node."""
    if name in inits:
        return numpy_helper.to_array(inits[name]).copy()
    node = const_nodes.get(name)
    if node is None:
        return None
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t).copy()
        if attr.name == "value_ints":
            return np.asarray(list(attr.ints), dtype=np.int64)
    return None


def _dynamic_batch_copy(model: onnx.ModelProto, input_name: str, fixed: int) -> onnx.ModelProto:
    """A copy whose batch dim is symbolic: input/output dims of size ``fixed`` become
    ``batch`` and the leading ``fixed`` of constant Reshape shapes applied to tensors
    computed from the input becomes 0 ("copy the input's dim"; with ``allowzero=1`` the
    attribute is dropped when the shape has no other 0, else -1 is used if free).
    Reshapes of weights (no path from the input) are left alone."""
    m = copy.deepcopy(model)
    g = m.graph
    for vi in list(g.input) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        if vi.name in (input_name, *(o.name for o in g.output)) and dims \
                and dims[0].HasField("dim_value") and dims[0].dim_value == fixed:
            dims[0].Clear()
            dims[0].dim_param = "batch"
    del g.value_info[:]
    inits = {t.name: t for t in g.initializer}
    const_nodes = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    from_input = {input_name}
    for node in g.node:  # topological order
        if any(i in from_input for i in node.input):
            from_input.update(node.output)
    for node in g.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[0] not in from_input:
            continue
        shape = _shape_constant(node.input[1], inits, const_nodes)
        if shape is None or shape.ndim != 1 or not len(shape) or shape[0] != fixed:
            continue
        allowzero = next((a for a in node.attribute if a.name == "allowzero"), None)
        if allowzero is not None and allowzero.i and (shape[1:] == 0).any():
            if -1 in shape:
                continue
            shape[0] = -1
        else:
            shape[0] = 0
            if allowzero is not None:
                node.attribute.remove(allowzero)
        new_name = f"{node.input[1]}__onnxfbp_dynbatch_{node.name or id(node)}"
        g.initializer.append(numpy_helper.from_array(shape.astype(np.int64), new_name))
        node.input[1] = new_name
    return m


class ForwardRunner:
    """Batched onnxruntime execution of a plan's internal graph.

    ``weight_inputs`` are initializer names turned into graph inputs;
    ``extra_outputs`` are intermediate tensors to return.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        input_name: str,
        weight_inputs: Iterable[str],
        extra_outputs: Iterable[str],
        providers: list[str],
        batch_size: int = 256,
        threads: int | None = None,
    ) -> None:
        self.input_name = input_name
        # every data input of the graph, fed by name (a batch of several: a Mapping)
        inits = {t.name for t in model.graph.initializer}
        self.input_names = [i.name for i in model.graph.input if i.name not in inits]
        self.batch_size = batch_size
        self.providers = providers
        internal = copy.deepcopy(model)
        g = internal.graph
        weights = set(weight_inputs)
        keep: list[onnx.TensorProto] = []
        moved: list[onnx.TensorProto] = []
        for t in g.initializer:
            (moved if t.name in weights else keep).append(t)
        self.initial_weights = {t.name: numpy_helper.to_array(t) for t in moved}
        del g.initializer[:]
        g.initializer.extend(keep)
        existing_inputs = {i.name for i in g.input}
        for t in moved:
            if t.name not in existing_inputs:
                g.input.append(
                    onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        present = {o.name for o in g.output}
        for name in extra_outputs:
            if name and name not in present:
                g.output.append(onnx.ValueInfoProto(name=name))
                present.add(name)
        self.output_names = [o.name for o in g.output]
        self.fixed_batch = self._fixed_batch(internal)
        self.chunk: int | None = None
        self._internal = internal
        self._served = internal  # the graph self.session runs
        self._threads = threads
        self.session = inference_session(internal, providers, threads)
        in_meta = next(i for i in self.session.get_inputs() if i.name == input_name)
        self.input_type = {"tensor(float)": np.float32, "tensor(double)": np.float64,
                           "tensor(float16)": np.float16}.get(in_meta.type, np.float32)
        if self.fixed_batch is not None or not self._runs_batched():
            self._make_batch_dynamic(threads)

    def _fixed_batch(self, model: onnx.ModelProto) -> int | None:
        vi = next(i for i in model.graph.input if i.name == self.input_name)
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            return int(dims[0].dim_value)
        return None

    def _sample_shape(self, name: str | None = None) -> list[int] | None:
        vi = next(i for i in self._internal.graph.input if i.name == (name or self.input_name))
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim[1:]]
        return dims if all(dims) else None

    def probe(self, n: int) -> Any:
        """``n`` random inputs of the model's sample shape (None if it is symbolic);
        a model with several inputs: one array per input, by name."""
        shapes = {name: self._sample_shape(name) for name in self.input_names}
        if any(shape is None for shape in shapes.values()):
            return None
        rng = np.random.default_rng(0)
        arrays = {name: rng.standard_normal((n, *shape)).astype(self.input_type)  # type: ignore[misc]
                  for name, shape in shapes.items()}
        return arrays[self.input_name] if len(arrays) == 1 else _inputs(arrays)

    def feeds(self, x: Any) -> dict[str, np.ndarray]:
        """The input feeds of batch ``x``: an array (the one input) or a Mapping of
        arrays by input name."""
        if isinstance(x, Mapping):
            return {name: np.asarray(v, dtype=self.input_type) for name, v in x.items()}
        return {self.input_name: np.asarray(x, dtype=self.input_type)}

    def _runs_batched(self) -> bool:
        """Whether a symbolic-batch model really runs a batch of 3 (it may bake batch 1
        into a Reshape constant). Unknown sample shapes are taken on trust."""
        probe = self.probe(3)
        if probe is None:
            return True
        try:
            got = self.session.run(self.output_names,
                                   {**self.feeds(probe), **self.initial_weights}, _quiet())
        except Exception:
            return False
        return all(np.ndim(v) >= 1 and np.shape(v)[0] == 3 for v in got)

    def _make_batch_dynamic(self, threads: int | None) -> None:
        """Try a symbolic batch dim; keep it only if it reproduces the original run
        in chunks of the fixed batch size (1 when the input dim was symbolic)."""
        fixed = self.fixed_batch or 1
        self.chunk = fixed
        probe = self.probe(2 * fixed + 1)
        if probe is None:
            return
        try:
            expected = self.run(probe, self.output_names, self.initial_weights)
            dynamic = _dynamic_batch_copy(self._internal, self.input_name, fixed)
            session = inference_session(dynamic, self.providers, threads)
            feeds = {**self.feeds(probe), **self.initial_weights}
            got = session.run(self.output_names, feeds, _quiet())
        except Exception:
            return
        for name, value in zip(self.output_names, got, strict=True):
            ref = expected[name]
            if value.shape != ref.shape or not np.allclose(value, ref, rtol=1e-4, atol=1e-4):
                return
        self.session, self.chunk, self._served = session, None, dynamic

    def frozen(
        self, weights: Mapping[str, np.ndarray], outputs: list[str]
    ) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
        """A runner for ``outputs`` only, with ``weights`` stored in the graph.

        Fed as inputs, weights cannot be pre-packed and requested intermediate
        outputs block fusions: on the shared MNIST CNN a forward pass runs 2-3x
        slower per sample than the original model. For many forward passes with
        the same weights (scoring, features of the output layer) this session is
        worth building on the CPU. On the CUDA provider (no CPU pre-packing to gain,
        and every session has its own start-up: kernels, memory arena), when
        batches are chunked or when the session does not build, this is :meth:`run`.
        """
        def fallback(x: np.ndarray) -> dict[str, np.ndarray]:
            return self.run(x, outputs, weights)

        if self.chunk is not None or "CUDAExecutionProvider" in self.providers:
            return fallback
        model = copy.deepcopy(self._served)
        g = model.graph
        inputs = [i for i in g.input if i.name not in weights]
        del g.input[:]
        g.input.extend(inputs)
        g.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in weights.items())
        del g.output[:]
        g.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
        try:
            session = inference_session(model, self.providers, self._threads)
        except Exception:
            return fallback

        def run(x: np.ndarray) -> dict[str, np.ndarray]:
            return dict(zip(outputs, session.run(outputs, self.feeds(x)), strict=True))

        return run

    def run(
        self, x: np.ndarray, outputs: list[str], weights: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Run on ``x`` (one batch of any size); returns the named outputs."""
        inputs = self.feeds(x)
        feeds: dict[str, Any] = dict(weights)
        if self.chunk is None:
            feeds.update(inputs)
            return dict(zip(outputs, self.session.run(outputs, feeds), strict=True))
        parts: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
        for start in range(0, len(next(iter(inputs.values()))), self.chunk):
            for key, whole in inputs.items():
                piece = whole[start : start + self.chunk]
                n = len(piece)
                if n < self.chunk:
                    pad = np.zeros((self.chunk - n, *piece.shape[1:]), piece.dtype)
                    piece = np.concatenate([piece, pad])
                feeds[key] = piece
            for name, value in zip(outputs, self.session.run(outputs, feeds), strict=True):
                parts[name].append(value[:n])
        return {name: np.concatenate(vals) for name, vals in parts.items()}


def _inputs(arrays: dict[str, np.ndarray]) -> Any:
    from ..multidata import Inputs  # noqa: PLC0415

    return Inputs(arrays)
