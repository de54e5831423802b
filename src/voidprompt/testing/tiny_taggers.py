"""Tiny taggers built in the tests: a WD14-shaped ONNX model and a narrow DeepDanbooru file."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch

from voidprompt.models.taggers.deepdanbooru import DeepDanbooruNet

# onnxruntime 1.32 reads IR version 10 and opset 21; these are well inside what it accepts.
IR_VERSION = 8
OPSET = 13


def write_identity_wd14(folder: Path, side: int, categories: Sequence[int]) -> Path:
    """A WD14-signature tagger whose probabilities are its input, flattened and divided by 255:
    input ``input_1`` (batch, side, side, 3) float32, output (batch, side*side*3), one tag per value,
    so a test reads back exactly the tensor onnxruntime was handed."""
    import onnx  # a test dependency only
    from onnx import TensorProto, helper

    width = side * side * 3
    assert len(categories) == width
    folder.mkdir(parents=True, exist_ok=True)
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["input_1", "shape"], ["flat"]),
            helper.make_node("Div", ["flat", "scale"], ["predictions_sigmoid"]),
        ],
        "identity_tagger",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["batch", side, side, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", width])],
        initializer=[
            helper.make_tensor("shape", TensorProto.INT64, [2], [-1, width]),
            helper.make_tensor("scale", TensorProto.FLOAT, [], [255.0]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    with (folder / "selected_tags.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, category in enumerate(categories):
            writer.writerow([i, f"tag_{i}", category, 100])
    return folder


def tiny_deepdanbooru(tags: Sequence[str], stem: int = 4, seed: int = 0) -> DeepDanbooruNet:
    """A narrow DeepDanbooru network (every width divided by 64 / stem) with random weights."""
    torch.manual_seed(seed)
    net = DeepDanbooruNet(num_tags=len(tags), stem=stem)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=(1.0 / module.weight[0].numel()) ** 0.5)
            if module.bias is not None:
                torch.nn.init.normal_(module.bias, std=0.05)
    net.tags = list(tags)
    return net.eval()


def write_deepdanbooru(path: Path, net: DeepDanbooruNet) -> Path:
    """The file as A1111's is laid out: the state dict with the tag list under ``tags``."""
    state: dict[str, object] = dict(net.state_dict())
    state["tags"] = list(net.tags)
    torch.save(state, path)
    return path
