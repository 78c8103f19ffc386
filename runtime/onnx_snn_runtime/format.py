"""The SNN step-model format: metadata keys, state pairs, and how to read them (numpy only).

A step model is an ONNX model computing one timestep. Besides the source model's inputs and
outputs it has one (input, output) pair per state: the runtime feeds ``input`` with the
state's current value and reads its next value from ``output``. Everything a runtime needs is
in ``metadata_props`` (strings; JSON where structured); see docs/step-model-format.md.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .errors import OnnxSnnError

FORMAT_VERSION = 1
KEY_FORMAT = "onnx_snn.format_version"
KEY_STATES = "onnx_snn.states"
KEY_OUTPUTS = "onnx_snn.outputs"
KEY_CALIBRATION = "onnx_snn.calibration"
KEY_SOURCE = "onnx_snn.source_sha256"
KEY_CONVERTER = "onnx_snn.converter"
KEY_RUNTIME_FORM = "onnx_snn.runtime_form"
STEPS_INPUT = "snn.steps"  # the chunk model's input whose length is the number of steps per call

# What a state pair holds: a neuron layer's membrane potentials, a running-max MaxPool's sum of
# its inputs so far, or (in the runtime form only) an output's sum over the steps so far.
MEMBRANE, MAXPOOL_SUM, OUTPUT_SUM = "membrane", "maxpool_sum", "output_sum"
STATE_KINDS = (MEMBRANE, MAXPOOL_SUM, OUTPUT_SUM)
DECODINGS = ("sum",)


def metadata(props) -> dict[str, str]:
    """A model's ``metadata_props`` (any iterable of entries with ``key`` and ``value``) as a dict."""
    return {p.key: p.value for p in props}


class FormatError(OnnxSnnError):
    """A model's onnx_snn metadata is missing or malformed."""


def encode_array(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    return {"shape": list(a.shape), "dtype": str(a.dtype), "base64": base64.b64encode(a.tobytes()).decode()}


def decode_array(d: Mapping) -> np.ndarray:
    raw = base64.b64decode(d["base64"])
    return np.frombuffer(raw, dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()


@dataclass
class State:
    """One state pair. ``shape`` has None for the batch dimension (axis 0)."""
    input: str
    output: str
    shape: list
    dtype: str
    kind: str = MEMBRANE
    layer: str = ""
    init: Any = 0.0          # float, or an array broadcastable to shape[1:]
    threshold: float | None = None

    def to_json(self) -> dict:
        init = {"value": float(self.init)} if np.ndim(self.init) == 0 else {"tensor": encode_array(np.asarray(self.init))}
        return {"input": self.input, "output": self.output, "shape": self.shape, "dtype": self.dtype,
                "kind": self.kind, "layer": self.layer, "init": init, "threshold": self.threshold}

    @classmethod
    def from_json(cls, d: Mapping) -> "State":
        try:
            init = d["init"]
            value = init["value"] if "value" in init else decode_array(init["tensor"])
            state = cls(d["input"], d["output"], list(d["shape"]), d["dtype"], d.get("kind", MEMBRANE),
                        d.get("layer", ""), value, d.get("threshold"))
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"malformed state entry {d!r}: {e}") from e
        if state.kind not in STATE_KINDS:
            raise FormatError(f"state {state.input!r} has unknown kind {state.kind!r}")
        return state

    def initial(self, batch: int) -> np.ndarray:
        """The state's value before the first timestep for a batch of ``batch`` samples."""
        shape = [batch] + [int(d) for d in self.shape[1:]]
        return np.broadcast_to(np.asarray(self.init, dtype=self.dtype), shape).copy()


@dataclass
class SpikeCount:
    """A runtime-form output holding, per sample, the number of spikes of one neuron layer this step."""
    output: str
    layer: str        # the membrane state's input name (snn.v{k})
    neurons: int      # neurons per sample in that layer


@dataclass
class RuntimeForm:
    """The step model split for fast simulation (written by the converter, optional).

    ``prefix`` (x -> ``boundary``) depends only on the analog input, so it runs once per batch;
    ``body`` (``boundary`` + states -> states) runs once per timestep. The body's states include
    one ``output_sum`` accumulator per output (decoding "sum" done on the device) and it also
    outputs per-sample spike counts. ``chunk`` (optional) is the body rewritten to advance K
    steps per call (input ``snn.steps``, see docs/step-model-format.md). All are serialized ONNX.
    """
    boundary: list[str]
    prefix: bytes | None
    body: bytes
    states: list[State]
    spike_counts: list[SpikeCount]
    chunk: bytes | None = None

    def to_json(self) -> str:
        return json.dumps({"boundary": self.boundary,
                           "prefix": base64.b64encode(self.prefix).decode() if self.prefix else None,
                           "body": base64.b64encode(self.body).decode(),
                           "states": [s.to_json() for s in self.states],
                           "spike_counts": [vars(c) for c in self.spike_counts],
                           "chunk": base64.b64encode(self.chunk).decode() if self.chunk else None})

    @classmethod
    def from_json(cls, text: str) -> "RuntimeForm":
        try:
            d = json.loads(text)
            return cls(list(d["boundary"]), base64.b64decode(d["prefix"]) if d["prefix"] else None,
                       base64.b64decode(d["body"]), [State.from_json(s) for s in d["states"]],
                       [SpikeCount(**c) for c in d["spike_counts"]],
                       base64.b64decode(d["chunk"]) if d.get("chunk") else None)
        except (ValueError, TypeError, KeyError) as e:
            raise FormatError(f"malformed runtime form in the model's metadata: {e}") from e


@dataclass
class StepModelSpec:
    states: list[State]
    outputs: dict[str, str]                  # graph output -> decoding ("sum": add over timesteps)
    format_version: int = FORMAT_VERSION
    calibration: dict = field(default_factory=dict)
    source_sha256: str = ""
    converter: dict = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        return {KEY_FORMAT: str(self.format_version),
                KEY_STATES: json.dumps([s.to_json() for s in self.states]),
                KEY_OUTPUTS: json.dumps({k: {"decoding": v} for k, v in self.outputs.items()}),
                KEY_CALIBRATION: json.dumps(self.calibration),
                KEY_SOURCE: self.source_sha256,
                KEY_CONVERTER: json.dumps(self.converter)}

    @classmethod
    def from_model(cls, model) -> "StepModelSpec":
        """The record of a loaded step model (an ``onnx.ModelProto``, or anything with ``metadata_props``)."""
        return cls.from_metadata(metadata(model.metadata_props))

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> "StepModelSpec":
        if KEY_FORMAT not in meta:
            raise FormatError("the model has no onnx_snn metadata: it is not an SNN step model. "
                              "Convert the ANN first with `onnx-snn convert`")
        try:
            version = int(meta[KEY_FORMAT])
            if version > FORMAT_VERSION:
                raise FormatError(f"step-model format {version} is newer than this runtime's "
                                  f"({FORMAT_VERSION}); upgrade onnx-snn")
            states = [State.from_json(d) for d in json.loads(meta.get(KEY_STATES, "[]"))]
            outputs = {k: v["decoding"] for k, v in json.loads(meta.get(KEY_OUTPUTS, "{}")).items()}
            calibration = json.loads(meta.get(KEY_CALIBRATION, "{}"))
            converter = json.loads(meta.get(KEY_CONVERTER, "{}"))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise FormatError(f"malformed onnx_snn metadata: {e}") from e
        bad = {k: v for k, v in outputs.items() if v not in DECODINGS}
        if bad:
            raise FormatError(f"unknown output decoding {bad}; this runtime knows {DECODINGS}")
        return cls(states, outputs, version, calibration, meta.get(KEY_SOURCE, ""), converter)
