"""QCFS fine-tuning: train a ReLU network for a few timesteps (Bu et al., ICLR 2022).

The quantization-clip-floor-shift activation of "Optimal ANN-SNN conversion for high-accuracy
and ultra-low-latency spiking neural networks" replaces each ReLU by

    y = λ · clamp(floor(x · L / λ + 1/2) / L, 0, 1)

with a trainable threshold λ per layer and L levels. An integrate-and-fire neuron with
threshold λ, reset by subtraction and initial potential λ/2 fed the constant current x emits
``clamp(floor(x·L/λ + 1/2), 0, L)`` spikes in L steps, so a layer of such neurons reproduces
the activation exactly at T = L (deeper layers, fed uneven spike trains, only approximately:
docs/qcfs.md). The converter recognises the activation in the exported ONNX graph
(``passes.quantized_relu``) and keeps its λ and the half-threshold start.

    model = finetune(model, x_train, y_train, epochs=4, levels=4)   # swaps the ReLUs, trains
    snn = onnx_snn.Converter(x_train[:1024], mode="max", target_T=4)(model)

Torch is an optional dependency (``pip install 'onnx-snn[torch]'``).
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np

from .errors import OnnxSnnError, OptionError

try:
    import torch
    from torch import nn
except ImportError as e:  # pragma: no cover - depends on the environment
    raise OnnxSnnError("onnx_snn.qcfs needs torch: pip install 'onnx-snn[torch]'") from e

log = logging.getLogger(__name__)

# λ of a layer with no calibration data: the paper's initial threshold (its code's ``thresh=8.0``)
DEFAULT_LAMBDA = 8.0


class _QCFSTrain(torch.autograd.Function):
    """The activation with the paper's straight-through floor, in one node: forward as in eval
    mode; backward d/dx = 1 and d/dλ = q/L - x/λ where 0 <= q <= L (q = floor(x·L/λ + 1/2)),
    d/dλ = 1 above, 0 below. Recomputing q saves memory and time against autograd's chain."""

    @staticmethod
    def forward(ctx, x, lam, levels: int):
        ctx.save_for_backward(x, lam)
        ctx.levels = levels
        return torch.clamp(torch.floor(x / lam * levels + 0.5) / levels, 0.0, 1.0) * lam

    @staticmethod
    def backward(ctx, grad):
        x, lam = ctx.saved_tensors
        levels = ctx.levels
        q = torch.floor(x / lam * levels + 0.5)
        inside = (q >= 0) & (q <= levels)
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_lam = None
        if ctx.needs_input_grad[1]:
            dlam = torch.where(inside, q / levels - x / lam, (q > levels).to(x.dtype))
            grad_lam = (grad * dlam).sum().reshape(lam.shape)
        return grad_x, grad_lam, None


class QCFS(nn.Module):
    """``λ·clamp(floor(x·L/λ + 1/2)/L, 0, 1)`` with a trainable scalar λ and ``levels`` = L.

    In training mode the floor passes gradients straight through (``_QCFSTrain``); in eval mode the forward is
    plain ``Div, Mul, Add, Floor, Div, Clip, Mul``, so both torch exporters write standard ops.
    """

    def __init__(self, levels: int, lam: float = DEFAULT_LAMBDA):
        super().__init__()
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
            raise OptionError(f"levels={levels!r} must be a positive integer")
        if not (math.isfinite(lam) and lam > 0):
            raise OptionError(f"lambda={lam!r} must be finite and positive")
        self.levels = levels
        self.lam = nn.Parameter(torch.tensor(float(lam)))

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            return _QCFSTrain.apply(x, self.lam, self.levels)
        return torch.clamp(torch.floor(x / self.lam * self.levels + 0.5) / self.levels, 0.0, 1.0) * self.lam

    def extra_repr(self) -> str:
        return f"levels={self.levels}, lam={self.lam.item():.4g}"


def qcfs_layers(model) -> list[QCFS]:
    """The model's QCFS modules, in registration order."""
    return [m for m in model.modules() if isinstance(m, QCFS)]


def _batches(n: int, batch: int):
    return (slice(s, min(s + batch, n)) for s in range(0, n, batch))


def _tensor(a, dtype=None):
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))
    return t.to(dtype) if dtype is not None else t


@torch.no_grad()
def relu_scales(model, x, *, percentile: float = 99.0, batch: int = 256, per_batch: int = 1 << 18) -> dict:
    """{ReLU module: the ``percentile`` of its outputs over ``x``} (at most ``per_batch``
    values per layer and batch are kept, evenly spaced, so memory stays bounded)."""
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    seen: dict = {m: [] for m in relus}

    def keep(module, _inputs, out):
        flat = out.detach().reshape(-1)
        step = max(1, flat.numel() // per_batch)
        seen[module].append(flat[::step].float().numpy())

    hooks = [m.register_forward_hook(keep) for m in relus]
    was_training = model.training
    model.eval()
    try:
        x = _tensor(x, torch.float32)
        for part in _batches(len(x), batch):
            model(x[part])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {m: float(np.percentile(np.concatenate(v), percentile)) if v else 0.0 for m, v in seen.items()}


def replace_relus(model, levels: int, x=None, *, percentile: float = 99.0, batch: int = 256):
    """Swap every ``nn.ReLU`` module of ``model`` (recursively, in place) for ``QCFS(levels)``.

    λ starts at the ``percentile`` of that ReLU's outputs on ``x`` (a few calibration batches),
    or at the paper's 8.0 without data. The default, the 99th percentile, gave the best quantized
    ResNet-20 before training among 97-100 % and the per-layer least-squares λ (docs/qcfs.md).
    ReLUs called as functions (``F.relu``) are not modules and stay. Returns ``model``.
    """
    scales = relu_scales(model, x, percentile=percentile, batch=batch) if x is not None else {}
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                lam = scales.get(child, DEFAULT_LAMBDA)
                setattr(parent, name, QCFS(levels, lam if lam > 0 else 1.0))
                count += 1
    log.info("replaced %d ReLU modules by QCFS(L=%d)%s", count, levels,
             f", lambda from the {percentile:g}th percentile on {len(x)} samples" if x is not None else "")
    if not count:
        log.warning("the model has no nn.ReLU modules: nothing to replace")
    return model


@torch.no_grad()
def recalibrate_batchnorm(model, x, *, batch: int = 256):
    """Re-estimate every BatchNorm's running statistics on ``x`` (forward passes only). After
    ``replace_relus`` the layers see quantized inputs; measured on ResNet-20 (L = 4, 2000 test
    images), 4096 images of this lift the quantized ANN from 90.0 % to 91.1 % before any training."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    was_training, momenta = model.training, [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    model.train()
    x = _tensor(x, torch.float32)
    for part in _batches(len(x), batch):
        model(x[part])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    return model


@torch.no_grad()
def accuracy(model, x, y, *, batch: int = 512) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``x`` with labels ``y``."""
    was_training = model.training
    model.eval()
    x, y = _tensor(x, torch.float32), _tensor(y, torch.int64)
    correct = sum(int((model(x[p]).argmax(1) == y[p]).sum()) for p in _batches(len(x), batch))
    model.train(was_training)
    return correct / max(len(x), 1)


def finetune(model, x, y, epochs: int, levels: int | None = None, *, lr: float = 0.01, batch: int = 128,
             optimizer: str = "sgd", weight_decay: float = 5e-4, calib: int = 1024, seed: int = 0,
             progress: bool = True):
    """Fine-tune ``model`` with QCFS activations for ``epochs`` epochs on ``x``, ``y``; returns it in eval mode.

    Without QCFS modules yet, its ReLUs are first replaced (``replace_relus``, λ from the first
    ``calib`` samples) and its BatchNorm statistics re-estimated on them (``recalibrate_batchnorm``);
    ``levels`` is then required. Loss: cross-entropy; ``optimizer``: ``"sgd"``
    (momentum 0.9) or ``"adam"``, learning rate ``lr`` on a cosine schedule to 0, weight decay on
    every parameter (λ included, as in the paper). λ is kept >= 1e-3.
    """
    if not qcfs_layers(model):
        if levels is None:
            raise OptionError("the model has no QCFS layers yet: give levels= to replace its ReLUs")
        replace_relus(model, levels, x[:calib])
        recalibrate_batchnorm(model, x[:calib])
    elif levels is not None and any(q.levels != levels for q in qcfs_layers(model)):
        raise OptionError(f"the model's QCFS layers have levels {sorted({q.levels for q in qcfs_layers(model)})}, "
                          f"not {levels}")
    if optimizer not in ("sgd", "adam"):
        raise OptionError(f"optimizer={optimizer!r}; use 'sgd' or 'adam'")
    from tqdm.auto import tqdm

    x, y = _tensor(x, torch.float32), _tensor(y, torch.int64)
    params = list(model.parameters())
    opt = (torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay) if optimizer == "sgd"
           else torch.optim.Adam(params, lr=lr, weight_decay=weight_decay))
    steps = epochs * math.ceil(len(x) / batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    lams = [q.lam for q in qcfs_layers(model)]
    model.train()
    for epoch in range(epochs):
        start, total, correct = time.perf_counter(), 0.0, 0
        order = torch.randperm(len(x), generator=generator)
        bar = tqdm(list(_batches(len(x), batch)), desc=f"QCFS epoch {epoch + 1}/{epochs}", unit="batch",
                   disable=not progress, leave=False)
        for part in bar:
            idx = order[part]
            out = model(x[idx])
            loss = loss_fn(out, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            with torch.no_grad():
                for lam in lams:
                    lam.clamp_(min=1e-3)
            total += loss.item() * len(idx)
            correct += int((out.argmax(1) == y[idx]).sum())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        log.info("QCFS epoch %d/%d: loss %.4f, train accuracy %.4f, %.1f s", epoch + 1, epochs, total / len(x),
                 correct / len(x), time.perf_counter() - start)
    return model.eval()
