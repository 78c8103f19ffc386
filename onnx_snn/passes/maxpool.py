"""MaxPool placement pass: applies the chosen MaxPool strategy's change to the ANN (``onnx_snn.maxpool``).

Runs before calibration, so that the scales are calibrated where the neurons will be. Every
strategy turns a GlobalMaxPool over static spatial dims into a whole-plane MaxPool; with
``before_neuron`` each ReLU/Clip feeding a MaxPool alone is swapped with it (the rest of each
strategy's work happens in ``InsertNeurons``, through the same strategy object).

Guarantee: the ANN it returns computes the same function; no GlobalMaxPool over static dims
is left; with ``before_neuron`` no ReLU/Clip output feeds a MaxPool alone.
"""
from __future__ import annotations

import onnx

from ..graph import export_model, import_graph
from ..maxpool import strategy
from ..options import ConvertOptions
from ..record import ConversionRecord
from .base import ContractError, Pass, PassResult


class PlaceMaxPool(Pass):
    def __init__(self, options: ConvertOptions | str | None = None):
        """``options``: the converter's options, or a strategy name (validated as the option is)."""
        if not isinstance(options, ConvertOptions):
            options = ConvertOptions(maxpool="running_max" if options is None else options)
        self.strategy_name = options.maxpool
        self.strategy = strategy(options.maxpool)

    def call(self, model: onnx.ModelProto, record: ConversionRecord) -> PassResult:
        graph = import_graph(model)
        changed = self.strategy.place(graph, record)
        return PassResult(export_model(graph, model) if changed else model, changed, record)

    def ensures(self, model: onnx.ModelProto, record: ConversionRecord) -> None:
        graph = import_graph(model)
        for node in graph.nodes:
            if node.op == "GlobalMaxPool" and node.inputs[0].shape is not None and all(
                    isinstance(d, int) for d in node.inputs[0].shape[2:]):
                raise ContractError(f"GlobalMaxPool {node.name} over static dims left")
            if self.strategy_name == "before_neuron" and node.op == "MaxPool":
                from ..maxpool.before_neuron import can_swap
                if can_swap(graph, node):
                    raise ContractError(f"MaxPool {node.name} still follows its neuron")
