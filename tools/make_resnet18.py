"""Write a ResNet-18-sized ONNX classifier for CIFAR-sized inputs, random weights.

Built with onnx.helper alone (no framework), so the GPU check needs no torch:
3x3 stem (64), four stages of two basic blocks (64, 128, 256, 512 channels,
stride 2 from stage 2, 1x1 projection shortcuts), BatchNorm folded into the
convolutions, global average pool, Gemm to 10 classes. He-initialised,
seeded. About 11.2 M parameters, 0.56 GFLOP per 32x32 image.

    python tools/make_resnet18.py OUT.onnx
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(seed: int = 0, classes: int = 10) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    counter = [0]

    def conv(x: str, cin: int, cout: int, k: int, stride: int, relu: bool) -> str:
        counter[0] += 1
        i = counter[0]
        w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(
            np.float32
        )
        inits.extend(
            [
                numpy_helper.from_array(w, f"conv{i}.weight"),
                numpy_helper.from_array(np.zeros(cout, np.float32), f"conv{i}.bias"),
            ]
        )
        out = f"conv{i}"
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"conv{i}.weight", f"conv{i}.bias"],
                [out],
                name=f"Conv_{i}",
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[k // 2] * 4,
            )
        )
        if relu:
            nodes.append(helper.make_node("Relu", [out], [out + "_relu"], name=f"Relu_{i}"))
            return out + "_relu"
        return out

    x = conv("input", 3, 64, 3, 1, True)
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            h = conv(x, cin, cout, 3, stride, True)
            h = conv(h, cout, cout, 3, 1, False)
            short = conv(x, cin, cout, 1, stride, False) if (stride != 1 or cin != cout) else x
            name = f"add{stage}_{block}"
            nodes.append(helper.make_node("Add", [h, short], [name], name=f"Add_{stage}_{block}"))
            nodes.append(
                helper.make_node("Relu", [name], [name + "_relu"], name=f"Relu_{stage}_{block}")
            )
            x, cin = name + "_relu", cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="GAP"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="Flatten", axis=1))
    fc = (rng.standard_normal((classes, 512)) * np.sqrt(1.0 / 512)).astype(np.float32)
    inits += [
        numpy_helper.from_array(fc, "fc.weight"),
        numpy_helper.from_array(np.zeros(classes, np.float32), "fc.bias"),
    ]
    nodes.append(
        helper.make_node(
            "Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="Gemm_fc", transB=1
        )
    )
    graph = helper.make_graph(
        nodes,
        "resnet18_cifar",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="onnxfbp-tools"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    onnx.save_model(build(args.seed), args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
