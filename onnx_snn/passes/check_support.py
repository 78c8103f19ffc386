"""Support check pass: refuses, with a ``UnsupportedOpError`` naming node and op, any graph the
converter cannot map faithfully (see ``onnx_snn.support``). Never modifies the model."""
from __future__ import annotations

import onnx

from ..graph import import_graph
from ..record import ConversionRecord
from ..support import check_graph
from .base import Pass, PassResult


class CheckSupport(Pass):
    def call(self, model: onnx.ModelProto, record: ConversionRecord) -> PassResult:
        graph = import_graph(model)
        graph.toposort()
        check_graph(graph)
        return PassResult(model, False, record)
