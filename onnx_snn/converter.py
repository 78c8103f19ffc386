"""The user-facing converter: a visible list of passes from an ANN to an SNN step model."""
from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import onnx

from onnx_snn_runtime.format import KEY_CALIBRATION

from . import io, presets
from .calibration.data import first_input
from .calibration.mode import parse_mode
from .errors import OptionError
from .ops import if_neuron
from .passes.base import Pass, PassManager
from .passes.calibrate import Calibrate
from .passes.canonicalize import Canonicalize
from .passes.check_support import CheckSupport
from .passes.correct_bias import CorrectBias
from .passes.fold_batchnorm import FoldBatchNorm
from .passes.fold_scales import FoldScales
from .passes.insert_neurons import InsertNeurons
from .passes.maxpool import STRATEGIES, PlaceMaxPool
from .passes.output_neurons import AddOutputNeurons
from .passes.output_softmax import DropOutputSoftmax
from .passes.runtime_form import EmbedRuntimeForm
from .passes.write_step_model import WriteStepModel
from .torch_export import EXPORTERS, export_module, is_torch_module

log = logging.getLogger(__name__)


class Converter:
    """Convert a trained ReLU network into an SNN step model.

    Args:
        dataloader: calibration data: a numpy array, an ``.npz`` path, a dict of arrays, or an
            iterable of batches (arrays, tensors, ``(x, label)`` tuples; a torch DataLoader).
        mode: ``"max"`` (default), a percentile ``"p%"`` (0 < p <= 100), a fraction k (0 < k <= 1, or ``"1/3"``)
            of the max, or ``"search"`` (the scale minimising the rate-coding error for ``target_T``).
        fuse_flag: fold BatchNormalization into the preceding layer (else it stays, as an affine).
        per_channel: one scale per channel (axis 1) instead of one per layer.
        maxpool: ``"running_max"``, ``"before_neuron"`` or ``"plain"`` (see ``passes.maxpool``).
        reset_mode: ``"subtract"`` (reset by subtraction) or ``"zero"`` (hard reset to ``v_reset``).
        v_init: initial membrane potential in units of the threshold: a number, or ``"half"``
            (θ/2: rounds instead of flooring the rate code; Deng & Gu 2021, Bu et al. 2022).
        target_T: the number of timesteps the model is built for: recorded in the step model
            (``onnx-snn run`` uses it as default T) and used by ``mode="search"`` and bias correction.
            Given without a ``mode``, it applies the preset that ``bench/accuracy.py`` measured
            best at that T (``onnx_snn.presets``); options given explicitly override the preset's.
        bias_correction: shift each layer's pre-activation so that its mean output after target_T
            steps matches the rescaled ANN's, layer by layer (``passes.correct_bias``).
        potential_correction: then close each neuron's remaining gap through its initial membrane
            potential (a per-neuron tensor in the step model).
        output_decoding: ``"analog"`` (sum the last layer's outputs over time, default) or
            ``"spikes"`` (the outputs become neurons; predictions by spike count).
        batch_size: calibration batch size when the data is an array.
        bins: histogram bins for percentiles (power of two; default 65536 per layer, 4096 per channel).
        exporter: torch exporter for ``torch.nn.Module`` inputs: ``"dynamo"`` or ``"torchscript"``.
        progress: show a progress bar while calibrating.
        fold_scales: fold the neurons' threshold-scaling Muls into the neighbouring weights where
            exact (``passes.fold_scales``; default on). ``False`` keeps SpikingJelly's structure,
            VoltageScaler -> IFNode -> VoltageScaler, visible node for node.

    Calling the converter with a model (``torch.nn.Module``, ``.onnx`` path, bytes or
    ``onnx.ModelProto``) returns the step model; ``report`` then lists each layer's scale.
    """

    def __init__(self, dataloader: Any = None, mode: Any = None, *, fuse_flag: bool = True,
                 per_channel: bool | None = None, maxpool: str = "running_max", reset_mode: str = "subtract",
                 v_reset: float = 0.0, v_init: float | str | None = None, batch_size: int = 256,
                 bins: int | None = None, exporter: str = "dynamo", progress: bool = True,
                 target_T: int | None = None, bias_correction: bool | None = None,
                 potential_correction: bool | None = None, output_decoding: str = "analog",
                 fold_scales: bool = True):
        if target_T is not None and (isinstance(target_T, bool) or not isinstance(target_T, int) or target_T <= 0):
            raise OptionError(f"target_T={target_T!r} must be a positive integer")
        options, self.preset = presets.resolve(target_T, dict(
            mode=mode, per_channel=per_channel, v_init=v_init, bias_correction=bias_correction,
            potential_correction=potential_correction))
        if self.preset:
            log.info("target_T=%d without a mode: the preset %s", target_T, options)
        mode, per_channel, v_init = options["mode"], options["per_channel"], options["v_init"]
        bias_correction, potential_correction = options["bias_correction"], options["potential_correction"]
        self.mode = parse_mode(mode)
        if v_init == "half":
            v_init = 0.5
        if isinstance(v_init, str) or isinstance(v_init, bool):
            raise OptionError(f"v_init={v_init!r}; give a number (in units of the threshold) or 'half'")
        if (self.mode.kind == "search" or bias_correction or potential_correction) and target_T is None:
            raise OptionError('mode="search" and the bias and potential corrections work for a number of '
                              'timesteps: give target_T')
        if maxpool not in STRATEGIES:
            raise OptionError(f"maxpool={maxpool!r}; use one of {', '.join(STRATEGIES)}")
        if reset_mode not in if_neuron.RESET_MODES:
            raise OptionError(f"reset_mode={reset_mode!r}; use one of {', '.join(if_neuron.RESET_MODES)}")
        if exporter not in EXPORTERS:
            raise OptionError(f"exporter={exporter!r}; use one of {', '.join(EXPORTERS)}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise OptionError(f"batch_size={batch_size!r} must be a positive integer")
        if bins is not None and (not isinstance(bins, int) or bins < 2 or bins & (bins - 1)):
            raise OptionError(f"bins={bins!r} must be a power of two >= 2")
        if not np.isfinite(v_init) or not np.isfinite(v_reset):
            raise OptionError("v_init and v_reset must be finite numbers")
        self.dataloader, self.fuse_flag, self.per_channel = dataloader, fuse_flag, per_channel
        self.maxpool, self.reset_mode, self.v_reset, self.v_init = maxpool, reset_mode, v_reset, v_init
        self.batch_size, self.bins, self.exporter, self.progress = batch_size, bins, exporter, progress
        self.target_T, self.bias_correction, self.potential_correction = target_T, bias_correction, potential_correction
        if output_decoding not in ("analog", "spikes"):
            raise OptionError(f"output_decoding={output_decoding!r}; use 'analog' or 'spikes'")
        self.output_decoding = output_decoding
        if not isinstance(fold_scales, bool):
            raise OptionError(f"fold_scales={fold_scales!r} must be True or False")
        self.fold_scales = fold_scales
        self.report: list[dict] = []

    def options(self) -> dict:
        return {"mode": str(self.mode), "fuse_flag": self.fuse_flag, "per_channel": self.per_channel,
                "maxpool": self.maxpool, "reset_mode": self.reset_mode, "v_reset": self.v_reset,
                "v_init": self.v_init, "target_T": self.target_T, "bias_correction": self.bias_correction,
                "potential_correction": self.potential_correction, "output_decoding": self.output_decoding,
                "fold_scales": self.fold_scales, "preset": self.preset}

    def passes(self, source_sha256: str = "", neuron: str = "if") -> list[Pass]:
        """The pipeline, in order. ``neuron="analog"`` builds the rescaled ANN instead (for checks)."""
        pipeline: list[Pass] = [Canonicalize(), DropOutputSoftmax(), CheckSupport()]
        if self.fuse_flag:
            pipeline.append(FoldBatchNorm())
        if self.output_decoding == "spikes":
            pipeline.append(AddOutputNeurons())
        pipeline += [
            PlaceMaxPool(self.maxpool),
            Calibrate(self.dataloader, self.mode, per_channel=self.per_channel, batch_size=self.batch_size,
                      bins=self.bins, progress=self.progress, target_T=self.target_T, v_init=self.v_init),
            InsertNeurons(neuron, reset_mode=self.reset_mode, v_reset=self.v_reset, v_init=self.v_init,
                          maxpool=self.maxpool),
        ]
        if neuron == "if" and (self.bias_correction or self.potential_correction):
            pipeline.append(CorrectBias(self.dataloader, self.target_T, bias=self.bias_correction,
                                        potential=self.potential_correction, batch_size=self.batch_size))
        if self.fold_scales:
            pipeline.append(FoldScales())
        if neuron == "if":
            pipeline += [WriteStepModel(source_sha256, self.options()), EmbedRuntimeForm()]
        return pipeline

    def __call__(self, model: Any, example_input: Any = None, *, neuron: str = "if") -> onnx.ModelProto:
        source, sha = self.load_source(model, example_input)
        result = PassManager(self.passes(sha, neuron))(source).model
        meta = {p.key: p.value for p in result.metadata_props}
        self.report = json.loads(meta.get(KEY_CALIBRATION, "{}")).get("layers", [])
        return result

    def load_source(self, model: Any, example_input: Any = None) -> tuple[onnx.ModelProto, str]:
        """(ONNX model, SHA-256 of the source) from any accepted model form."""
        if is_torch_module(model):
            if example_input is None and self.dataloader is not None:
                example_input = first_input(self.dataloader)
            proto = export_module(model, example_input, exporter=self.exporter)
            return io.load(proto)
        return io.load(model)
