"""The latency-budget preset: ``Converter(data, target_T=T)`` without a ``mode``.

The preset is a short list of candidate recipes (``CANDIDATES``). By default the converter
tries each on held-out calibration data for T steps and keeps the best (``onnx_snn.selection``);
with ``select_recipe=False`` it applies the first. Options the caller gives explicitly override
every candidate's; a caller who names a ``mode`` gets no preset at all, only the plain defaults
below for what they leave out.

The candidates were chosen on our four models and training images only (bench/recipes.py on
images from index 50000, outside the calibration set; bench/accuracy.py then measured them on
the test set), never on the held-out models (``models/zoo.py: HELD_OUT``):

* channel-wise threshold search for T, half-threshold initial potential, bias then potential
  correction (Li et al. 2021; Deng & Gu 2021; Bu et al. 2022): our best at every T <= 16 on our
  models, and the fallback when no selection runs;
* the same with output-level threshold tuning (``passes.tune_thresholds``);
* 99.9 % channel-wise with half v_init, no correction: ahead of the first on a Keras CNN from
  tf2onnx at T=8 (77.39 % against 76.92 %), and within 0.4 points of the best beyond T=16;
* 99.9 % channel-wise with half v_init and the corrections.
"""
from __future__ import annotations

# The recipe options: what a preset candidate sets.
RECIPE = ("mode", "per_channel", "v_init", "bias_correction", "potential_correction", "threshold_tuning")

# What Converter uses for a recipe option neither the caller nor a preset sets.
PLAIN = dict(mode="max", per_channel=False, v_init=0.0, bias_correction=False, potential_correction=False,
             threshold_tuning=False)

_CORRECTED = dict(bias_correction=True, potential_correction=True)
CANDIDATES: list[tuple[str, dict]] = [
    ("search(T), channel-wise, half, bias+potential",
     dict(mode="search", per_channel=True, v_init="half", **_CORRECTED)),
    ("search(T), channel-wise, half, bias+potential, tuned",
     dict(mode="search", per_channel=True, v_init="half", **_CORRECTED, threshold_tuning=True)),
    ("99.9%, channel-wise, half", dict(mode="99.9%", per_channel=True, v_init="half")),
    ("99.9%, channel-wise, half, bias+potential", dict(mode="99.9%", per_channel=True, v_init="half", **_CORRECTED)),
]


def _complete(recipe: dict, given: dict) -> dict:
    """``recipe`` over the plain defaults, with what the caller gave on top."""
    base = {**PLAIN, **recipe}
    return {k: (given[k] if given.get(k) is not None else v) for k, v in base.items()}


def preset(target_T: int) -> dict:
    """The first candidate: the recipe used when no selection runs."""
    return dict(CANDIDATES[0][1])


def candidates(given: dict) -> list[tuple[str, dict]]:
    """The candidates as full recipes, with the caller's explicit options applied; recipes that
    come out the same are tried once (under the first label)."""
    seen, out = [], []
    for label, recipe in CANDIDATES:
        options = _complete(recipe, given)
        if options not in seen:
            seen.append(options)
            out.append((label, options))
    return out


def resolve(target_T: int | None, given: dict) -> tuple[dict, bool]:
    """The full recipe from what the caller gave (``None`` = not given), and whether the preset
    applied (``target_T`` given and ``mode`` not)."""
    use_preset = target_T is not None and given.get("mode") is None
    return _complete(preset(target_T) if use_preset else {}, given), use_preset
