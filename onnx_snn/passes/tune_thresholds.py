"""Output-level threshold tuning for a target T: each layer's λ chosen against the network's
output after T steps, on calibration data, without labels.

The layer-wise calibration (threshold search on histograms, bias and potential correction)
makes every layer right on its own; what the network finally outputs after T steps is never
looked at, and at few steps the errors of deep networks compound. Following
the layer-by-layer reconstruction view of ANN-SNN calibration (Li et al. 2021; BRECQ-style
post-training quantisation, where T steps are log2(T + 1) bits of activation), this pass
tunes each layer's scale against the *output*: for each neuron layer in graph order it tries
λ·α for each α of ``FACTORS``, simulates the whole step model for ``target_T`` steps on a
calibration batch, and keeps the α (1 included) that brings the network's mean output over
the T steps closest to the ANN's output (``output_error``: for class scores the KL divergence
of the softmaxes, else the mean squared difference). Labels are never used. It runs after
InsertNeurons and before CorrectBias, which then fits each layer's mean output under the tuned
thresholds (tuning after the corrections lowered the output error as much but not the error
rate: on the sample CNN at T=4, 2000 test images, 88.05 % untuned, 87.75 % tuned after, 88.90 %
tuned before).

The simulated model is the step model itself with each site's two scale constants (the
``Mul(1/λ)`` before its neuron and the ``Mul(λ)`` after) turned into graph inputs, so one
onnxruntime session serves every trial. The ANN is the same graph with each neuron replaced
by the function it stands for (``ReLU``, or ``Clip(0, c)`` for a clipped site) and the bias
shifts set to zero: the source network, whatever correction came before.

Trained QCFS sites (``NeuronSite.levels``) keep the λ they were trained with.

Guarantee: each site's scale constants are 1/λ and λ of its ``NeuronSite`` (``lam``, now the
tuned value; ``threshold_factor`` records α), λ never exceeds a clipped site's ceiling, and
the output error on the tuning batch is not larger than before the pass (a factor is kept
only when it lowers it), recorded in ``ConversionRecord.tuning``.

Cost: ``len(FACTORS)`` simulations of ``target_T`` steps per layer (``simulations``), on
``STEP_BUDGET // target_T`` images, at least ``MIN_SAMPLES``, and at most as many as keep the
simulation's states within ``MEMORY`` (``samples``): a few images for an ImageNet-size network.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_snn_runtime.format import MEMBRANE
from tqdm.auto import tqdm

from ..calibration.data import take_samples
from ..errors import OptionError
from ..model_util import cpu_session
from ..options import ConvertOptions
from ..record import ConversionRecord, NeuronSite
from .base import ContractError, Pass, PassResult
from .correct_bias import replace_neurons, segment

log = logging.getLogger(__name__)

FACTORS = (0.8, 0.9, 1.1, 1.25)  # trial multipliers of λ per layer (1 is the starting point)
STEP_BUDGET = 1024               # tuning images x timesteps per simulation
MIN_SAMPLES = 64
MEMORY = 1 << 30                 # bytes for the simulated states (x 3: inputs, outputs, activations)


def samples(T: int, state_bytes: int) -> int:
    """Images per tuning simulation for ``T`` steps and ``state_bytes`` of state per image."""
    return min(max(MIN_SAMPLES, STEP_BUDGET // T), images_within(MEMORY, state_bytes))


def images_within(memory: int, state_bytes: int) -> int:
    """How many images one simulation may hold (at least 1) when each holds ``state_bytes`` of
    state, 3 times over (inputs, outputs, activations), within ``memory`` bytes."""
    return max(1, memory // max(3 * state_bytes, 1))


def simulations(sites: int) -> int:
    """Simulations of ``TuneThresholds`` for ``sites`` neuron layers (the first: the untuned error)."""
    return 1 + sites * len(FACTORS)


def state_bytes(states) -> int:
    """Bytes of all states of one sample."""
    return sum(int(np.prod([d for d in s.shape[1:]], dtype=np.int64)) * np.dtype(s.dtype).itemsize for s in states)


@dataclass
class Tuning:
    """What ``TuneThresholds`` did: the output error before and after, and the samples used."""
    error_before: float
    error_after: float
    samples: int
    simulations: int


def scale_inputs(model: onnx.ModelProto, sites: list[NeuronSite]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``model`` with each site's two scale constants as graph inputs, and their current values."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = {n.name: n for n in out.graph.node}
    inits = {t.name: t for t in out.graph.initializer}
    values = {}
    for site in sites:
        for node in (site.scale_in, site.scale_out):
            name = nodes[node].input[1]
            tensor = inits.pop(name)
            values[name] = numpy_helper.to_array(tensor)
            out.graph.initializer.remove(tensor)
            out.graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    return out, values


def scale_values(lam, factor: float, like: list[np.ndarray]) -> list[np.ndarray]:
    """The constants 1/(factor·λ) and factor·λ in the type and shape of ``like`` (the site's
    current pair), computed in float64 as InsertNeurons computes them."""
    scaled = np.asarray(lam, np.float64) * factor
    return [np.broadcast_to(value.reshape(-1) if value.ndim else value, old.reshape(-1).shape)
            .reshape(old.shape).astype(old.dtype) for value, old in zip((1.0 / scaled, scaled), like)]


def ann_model(model: onnx.ModelProto, record: ConversionRecord) -> onnx.ModelProto:
    """The source network from the step model: each IF neuron replaced by ReLU (and a ceiling
    c/λ for a Clip(0, c) site), the bias shifts zeroed (``correct_bias.replace_neurons``)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    shifts = {n.name: n.input[1] for n in out.graph.node if n.name in {s.shift for s in record.sites}}
    missing = set(shifts.values()) - {t.name for t in out.graph.initializer}
    if missing:
        raise ContractError(f"bias shift values {sorted(missing)} are not initializers")
    for t in out.graph.initializer:
        if t.name in shifts.values():
            t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
    sites = {site.neuron: site for site in record.sites}
    inv_lambdas = {n.name: n.input[1] for n in model.graph.node if n.name in {s.scale_in for s in record.sites}}
    inits = {t.name: t for t in model.graph.initializer}

    def relu(graph, node, current, spikes):
        site = sites[node.name]
        if site.clip_max is None:
            graph.nodes.append(gs.Node("Relu", f"{node.name}.ann", inputs=[current], outputs=[spikes]))
            return
        inv_lambda = numpy_helper.to_array(inits[inv_lambdas[site.scale_in]])
        rectified = gs.Variable(f"{node.name}.ann_relu", dtype=current.dtype, shape=current.shape)
        ceiling = gs.Constant(f"{node.name}.ann_ceiling", np.asarray(site.clip_max * inv_lambda, inv_lambda.dtype))
        graph.nodes += [gs.Node("Relu", f"{node.name}.ann", inputs=[current], outputs=[rectified]),
                        gs.Node("Min", f"{node.name}.ann_clip", inputs=[rectified, ceiling], outputs=[spikes])]
    return replace_neurons(out, record.states, relu)


def output_error(target: np.ndarray):
    """The tuning objective against the ANN's output ``target``: for class scores ([N, C], C > 1)
    the KL divergence of the SNN's softmax from the ANN's (what decides predictions), else the
    mean squared difference."""
    if target.ndim != 2 or target.shape[1] < 2:
        return lambda out: float(np.mean((out - target) ** 2))
    log_p = _log_softmax(target)
    p = np.exp(log_p)
    return lambda out: float(np.mean(np.sum(p * (log_p - _log_softmax(out)), axis=1)))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


class TuneThresholds(Pass):
    def __init__(self, data, options: ConvertOptions | None = None, **given):
        options = ConvertOptions.of(options or ConvertOptions(), **given)
        if not options.target_T:
            raise OptionError("threshold tuning works for a number of timesteps: give target_T")
        self.data, self.T, self.batch_size, self.progress = data, options.target_T, options.batch_size, options.progress

    def requires(self, model: onnx.ModelProto, record: ConversionRecord) -> None:
        if any(site.state is None or site.scale_in is None or site.scale_out is None for site in record.sites):
            raise ContractError("TuneThresholds needs IF neurons with both scale Muls (run InsertNeurons with "
                                "neuron='if', before FoldScales)")
        if any(site.threshold_factor is not None for site in record.sites):
            raise ContractError("the thresholds are tuned already; TuneThresholds runs once per conversion")

    def ensures(self, model: onnx.ModelProto, record: ConversionRecord) -> None:
        nodes = {n.name: n for n in model.graph.node}
        inits = {t.name: t for t in model.graph.initializer}
        for site in record.sites:
            lam = np.asarray(site.lam, np.float64)
            values = [numpy_helper.to_array(inits[nodes[n].input[1]]).astype(np.float64).reshape(-1)
                      for n in (site.scale_in, site.scale_out)]
            if not (np.allclose(values[0], 1.0 / lam.reshape(-1), rtol=1e-6) and
                    np.allclose(values[1], lam.reshape(-1), rtol=1e-6)):
                raise ContractError(f"{site.node}: its scale constants are not 1/λ and λ of the record")
            if site.clip_max is not None and (lam > site.clip_max * (1 + 1e-6)).any():
                raise ContractError(f"{site.node}: λ {site.lam} exceeds its Clip's max {site.clip_max}")
        if record.tuning is not None and record.tuning.error_after > record.tuning.error_before:
            raise ContractError("threshold tuning made the output error larger")

    def call(self, model: onnx.ModelProto, record: ConversionRecord) -> PassResult:
        if not record.sites:
            return PassResult(model, False, record)
        self.samples = samples(self.T, state_bytes(record.states))
        feeds = take_samples(self.data, model, record.states, self.samples, self.batch_size)
        n = len(next(iter(feeds.values())))
        zeros = {s.input: s.initial(n) * 0 for s in record.states if s.kind != MEMBRANE}
        ann = ann_model(model, record)
        output = next(o.name for o in ann.graph.output)
        target = cpu_session(ann).run([output], {**feeds, **zeros})[0].astype(np.float64)
        tunable, scales = scale_inputs(model, record.sites)
        part = segment(tunable, record.states, output, set())

        objective = output_error(target)

        def error(values: dict[str, np.ndarray]) -> float:
            return objective(part.run({**feeds, **values}, {}, self.T, record=False))

        best = before = error(scales)
        trials = 0
        nodes = {n.name: n for n in model.graph.node}
        for site in tqdm(record.sites, desc="tuning thresholds", unit="layer", disable=not self.progress,
                         leave=False):
            names = [nodes[site.scale_in].input[1], nodes[site.scale_out].input[1]]
            like = [scales[name] for name in names]
            chosen = 1.0
            for factor in self._factors(site):
                trials += 1
                value = error({**scales, **dict(zip(names, scale_values(site.lam, factor, like)))})
                if value < best:
                    best, chosen = value, factor
            scales.update(zip(names, scale_values(site.lam, chosen, like)))
            site.threshold_factor = chosen
            lam = np.asarray(site.lam, np.float64) * chosen
            site.lam = float(lam) if lam.ndim == 0 else [float(v) for v in lam]
        log.info("threshold tuning for T=%d on %d images: output error %.4g -> %.4g (%d simulations)",
                 self.T, n, before, best, trials)
        record.tuning = Tuning(before, best, n, trials + 1)
        return PassResult(self._apply(model, record), True, record)

    def _factors(self, site: NeuronSite) -> list[float]:
        """The trial factors; for a clipped site only those keeping λ within its ceiling; none for a
        trained QCFS site, whose λ the network was trained with (docs/qcfs.md)."""
        if site.levels is not None:
            return []
        if site.clip_max is None:
            return list(FACTORS)
        top = float(np.max(site.lam))
        return [f for f in FACTORS if top * f <= site.clip_max]

    @staticmethod
    def _apply(model: onnx.ModelProto, record: ConversionRecord) -> onnx.ModelProto:
        """The sites' scale constants set to 1/λ and λ of the (tuned) record."""
        out = onnx.ModelProto()
        out.CopyFrom(model)
        nodes = {n.name: n for n in out.graph.node}
        inits = {t.name: t for t in out.graph.initializer}
        for site in record.sites:
            names = [nodes[site.scale_in].input[1], nodes[site.scale_out].input[1]]
            like = [numpy_helper.to_array(inits[name]) for name in names]
            for name, value in zip(names, scale_values(site.lam, 1.0, like)):
                inits[name].CopyFrom(numpy_helper.from_array(value, name))
        return out
