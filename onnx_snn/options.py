"""The converter's options: one frozen dataclass, validated once.

``Converter(...)`` keeps its keyword signature (it mirrors SpikingJelly's); it builds a
``ConvertOptions`` with ``ConvertOptions.resolve``, which applies the ``target_T`` preset and
checks every value. The passes read this object, ``WriteStepModel`` records it in the step
model (``recorded()``), and the CLI's ``convert`` flags, with their choices and help, are
generated from the fields' ``cli`` metadata (``add_cli_arguments`` / ``from_cli``), so an
option is declared in one place.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from . import presets
from .calibration.mode import Mode, parse_mode
from .errors import OptionError
from .maxpool import STRATEGIES as MAXPOOL_STRATEGIES
from .ops.if_neuron import RESET_MODES
from .torch_export import EXPORTERS

OUTPUT_DECODINGS = ("analog", "spikes")


def _cli(flag: str, help: str, kind: str = "value", **extra) -> dict:
    """Field metadata for the CLI. ``kind``: ``value`` (--flag X), ``int``, ``choice`` (from
    ``choices``), ``toggle`` (--flag / --no-flag, unset = the preset or default decides) or
    ``off`` (a store-true flag that sets the option False, e.g. --no-fuse)."""
    return {"cli": {"flag": flag, "help": help, "kind": kind, **extra}}


@dataclass(frozen=True)
class ConvertOptions:
    """Every converter option, with the meaning documented in ``Converter``'s docstring."""
    mode: Mode = field(default=Mode("max", 1.0), metadata=_cli(
        "--mode", "'max', a percentile like '99.9%%', a fraction k of the max, or 'search' (with --target-T) "
        "(default: max; with --target-T alone, the preset)"))
    fuse_flag: bool = field(default=True, metadata=_cli(
        "--no-fuse", "do not fold BatchNormalization", "off"))
    per_channel: bool = field(default=False, metadata=_cli(
        "--per-channel", "one scale per channel instead of per layer", "toggle"))
    maxpool: str = field(default="running_max", metadata=_cli(
        "--maxpool", "MaxPool strategy (default: running_max)", "choice", choices=MAXPOOL_STRATEGIES))
    reset_mode: str = field(default="subtract", metadata=_cli(
        "--reset", "neuron reset (default: subtract)", "choice", choices=RESET_MODES))
    v_reset: float = 0.0
    v_init: float = field(default=0.0, metadata=_cli(
        "--v-init", "initial membrane potential in thresholds: a number or 'half' (default 0)"))
    target_T: int | None = field(default=None, metadata=_cli(
        "--target-T", "timesteps the model is built for: recorded (the default T of 'run'), needed by "
        "--mode search and the corrections; alone (no --mode), applies the recipe the accuracy "
        "benchmark found best at that T", "int"))
    bias_correction: bool = field(default=False, metadata=_cli(
        "--bias-correction", "correct each layer's mean output for --target-T steps (Li et al. 2021)", "toggle"))
    potential_correction: bool = field(default=False, metadata=_cli(
        "--potential-correction", "then set per-neuron initial potentials for --target-T steps (Li et al. 2021)",
        "toggle"))
    threshold_tuning: bool = field(default=False, metadata=_cli(
        "--tune-thresholds", "then tune each layer's threshold against the network's output after --target-T "
        "steps, on calibration data, without labels (passes.tune_thresholds)", "toggle"))
    select_recipe: bool = field(default=True, metadata=_cli(
        "--no-select-recipe", "with the --target-T preset, use its first recipe instead of choosing among the "
        "candidates on held-out calibration data", "off"))
    output_decoding: str = field(default="analog", metadata=_cli(
        "--output-decoding", "sum the last layer's outputs (analog, default) or make them neurons (spikes)",
        "choice", choices=OUTPUT_DECODINGS))
    batch_size: int = field(default=256, metadata=_cli(
        "--batch-size", "calibration batch size (default: 256)", "int"))
    bins: int | None = field(default=None, metadata=_cli(
        "--bins", "histogram bins for percentiles (power of two)", "int"))
    exporter: str = "dynamo"
    progress: bool = True
    fold_scales: bool = field(default=True, metadata=_cli(
        "--no-fold-scales", "keep the threshold-scaling Muls around each neuron (SpikingJelly's VoltageScalers) "
        "instead of folding them into the weights", "off"))
    preset: bool = False  # whether the target_T preset chose the recipe

    def __post_init__(self):
        self._check()

    @classmethod
    def resolve(cls, mode: Any = None, *, per_channel: bool | None = None, v_init: float | str | None = None,
                bias_correction: bool | None = None, potential_correction: bool | None = None,
                threshold_tuning: bool | None = None, target_T: int | None = None, **others) -> "ConvertOptions":
        """The options from what a caller gave (``None`` = not given): with ``target_T`` and no
        ``mode``, the preset fills what the caller left out (``onnx_snn.presets``)."""
        if target_T is not None and (isinstance(target_T, bool) or not isinstance(target_T, int) or target_T <= 0):
            raise OptionError(f"target_T={target_T!r} must be a positive integer")
        unknown = sorted(set(others) - {f.name for f in dataclasses.fields(cls)} - {"preset"})
        if unknown:
            raise OptionError(f"unknown converter option(s) {unknown}")
        chosen, preset = presets.resolve(target_T, dict(
            mode=mode, per_channel=per_channel, v_init=v_init, bias_correction=bias_correction,
            potential_correction=potential_correction, threshold_tuning=threshold_tuning))
        return cls(**recipe_fields(chosen), target_T=target_T, preset=preset, **others)

    @classmethod
    def of(cls, options: "ConvertOptions | Any" = None, **given) -> "ConvertOptions":
        """``options`` itself, with ``given`` replaced; or, when ``options`` is not a
        ``ConvertOptions``, the options resolved from it as the mode plus ``given``."""
        if isinstance(options, cls):
            return dataclasses.replace(options, **given) if given else options
        return cls.resolve(options, **given)

    def _check(self) -> None:
        if not isinstance(self.mode, Mode):
            raise OptionError(f"mode={self.mode!r}; give a Mode (ConvertOptions.resolve parses strings)")
        if (self.mode.kind == "search" or self.bias_correction or self.potential_correction
                or self.threshold_tuning) and self.target_T is None:
            raise OptionError('mode="search", the bias and potential corrections and threshold tuning work for a '
                              'number of timesteps: give target_T (--target-T on the command line)')
        for name, allowed in (("maxpool", MAXPOOL_STRATEGIES), ("reset_mode", RESET_MODES),
                              ("exporter", EXPORTERS), ("output_decoding", OUTPUT_DECODINGS)):
            if getattr(self, name) not in allowed:
                raise OptionError(f"{name}={getattr(self, name)!r}; use one of {', '.join(allowed)}")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size <= 0:
            raise OptionError(f"batch_size={self.batch_size!r} must be a positive integer")
        if self.bins is not None and (not isinstance(self.bins, int) or self.bins < 2 or self.bins & (self.bins - 1)):
            raise OptionError(f"bins={self.bins!r} must be a power of two >= 2")
        for name in ("v_init", "v_reset"):
            value = getattr(self, name)
            if isinstance(value, (bool, str)) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise OptionError("v_init and v_reset must be finite numbers")
        for name in ("fold_scales", "fuse_flag", "per_channel", "bias_correction", "potential_correction",
                     "threshold_tuning", "select_recipe"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{name}={getattr(self, name)!r} must be True or False")

    def recorded(self) -> dict:
        """What the step model records of the options (metadata ``onnx_snn.converter``)."""
        return {"mode": str(self.mode), "fuse_flag": self.fuse_flag, "per_channel": self.per_channel,
                "maxpool": self.maxpool, "reset_mode": self.reset_mode, "v_reset": self.v_reset,
                "v_init": self.v_init, "target_T": self.target_T, "bias_correction": self.bias_correction,
                "potential_correction": self.potential_correction, "output_decoding": self.output_decoding,
                "fold_scales": self.fold_scales, "preset": self.preset,
                # written only when on, so that step models converted without it read as before
                **({"threshold_tuning": True} if self.threshold_tuning else {})}

    def describe(self) -> str:
        """One line for people: the recipe, e.g. ``preset for T=8: mode search, per_channel, v_init 0.5``."""
        text = f"preset for T={self.target_T}: " if self.preset else ""
        text += f"mode {self.mode}" + "".join(
            f", {name}" for name in ("per_channel", "bias_correction", "potential_correction", "threshold_tuning")
            if getattr(self, name))
        return text + (f", v_init {self.v_init:g}" if self.v_init else "")


def recipe_fields(recipe: dict) -> dict:
    """A preset recipe (``presets.RECIPE`` keys, as a caller writes them) as option fields."""
    return dict(recipe, mode=parse_mode(recipe["mode"]), v_init=_v_init(recipe["v_init"]))


def v_init_argument(text: str) -> float:
    """``--v-init`` as the command line takes it, wherever it appears: a number or 'half'."""
    if text == "half":
        return 0.5
    try:
        return float(text)
    except ValueError:
        raise OptionError(f"--v-init {text!r}: give a number (in thresholds) or 'half'") from None


def _v_init(value: Any) -> float:
    if value == "half":
        return 0.5
    if isinstance(value, (str, bool)) or not isinstance(value, numbers.Real):
        raise OptionError(f"v_init={value!r}; give a number (in units of the threshold) or 'half'")
    return value


def cli_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(ConvertOptions) if "cli" in f.metadata]


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``convert`` flags, generated from the fields. Every flag defaults to "not given"
    (None), so that ``from_cli`` can tell the preset which options the user chose."""
    for f in cli_fields():
        spec = f.metadata["cli"]
        kwargs: dict[str, Any] = {"help": spec["help"], "dest": f.name}
        if spec["kind"] == "toggle":
            kwargs.update(action=argparse.BooleanOptionalAction, default=None)
        elif spec["kind"] == "off":
            kwargs.update(action="store_const", const=False, default=None)
        elif spec["kind"] == "choice":
            kwargs.update(choices=spec["choices"], default=None)
        elif spec["kind"] == "int":
            kwargs.update(type=int, default=None)
        else:
            kwargs.update(default=None)
        parser.add_argument(spec["flag"], **kwargs)


def from_cli(args: argparse.Namespace) -> dict:
    """The ``Converter`` keyword arguments the user gave on the command line (the rest unset)."""
    given = {f.name: getattr(args, f.name) for f in cli_fields() if getattr(args, f.name, None) is not None}
    if "v_init" in given and given["v_init"] != "half":
        given["v_init"] = v_init_argument(given["v_init"])
    return given
