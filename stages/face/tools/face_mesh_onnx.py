#!/usr/bin/env python3
"""Convert MediaPipe's face landmark model (`face_landmark.tflite`, 468-point face mesh,
Apache-2.0, shipped in the `mediapipe` PyPI wheel) to ONNX.

    python face_mesh_onnx.py face_landmark.tflite face_mesh_468.onnx

The model is a small convolutional network (CONV_2D, DEPTHWISE_CONV_2D, PRELU, ADD,
MAX_POOL_2D, PAD and DEQUANTIZE of its float16 weights), so this converter handles
exactly those operators and refuses anything else. The ONNX graph is NCHW:
input `input` [1, 3, 192, 192] RGB scaled to [0, 1]; outputs `landmarks` [1, 1404]
(468 x (x, y, z) in input pixels) and `face_flag` [1, 1] (a logit: sigmoid > 0.5 means a
face). Needs the `tflite` (flatbuffer reader), `numpy` and `onnx` packages.
"""
import sys

import numpy as np
import onnx
import tflite
from onnx import TensorProto, helper, numpy_helper

FLOAT32, FLOAT16, INT32 = 0, 1, 2
SAME = 0


def main(src, dst):
    model = tflite.Model.GetRootAsModel(open(src, "rb").read(), 0)
    g = model.Subgraphs(0)
    names = {v: k for k, v in tflite.BuiltinOperator.__dict__.items() if not k.startswith("_")}

    def tensor(i):
        return g.Tensors(i)

    def shape(i):
        return tensor(i).ShapeAsNumpy().tolist()

    def const(i):
        t = tensor(i)
        buf = model.Buffers(t.Buffer())
        if buf.DataLength() == 0:
            return None
        dt = {FLOAT32: np.float32, FLOAT16: np.float16, INT32: np.int32}[t.Type()]
        return np.frombuffer(buf.DataAsNumpy().tobytes(), dt).reshape(shape(i))

    consts = {}  # tensor index -> float32 array (NHWC-shaped, as in the tflite file)
    nodes, inits = [], []
    name = lambda i: "t%d" % i  # noqa: E731

    def init(arr, label):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), label))
        return label

    def act(out, fused, k):
        if fused == 0:
            return out
        if fused == 1:
            nodes.append(helper.make_node("Relu", [out + "_pre"], [out], name="relu%d" % k))
            return out + "_pre"
        raise SystemExit("unsupported fused activation %d" % fused)

    def same_pads(in_hw, k, s):
        pads = []
        for n, kk in zip(in_hw, k):
            o = -(-n // s)
            total = max((o - 1) * s + kk - n, 0)
            pads.append((total // 2, total - total // 2))
        return [pads[0][0], pads[1][0], pads[0][1], pads[1][1]]

    for k in range(g.OperatorsLength()):
        op = g.Operators(k)
        code = model.OperatorCodes(op.OpcodeIndex())
        kind = names[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())]
        ins = [op.Inputs(j) for j in range(op.InputsLength())]
        out = op.Outputs(0)
        opt = op.BuiltinOptions()
        if kind == "DEQUANTIZE":
            consts[out] = const(ins[0]).astype(np.float32)
            continue
        w = lambda i: consts[i] if i in consts else const(i).astype(np.float32)  # noqa: E731
        if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            if kind == "CONV_2D":
                o = tflite.Conv2DOptions()
                o.Init(opt.Bytes, opt.Pos)
                weight = w(ins[1]).transpose(0, 3, 1, 2)  # OHWI -> OIHW
                group = 1
            else:
                o = tflite.DepthwiseConv2DOptions()
                o.Init(opt.Bytes, opt.Pos)
                weight = w(ins[1]).transpose(3, 0, 1, 2)  # 1HWO -> O1HW
                group = shape(ins[0])[3]
                if weight.shape[0] != group:
                    raise SystemExit("depth multiplier != 1 is not supported")
            if o.DilationHFactor() != 1 or o.DilationWFactor() != 1:
                raise SystemExit("dilation is not supported")
            s = o.StrideH()
            if o.StrideW() != s:
                raise SystemExit("unequal strides are not supported")
            kh, kw = weight.shape[2:]
            pads = same_pads(shape(ins[0])[1:3], (kh, kw), s) if o.Padding() == SAME else [0] * 4
            inputs = [name(ins[0]), init(weight, "w%d" % k)]
            if len(ins) > 2 and ins[2] >= 0:
                inputs.append(init(w(ins[2]), "b%d" % k))
            target = act(name(out), o.FusedActivationFunction(), k)
            nodes.append(helper.make_node("Conv", inputs, [target], name="conv%d" % k,
                                          kernel_shape=[kh, kw], strides=[s, s], pads=pads,
                                          group=group))
        elif kind == "PRELU":
            slope = w(ins[1]).reshape(-1, 1, 1)
            nodes.append(helper.make_node("PRelu", [name(ins[0]), init(slope, "a%d" % k)],
                                          [name(out)], name="prelu%d" % k))
        elif kind == "ADD":
            o = tflite.AddOptions()
            o.Init(opt.Bytes, opt.Pos)
            target = act(name(out), o.FusedActivationFunction(), k)
            nodes.append(helper.make_node("Add", [name(ins[0]), name(ins[1])], [target],
                                          name="add%d" % k))
        elif kind == "MAX_POOL_2D":
            o = tflite.Pool2DOptions()
            o.Init(opt.Bytes, opt.Pos)
            kh, kw, s = o.FilterHeight(), o.FilterWidth(), o.StrideH()
            pads = same_pads(shape(ins[0])[1:3], (kh, kw), s) if o.Padding() == SAME else [0] * 4
            target = act(name(out), o.FusedActivationFunction(), k)
            nodes.append(helper.make_node("MaxPool", [name(ins[0])], [target], name="pool%d" % k,
                                          kernel_shape=[kh, kw], strides=[s, s], pads=pads))
        elif kind == "PAD":
            p = const(ins[1]).astype(np.int64)  # NHWC [[b, e]] x 4
            order = [0, 3, 1, 2]
            pads = np.array([p[i][0] for i in order] + [p[i][1] for i in order], np.int64)
            nodes.append(helper.make_node("Pad", [name(ins[0]), init(pads, "p%d" % k)],
                                          [name(out)], name="pad%d" % k, mode="constant"))
        else:
            raise SystemExit("unsupported operator %s" % kind)

    (inp,) = [g.Inputs(i) for i in range(g.InputsLength())]
    outs = [g.Outputs(i) for i in range(g.OutputsLength())]
    n, h, wd, c = shape(inp)
    nodes.insert(0, helper.make_node("Identity", ["input"], [name(inp)], name="in"))
    out_names = []
    for label, t in zip(["landmarks", "face_flag"], outs):
        size = int(np.prod(shape(t)))
        nodes.append(helper.make_node("Reshape", [name(t), init(np.array([1, size], np.int64),
                                                                  "shape_" + label)],
                                      [label], name="reshape_" + label))
        out_names.append(helper.make_tensor_value_info(label, TensorProto.FLOAT, [1, size]))
    graph = helper.make_graph(nodes, "face_mesh_468",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                             [1, c, h, wd])],
                              out_names, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                          producer_name="lipsync face_mesh_onnx")
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
