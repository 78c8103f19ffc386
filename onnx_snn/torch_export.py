"""Export a ``torch.nn.Module`` to ONNX with either of torch's exporters (torch imported lazily)."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np
import onnx

from .errors import ModelLoadError, OptionError

log = logging.getLogger(__name__)
EXPORTERS = ("dynamo", "torchscript")


def is_torch_module(obj) -> bool:
    return any(c.__module__.startswith("torch.nn") and c.__name__ == "Module" for c in type(obj).__mro__)


def export_module(module, example_input, *, exporter: str = "dynamo", preserve_batchnorm: bool = False,
                  opset: int | None = None) -> onnx.ModelProto:
    """ONNX of ``module`` in eval mode, input ``input`` and output ``output``, dynamic batch axis.

    ``preserve_batchnorm`` keeps BatchNormalization nodes where the exporter allows it (the
    TorchScript exporter with TrainingMode.PRESERVE; the dynamo exporter without its optimizer).
    """
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ModelLoadError("converting a torch.nn.Module needs torch: pip install 'onnx-snn[torch]'") from e
    if exporter not in EXPORTERS:
        raise OptionError(f"exporter={exporter!r}; use one of {', '.join(EXPORTERS)}")
    if example_input is None:
        raise OptionError("converting a torch.nn.Module needs an example input (one batch); pass "
                          "example_input= or a dataloader to take it from")
    x = example_input if isinstance(example_input, torch.Tensor) else torch.from_numpy(np.asarray(example_input))
    was_training = module.training
    module.eval()
    torch_log = logging.getLogger("torch.onnx")
    torch_level = torch_log.level
    torch_log.setLevel(logging.ERROR)  # its registry warns about torchvision ops we never use
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if exporter == "torchscript":
                buffer = io.BytesIO()
                torch.onnx.export(module, (x,), buffer, dynamo=False, input_names=["input"],
                                  output_names=["output"], opset_version=opset or 17,
                                  dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                                  training=torch.onnx.TrainingMode.PRESERVE if preserve_batchnorm
                                  else torch.onnx.TrainingMode.EVAL,
                                  do_constant_folding=not preserve_batchnorm)
                return onnx.load_from_string(buffer.getvalue())
            kwargs = dict(dynamo=True, input_names=["input"], output_names=["output"], verbose=False,
                          optimize=not preserve_batchnorm)
            if opset:
                kwargs["opset_version"] = opset
            try:
                program = torch.onnx.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},), **kwargs)
            except Exception as e:  # noqa: BLE001 - some models specialise the batch size
                log.warning("dynamic-batch export failed (%s); exporting with a fixed batch of %d", e, len(x))
                program = torch.onnx.export(module, (x,), **kwargs)
            return program.model_proto
    except (ModelLoadError, OptionError):
        raise
    except Exception as e:  # noqa: BLE001 - torch raises many types
        raise ModelLoadError(f"torch.onnx.export ({exporter}) failed: {e}. Try exporter="
                             f"{'torchscript' if exporter == 'dynamo' else 'dynamo'!r}, or export the "
                             "model to ONNX yourself and pass the file") from e
    finally:
        module.train(was_training)
        torch_log.setLevel(torch_level)
