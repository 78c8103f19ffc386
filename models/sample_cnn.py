"""The seed's sample CNN (SpikingJelly's ann2snn tutorial network).

    Conv(1,32,3)-BN-ReLU-AvgPool(2) x3 (32 channels), Flatten, Linear(32,10)

``python models/sample_cnn.py`` retrains it as committed (12 epochs, Adam with a one-cycle
schedule peaking at 2e-3, no augmentation; see ``models/train.py``) and writes
``sample_cnn.pt`` and ``sample_cnn.onnx`` (BatchNormalization kept) beside this file.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo import load_trained, sample_cnn  # noqa: E402,F401 - re-exported for tests and users

if __name__ == "__main__":
    from train import main
    main(["sample_cnn", "--epochs", "12", "--lr", "2e-3"])
