"""How the NIR export of a converted model runs in other tools, against our runtime.

Converts the sample CNN (99.9 %, v_init 0 or half: ``--v-init``), writes it with ``onnx_snn.write_nir``, reads the file
back and simulates T steps of the test images in:

* ``reference``: NIR 1.0.4's semantics as written (IF: integrate, fire, subtract the threshold), a
  few lines of torch below, with our spike condition ``v >= threshold``;
* ``sinabs``: ``sinabs.from_nir`` as it imports (multi-spike, potential clamped at -threshold);
* ``sinabs-single``: the same model with each IAF layer set to ``SingleSpike`` and no clamp;
* ``norse``: ``norse.torch.from_nir`` as it imports (fires at ``v > threshold``, resets to 0).

and prints, per tool and T, the largest difference of the summed outputs from our runtime's and
the share of predictions equal to ours. ``--json`` writes the table (bench/results/nir_agreement.json).
The functions are the importers' runners that tests/test_nir_export.py uses.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def ours(step_model, x: np.ndarray, T: int) -> np.ndarray:
    """Our runtime's output summed over the first t steps, t = 1..T: [T, N, K]."""
    from onnx_snn_runtime import Simulator
    return Simulator(step_model.SerializeToString(), "cpu").run(x, T)


def _order(sources: dict[str, list[str]]) -> list[str]:
    """The nodes in topological order, from each node's sources."""
    done: list[str] = []
    while len(done) < len(sources):
        done += [n for n in sources if n not in done and all(a in done for a in sources[n])]
    return done


def reference(graph, x: np.ndarray, T: int, v_init: bool = True) -> np.ndarray:
    """NIR 1.0.4's graph semantics, one step at a time: a node's inputs are summed; IF integrates
    (r = 1), fires at ``v >= v_threshold`` and subtracts it; starts from each IF's
    ``onnx_snn.v_init`` metadata when ``v_init``."""
    import nir
    import torch
    import torch.nn.functional as F

    sources = {name: [a for a, b in graph.edges if b == name] for name in graph.nodes}
    order, v, outs = _order(sources), {}, []
    xt = torch.tensor(x, dtype=torch.float32)

    def t(a):
        return torch.tensor(np.asarray(a), dtype=torch.float32)

    for _ in range(T):
        value = {}
        for name in order:
            node = graph.nodes[name]
            u = xt if isinstance(node, nir.Input) else sum(value[s] for s in sources[name])
            if isinstance(node, nir.Conv2d):
                u = F.conv2d(u, t(node.weight), t(node.bias), tuple(node.stride), tuple(node.padding),
                             tuple(node.dilation), node.groups)
            elif isinstance(node, nir.Affine):
                u = u @ t(node.weight).T + t(node.bias)
            elif isinstance(node, nir.SumPool2d):
                u = F.avg_pool2d(u, tuple(node.kernel_size), tuple(node.stride), tuple(node.padding),
                                 count_include_pad=True) * float(np.prod(node.kernel_size))
            elif isinstance(node, nir.AvgPool2d):
                u = F.avg_pool2d(u, tuple(node.kernel_size), tuple(node.stride), tuple(node.padding),
                                 count_include_pad=True)
            elif isinstance(node, nir.Flatten):
                u = u.flatten(1)
            elif isinstance(node, nir.Scale):
                u = u * t(node.scale)
            elif isinstance(node, nir.IF):
                if name not in v:
                    init = node.metadata.get("onnx_snn.v_init") if v_init else None
                    v[name] = torch.zeros_like(u) + (0 if init is None else t(init))
                v[name] = v[name] + t(node.r) * u
                u = (v[name] >= t(node.v_threshold)).to(u.dtype)
                v[name] = v[name] - u * t(node.v_threshold)
            value[name] = u
        outs.append(value[next(n for n in order if isinstance(graph.nodes[n], nir.Output))].numpy())
    return np.cumsum(outs, axis=0)


def sinabs(graph, x: np.ndarray, T: int, single_spike: bool = False, v_init: bool = True) -> np.ndarray:
    """sinabs.from_nir's model on the input repeated over T steps, summed outputs [T, N, K].
    ``single_spike``: each IAF layer set to one spike per step and no lower bound on the
    potential, as our neuron; ``v_init``: potentials set from each IF's ``onnx_snn.v_init``."""
    import sinabs as sn
    import torch
    from sinabs.activation import SingleSpike

    n = len(x)
    model = sn.from_nir(graph, batch_size=n)
    for name, node in graph.nodes.items():
        layer = getattr(model, name, None)
        if isinstance(layer, sn.layers.IAFSqueeze):
            if single_spike:
                layer.spike_fn, layer.min_v_mem = SingleSpike, None
            init = node.metadata.get("onnx_snn.v_init") if v_init else None
            if init is not None:
                layer.init_state_with_shape((n, *init.shape))
                layer.v_mem.data[:] = torch.tensor(init)
    steps = torch.tensor(x).unsqueeze(1).expand(n, T, *x.shape[1:]).reshape(n * T, *x.shape[1:])
    with torch.no_grad():
        out = model(steps)
    out = (out[0] if isinstance(out, tuple) else out).reshape(n, T, -1).numpy()
    return np.cumsum(out.transpose(1, 0, 2), axis=0)


def norse(graph, x: np.ndarray, T: int) -> np.ndarray:
    """norse.torch.from_nir's model stepped T times, one image at a time (its Flatten keeps NIR's
    start_dim without the batch axis, so it flattens the batch too), summed outputs [T, N, K]."""
    import norse.torch as nt
    import torch

    model, out = nt.from_nir(graph), []
    with torch.no_grad():
        for image in torch.tensor(x):
            state, steps = None, []
            for _ in range(T):
                y, state = model(image[None], state)
                steps.append(y.reshape(-1).numpy())
            out.append(steps)
    return np.cumsum(np.array(out).transpose(1, 0, 2), axis=0)


TOOLS = {"reference": reference, "sinabs": sinabs,
         "sinabs-single": lambda g, x, T: sinabs(g, x, T, single_spike=True), "norse": norse}


def agreement(mine: np.ndarray, theirs: np.ndarray) -> dict:
    """Largest difference of the summed outputs, relative to their largest magnitude, and the
    share of equal predictions after every step."""
    scale = float(np.abs(mine).max()) or 1.0
    return {"max_rel_diff": float(np.abs(mine - theirs).max() / scale),
            "same_prediction": [float(v) for v in (mine.argmax(-1) == theirs.argmax(-1)).mean(axis=1)]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500, help="test images (default 500)")
    parser.add_argument("--T", default="4,8,16,32", help="timesteps to report (default 4,8,16,32)")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, of {', '.join(TOOLS)}")
    parser.add_argument("--v-init", choices=("0", "half"), default="0",
                        help="initial potential of the conversion (half: exported into the IF nodes' metadata, "
                             "which the reference and sinabs runners set and Norse's does not)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    import nir
    from onnx_snn_runtime.datasets import load_fashion_mnist

    import onnx_snn

    xc, _ = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    x, y = xt[:args.images], yt[:args.images]
    ts = [int(t) for t in args.T.split(",")]
    v_init = 0.0 if args.v_init == "0" else "half"
    snn = onnx_snn.Converter(xc[:5000], mode="99.9%", v_init=v_init)(ROOT / "models" / "sample_cnn.onnx")
    path = Path("/tmp") / f"nir_agreement_{time.time_ns()}.nir"
    onnx_snn.write_nir(snn, path, initial_potentials="metadata")
    graph = nir.read(path)
    path.unlink()
    mine = ours(snn, x, max(ts))
    rows = {"ours": {"accuracy": [float(v) for v in (mine.argmax(-1) == y).mean(axis=1)]}}
    for tool in args.tools.split(","):
        start = time.perf_counter()
        theirs = TOOLS[tool](graph, x, max(ts))
        rows[tool] = {**agreement(mine, theirs), "accuracy": [float(v) for v in (theirs.argmax(-1) == y).mean(axis=1)],
                      "seconds": round(time.perf_counter() - start, 1)}
    print(f"sample CNN (99.9%, v_init {args.v_init}), {len(x)} test images; {platform.machine()}, {date.today()}")
    print(f"{'tool':<15}{'max rel diff':>14}" + "".join(f"{'same@' + str(t):>10}{'acc@' + str(t):>9}" for t in ts))
    for tool, row in rows.items():
        cells = "".join(f"{row['same_prediction'][t - 1] if 'same_prediction' in row else 1:>10.4f}"
                        f"{row['accuracy'][t - 1]:>9.4f}" for t in ts)
        print(f"{tool:<15}{row.get('max_rel_diff', 0.0):>14.2e}{cells}")
    if args.json:
        versions = {m: __import__(m).__version__ for m in ("nir", "sinabs", "norse") if m in sys.modules}
        args.json.write_text(json.dumps({"images": len(x), "v_init": args.v_init, "T": ts, "date": str(date.today()),
                                         "machine": f"{platform.machine()}, {platform.node()}",
                                         "versions": versions, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
