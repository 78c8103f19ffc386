"""The user-facing converter: a visible list of passes from an ANN to an SNN step model."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import onnx

from . import io, selection
from .calibration.data import first_input
from .errors import DataError
from .options import ConvertOptions
from .passes.base import Pass, PassManager
from .passes.calibrate import Calibrate
from .passes.canonicalize import Canonicalize
from .passes.check_support import CheckSupport
from .passes.correct_bias import CorrectBias
from .passes.fold_batchnorm import FoldBatchNorm
from .passes.fold_scales import FoldScales
from .passes.insert_neurons import InsertNeurons
from .passes.maxpool import PlaceMaxPool
from .passes.output_neurons import AddOutputNeurons
from .passes.output_softmax import DropOutputSoftmax
from .passes.quantized_relu import QuantizedReLU, QuantizedReLUScales
from .passes.runtime_form import EmbedRuntimeForm
from .passes.tune_thresholds import TuneThresholds
from .passes.write_step_model import WriteStepModel, with_selection
from .record import ConversionRecord
from .selection import Selection
from .torch_export import export_module, is_torch_module

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
            Given without a ``mode``, it applies the preset (``onnx_snn.presets``): its candidate
            recipes are tried on held-out calibration data and the best is kept
            (``onnx_snn.selection``; ``selection`` then holds the trials); options given explicitly
            override every candidate's.
        bias_correction: shift each layer's pre-activation so that its mean output after target_T
            steps matches the rescaled ANN's, layer by layer (``passes.correct_bias``).
        potential_correction: then close each neuron's remaining gap through its initial membrane
            potential (a per-neuron tensor in the step model).
        threshold_tuning: then tune each layer's λ against the network's output after target_T
            steps on calibration data, without labels (``passes.tune_thresholds``).
        select_recipe: with the preset, choose among its candidates on held-out data (default);
            ``False`` applies its first recipe without trying the others.
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
                 fold_scales: bool = True, threshold_tuning: bool | None = None, select_recipe: bool = True):
        # the recipe options the caller set: they override every candidate of the preset
        self.given = {k: v for k, v in dict(mode=mode, per_channel=per_channel, v_init=v_init,
                                            bias_correction=bias_correction, potential_correction=potential_correction,
                                            threshold_tuning=threshold_tuning).items() if v is not None}
        self.config = ConvertOptions.resolve(
            mode, fuse_flag=fuse_flag, per_channel=per_channel, maxpool=maxpool, reset_mode=reset_mode,
            v_reset=v_reset, v_init=v_init, batch_size=batch_size, bins=bins, exporter=exporter, progress=progress,
            target_T=target_T, bias_correction=bias_correction, potential_correction=potential_correction,
            output_decoding=output_decoding, fold_scales=fold_scales, threshold_tuning=threshold_tuning,
            select_recipe=select_recipe)
        if self.config.preset:
            log.info("target_T=%d without a mode: %s", target_T, self.config.describe())
        self.dataloader = dataloader
        self.record: ConversionRecord | None = None
        self.selection: Selection | None = None

    @property
    def mode(self):
        return self.config.mode

    @property
    def preset(self) -> bool:
        return self.config.preset

    @property
    def report(self) -> list[dict]:
        """Per neuron layer after a conversion: node, op, output, lambda, max, share above lambda."""
        return [] if self.record is None else [site.to_json() for site in self.record.sites]

    def options(self) -> dict:
        """The options as the step model records them (before a conversion: the preset's first
        recipe; after one: the recipe used, which the preset's selection may have chosen)."""
        return (self.record.options if self.record else self.config).recorded()

    def describe(self) -> str:
        """The recipe in one line, as ``options``."""
        return (self.record.options if self.record else self.config).describe()

    def passes(self, source_sha256: str = "", neuron: str = "if", options: ConvertOptions | None = None,
               data: Any = None) -> list[Pass]:
        """The pipeline, in order. ``neuron="analog"`` builds the rescaled ANN instead (for checks).
        ``options`` and ``data`` default to the converter's own."""
        options = options or self.config
        data = self.dataloader if data is None else data
        pipeline: list[Pass] = [Canonicalize(), QuantizedReLU(), DropOutputSoftmax(), CheckSupport()]
        if options.fuse_flag:
            pipeline.append(FoldBatchNorm())
        if options.output_decoding == "spikes":
            pipeline.append(AddOutputNeurons())
        pipeline += [PlaceMaxPool(options), Calibrate(data, options), QuantizedReLUScales(),
                     InsertNeurons(neuron, options)]
        if neuron == "if" and options.threshold_tuning:
            pipeline.append(TuneThresholds(data, options))
        if neuron == "if" and (options.bias_correction or options.potential_correction):
            pipeline.append(CorrectBias(data, options))
        if options.fold_scales:
            pipeline.append(FoldScales())
        if neuron == "if":
            pipeline += [WriteStepModel(source_sha256), EmbedRuntimeForm()]
        return pipeline

    def __call__(self, model: Any, example_input: Any = None, *, neuron: str = "if") -> onnx.ModelProto:
        source, sha = self.load_source(model, example_input)

        def convert(options: ConvertOptions, data: Any):
            passes = self.passes(sha, neuron, options, data)
            readers = [p.name for p in passes if isinstance(p, (Calibrate, CorrectBias, TuneThresholds))]
            if isinstance(data, Iterator) and len(readers) > 1:
                raise DataError(f"the calibration data is an iterator, which can be read only once, but {readers} "
                                "each read it: pass an array, a list of batches or a re-iterable loader")
            result = PassManager(passes)(source, ConversionRecord(options))
            return result.model, result.record

        if self.config.preset and self.config.select_recipe and neuron == "if":
            snn, self.record, self.selection = selection.select(convert, source, self.config, self.dataloader,
                                                                self.given)
            if self.selection is not None:
                snn = with_selection(snn, self.selection.to_json())
            return snn
        snn, self.record = convert(self.config, self.dataloader)
        return snn

    def load_source(self, model: Any, example_input: Any = None) -> tuple[onnx.ModelProto, str]:
        """(ONNX model, SHA-256 of the source) from any accepted model form."""
        if is_torch_module(model):
            if example_input is None and self.dataloader is not None:
                example_input = first_input(self.dataloader)
            proto = export_module(model, example_input, exporter=self.config.exporter)
            return io.load(proto)
        return io.load(model)
