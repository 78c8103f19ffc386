#!/usr/bin/env bash
# The benchmark environment: the project's .venv (scripts/setup.sh) plus SpikingJelly 2.0, which
# bench/accuracy.py compares against. SpikingJelly is never a dependency of onnx-snn itself.
# --no-deps: its ann2snn needs only torch (already here, the CPU build), loguru and requests;
# its full requirement list would pull torchvision/torchaudio builds for another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
.venv/bin/pip install --quiet --no-deps "spikingjelly==2.0.0"
.venv/bin/pip install --quiet "loguru>=0.7,<1" requests
.venv/bin/python -c "from spikingjelly.activation_based import ann2snn; print('SpikingJelly ann2snn ready')"
