"""Conversion cost at ImageNet size: time and peak memory of onnx-snn's recipes on a ResNet-50
at 224 x 224, by recipe and by number of calibration images, beside one ANN inference pass.

    python bench/scale.py [--recipes 99.9%,max,preset] [--images 64] [--preset-images 64,256,1024]
                          [--batch 16] [--target-T 8] [--profile]

The model is torchvision's ResNet-50 (v1.5: Bottleneck blocks [3, 4, 6, 3], stride on the 3x3
conv, 25,557,032 parameters, asserted) written out in plain torch here, since torchvision is not
importable in the project's environment; seeded random weights with torchvision's init (the cost
does not depend on training). It is exported once with BatchNormalization kept (TorchScript
exporter, opset 17, dynamic batch) to ``.cache/bench_scale/``, under a hash of this model code.
Calibration images are seeded N(0, 1) images made batch by batch by an iterable, so the data
never holds more than one batch whatever the count.

Every measurement runs in a fresh child process; its peak memory is the child's whole peak
resident set (``ru_maxrss`` from ``wait4``: Python, onnxruntime, the model and the job). Jobs:
``ann`` (one onnxruntime CPU inference pass over the images at the same batch: the yardstick,
session creation excluded) and one conversion per recipe (``onnx_snn.Converter`` on the ONNX
file, every pass): ``99.9%`` per channel, ``max`` (per layer) and ``preset``: the recipe of
``target_T=8`` given explicitly (threshold search per channel for T, v_init half, bias and
potential correction; ``PRESET_RECIPE``), so that any selection among candidate recipes the
converter may run for ``target_T`` alone is not part of it; ``selection`` (not run by default) is
``target_T`` alone, as users call it, recipe selection included. The preset also runs at
``--preset-images``. Each row gives wall seconds and CPU seconds (all threads) of
the job and both as multiples of the ANN pass's, with the 1-minute load average: on a shared
machine the wall time grows with the others' load, the CPU time much less. ``--profile`` adds
each pass's wall seconds and peak RSS (VmHWM, reset after each pass; the row's peak is the
largest).

The issue's targets, on this model: every recipe's peak RSS <= 3 GB whatever the number of
images, and time <= 10 x the ANN pass.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import inspect
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TORCHVISION_RESNET50_PARAMETERS = 25_557_032
SEED = 0
EXPORT = dict(opset=17, exporter="torchscript", preserve_batchnorm=True)
# The preset's recipe as the issue defines it (``presets.py``'s first candidate), given explicitly:
# the measurement is of that recipe, not of any choice among candidates ``Converter`` may make
PRESET_RECIPE = dict(mode="search", per_channel=True, v_init="half", bias_correction=True, potential_correction=True)
RECIPES = {
    "99.9%": ("99.9% per channel", lambda T: dict(mode="99.9%", per_channel=True)),
    "max": ("max", lambda T: dict(mode="max")),
    "preset": ("preset target_T={T}", lambda T: dict(PRESET_RECIPE, target_T=T)),
    # what users get from target_T alone: the preset's candidates tried on held-out images (selection)
    "selection": ("target_T={T} alone (recipe selection)", lambda T: dict(target_T=T)),
}


# --- the model: torchvision.models.resnet50's layout in plain torch -----------------------------

def resnet50():
    """torchvision's ``resnet50()`` (weights=None), module for module: same layers, same order,
    same init (kaiming_normal_ fan_out for convs, BatchNorm weight 1 and bias 0, Linear default)."""
    from torch import nn

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)  # v1.5
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * self.expansion)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample

        def forward(self, x):
            identity = x
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            if self.downsample is not None:
                identity = self.downsample(x)
            return self.relu(out + identity)

    class ResNet(nn.Module):
        def __init__(self, layers=(3, 4, 6, 3), num_classes: int = 1000):
            super().__init__()
            self.inplanes = 64
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            self.layer1 = self._layer(64, layers[0])
            self.layer2 = self._layer(128, layers[1], stride=2)
            self.layer3 = self._layer(256, layers[2], stride=2)
            self.layer4 = self._layer(512, layers[3], stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)

        def _layer(self, planes: int, blocks: int, stride: int = 1):
            downsample = None
            if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes * Bottleneck.expansion))
            layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes * Bottleneck.expansion
            layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
            return nn.Sequential(*layers)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(self.avgpool(x).flatten(1))

    return ResNet()


def model_path() -> Path:
    """The exported ResNet-50, made on first use; the name hashes the model code and export settings."""
    key = hashlib.sha256((inspect.getsource(resnet50) + repr(EXPORT) + str(SEED)).encode()).hexdigest()[:12]
    path = ROOT / ".cache" / "bench_scale" / f"resnet50-{key}.onnx"
    if path.exists():
        return path
    import torch

    from onnx_snn.torch_export import export_module
    torch.manual_seed(SEED)
    model = resnet50().eval()
    count = sum(p.numel() for p in model.parameters())
    assert count == TORCHVISION_RESNET50_PARAMETERS, f"{count} parameters, torchvision's ResNet-50 has 25,557,032"
    proto = export_module(model, torch.zeros(1, 3, 224, 224), **EXPORT)
    assert any(n.op_type == "BatchNormalization" for n in proto.graph.node), "the export folded BatchNorm"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(proto.SerializeToString())
    tmp.replace(path)
    print(f"exported {path.relative_to(ROOT)} ({count:,} parameters)", flush=True)
    return path


class RandomImages:
    """``count`` seeded N(0, 1) images (plausibly normalised inputs), made batch by batch: the data
    itself never holds more than one batch. Iterating again yields the same images."""

    def __init__(self, count: int, batch: int, seed: int = SEED, size: int = 224):
        self.count, self.batch, self.seed, self.size = count, batch, seed, size

    def __len__(self) -> int:
        return -(-self.count // self.batch)

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        for start in range(0, self.count, self.batch):
            n = min(self.batch, self.count - start)
            yield rng.standard_normal((n, 3, self.size, self.size), dtype=np.float32)


# --- one measurement, in a child process ---------------------------------------------------------

def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024


class _PassProfile(logging.Handler):
    """Each pass's seconds and peak RSS, from the pass manager's debug line (VmHWM reset after each)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.rows = []

    def peak_mb(self) -> float:
        """The peak over the passes and since (resetting VmHWM also resets what ru_maxrss reports)."""
        return max([_vm_hwm_mb()] + [peak for _, _, peak in self.rows])

    def emit(self, record):
        if record.msg.startswith("pass %s"):
            self.rows.append((record.args[0], record.args[2], _vm_hwm_mb()))
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")


def child(job: str, images: int, batch: int, target_T: int, profile: bool) -> dict:
    import onnxruntime as ort
    ort.set_default_logger_severity(3)
    path = model_path()
    data = RandomImages(images, batch)
    if job == "ann":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        start, cpu = time.perf_counter(), time.process_time()
        for x in data:
            session.run(None, {name: x})
        return {"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu}
    import onnx_snn
    handler = _PassProfile()
    if profile:
        base = logging.getLogger("onnx_snn.passes.base")
        base.setLevel(logging.DEBUG)
        base.addHandler(handler)
    options = RECIPES[job][1](target_T)
    start, cpu = time.perf_counter(), time.process_time()
    onnx_snn.Converter(data, progress=False, batch_size=batch, **options)(path)
    return {"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu, "passes": handler.rows,
            "peak_mb": handler.peak_mb() if profile else None}


def measure(job: str, images: int, args) -> dict:
    """Run one job in a fresh process: its result and its whole peak RSS (GB)."""
    command = [sys.executable, __file__, "--child", job, "--images", str(images), "--batch", str(args.batch),
               "--target-T", str(args.target_T)] + (["--profile"] if args.profile else [])
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: ru_maxrss is its peak RSS
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        out, err = out.read(), err.read()
    if proc.returncode:
        sys.stderr.write(err[-4000:])
        raise SystemExit(f"{job} on {images} images failed (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_gb"] = max(usage.ru_maxrss * 1024, (result.get("peak_mb") or 0) * 2**20) / 1e9
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", default="99.9%,max,preset", help=f"of {', '.join(RECIPES)}")
    parser.add_argument("--images", default="64", help="calibration image counts for every recipe")
    parser.add_argument("--preset-images", default="64,256,1024", help="further counts for the preset")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--target-T", type=int, default=8)
    parser.add_argument("--profile", action="store_true", help="each pass's seconds and peak RSS")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    counts = [int(n) for n in args.images.split(",")]
    if args.child:
        print(json.dumps(child(args.child, counts[0], args.batch, args.target_T, args.profile)))
        return
    import onnxruntime as ort
    recipes = [r.strip() for r in args.recipes.split(",")]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    path = model_path()
    preset = sorted({int(n) for n in args.preset_images.split(",")}) if "preset" in recipes else []
    jobs = [(r, n) for n in counts for r in recipes] + [("preset", n) for n in preset if n not in counts]
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}; machine: {platform.machine()}, "
          f"{os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; "
          f"onnxruntime {ort.__version__}; Python {platform.python_version()}")
    print(f"model: ResNet-50 (torchvision layout, random weights) at 224x224, {path.name}; batch {args.batch}; "
          f"each job in a fresh process, peak = its whole peak RSS (GB = 1e9 bytes); x ANN: seconds (CPU seconds) "
          f"over the ANN pass's; load: 1-minute load average after the job (other processes slow the timings)")
    print(f"{'recipe':<22} {'images':>6} {'batch':>5} {'seconds':>8} {'CPU s':>7} {'peak GB':>8} "
          f"{'x ANN':>7} {'x ANN CPU':>9} {'load':>5}", flush=True)
    ann: dict[int, dict] = {}

    def row(label: str, images: int, result: dict, base: dict) -> None:
        print(f"{label:<22} {images:6d} {args.batch:5d} {result['seconds']:8.1f} {result['cpu']:7.1f} "
              f"{result['peak_gb']:8.2f} {result['seconds'] / base['seconds']:6.2f}x "
              f"{result['cpu'] / base['cpu']:8.2f}x {os.getloadavg()[0]:5.1f}", flush=True)

    for recipe, images in jobs:
        if images not in ann:
            ann[images] = measure("ann", images, args)
            row("ANN pass (onnxruntime)", images, ann[images], ann[images])
        result = measure(recipe, images, args)
        row(RECIPES[recipe][0].format(T=args.target_T), images, result, ann[images])
        for name, seconds, peak in result.get("passes", []):
            print(f"    {name:<20} {seconds:8.1f} s  peak {peak * 2**20 / 1e9:6.2f} GB", flush=True)


if __name__ == "__main__":
    main()
