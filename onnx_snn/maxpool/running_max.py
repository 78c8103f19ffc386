"""``maxpool="running_max"`` (default): every MaxPool that sees time-varying signals keeps the
sum S of its input over past steps and emits ``P(S + x_t) - P(S)`` (P the pooling).

The outputs telescope to ``P(sum_t x_t)``, so after T steps the pooled output is exactly the
max over each window of the input's accumulated total: the max of the rates, which is what the
ANN's MaxPool computes in rate terms. On spike inputs ``x_t = lambda * s_t`` each output is 0
or lambda (to float rounding), i.e. a spike. (Gating by the argmax of past counts, the textbook
alternative, was measured biased: it keeps selecting the input that has just fired and then
misses spikes.)

Graph change: the MaxPool is replaced by ``Add(m, x) -> m.next``, ``MaxPool(m)``,
``MaxPool(m.next)`` and their ``Sub``, with the state pair ``snn.m{k}`` / ``snn.m{k}.next``
(kind ``maxpool_sum``, initial value 0) recorded as a ``RunningMaxPool``.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs
from onnx_snn_runtime.format import MAXPOOL_SUM, State

from ..graph import np_dtype, state_shape
from ..record import ConversionRecord, RunningMaxPool
from .base import MaxPoolStrategy


def running_max(graph: gs.Graph, pool: gs.Node, record: ConversionRecord) -> None:
    """y_t = P(m + x_t) - P(m), m = sum of x over earlier steps, P the MaxPool: the outputs add
    up to P(sum_t x_t), so the output rate is the max of the input rates, exactly."""
    x, y = pool.inputs[0], pool.outputs[0]
    k = record.count(MAXPOOL_SUM)
    dtype = np_dtype(x)
    base = f"snn.{pool.name}"
    m_in = gs.Variable(f"snn.m{k}", dtype=dtype, shape=x.shape)
    m_out = gs.Variable(f"snn.m{k}.next", dtype=dtype, shape=x.shape)
    graph.inputs.append(m_in)
    graph.outputs.append(m_out)
    state = State(m_in.name, m_out.name, state_shape(pool.name, x), str(dtype), MAXPOOL_SUM, pool.name, 0.0)
    record.states.append(state)
    before = gs.Variable(f"{base}.max_before", dtype=dtype)
    after = gs.Variable(f"{base}.max_after", dtype=dtype)
    attrs = {key: v for key, v in pool.attrs.items() if key != "storage_order"}
    pool.outputs.clear()
    pool.inputs.clear()
    nodes = [
        gs.Node("Add", f"{base}.accumulate", inputs=[m_in, x], outputs=[m_out]),
        gs.Node("MaxPool", f"{base}.pool_before", attrs=attrs, inputs=[m_in], outputs=[before]),
        gs.Node("MaxPool", f"{base}.pool_after", attrs=attrs, inputs=[m_out], outputs=[after]),
        gs.Node("Sub", f"{base}.increase", inputs=[after, before], outputs=[y]),
    ]
    graph.nodes.extend(nodes)
    record.running_max.append(RunningMaxPool(pool.name, [n.name for n in nodes], state))


class RunningMax(MaxPoolStrategy):
    name = "running_max"

    def convert_pool(self, graph: gs.Graph, pool: gs.Node, sites: set[str], record: ConversionRecord) -> bool:
        running_max(graph, pool, record)
        return True
