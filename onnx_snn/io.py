"""Reading source models and writing step models, with project errors and atomic writes."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import ModelLoadError, OnnxSnnError

log = logging.getLogger(__name__)
# Protobuf's 2 GiB message limit, less headroom: past it a step model is saved with external data,
# and a source model is refused (the converter builds its sessions from serialized bytes).
PROTOBUF_LIMIT = 2**31 - 1 - (64 << 20)


def load(source: str | os.PathLike | bytes | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """(model, SHA-256 of its serialized bytes) from a path, bytes or a ModelProto (copied)."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        return model, hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
    if isinstance(source, (bytes, bytearray)):
        return _parse(bytes(source), "<bytes>"), hashlib.sha256(source).hexdigest()
    if not isinstance(source, (str, os.PathLike)):
        raise ModelLoadError(f"cannot read a model from {type(source).__name__}; give a path, bytes, "
                             "an onnx.ModelProto or a torch.nn.Module with an example input")
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"model file {path} does not exist")
    if not path.is_file():
        raise ModelLoadError(f"{path} is not a file; give the path of an .onnx model")
    data = path.read_bytes()
    if not data:
        raise ModelLoadError(f"model file {path} is empty")
    model = _parse(data, str(path))
    _check_external_locations(model, path)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except (OSError, onnx.checker.ValidationError, ValueError) as e:
        raise ModelLoadError(f"{path}: its external data cannot be read ({e}); keep the data files "
                             "beside the model as they were saved") from e
    return model, hashlib.sha256(data).hexdigest()


def _check_external_locations(model: onnx.ModelProto, path: Path) -> None:
    """Refuse external data that points outside the model's folder (an absolute path or ..):
    a model from elsewhere must not make us read arbitrary files."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data
    folder = path.parent.resolve()
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        # lexical, not resolved: a data file that is a symlink (a hub cache's blobs) is onnx's call
        target = os.path.normpath(os.path.join(folder, location))
        if os.path.isabs(location) or not target.startswith(str(folder) + os.sep):
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} keeps its data at {location!r}, outside the "
                                 f"model's folder {folder}; refused (a model may only read data files beside "
                                 "it). Save the model with its data in one folder")


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except DecodeError as e:
        raise ModelLoadError(f"{where} is not an ONNX model (protobuf parse failed: {e})") from e
    if not model.HasField("graph") or not model.graph.node and not model.graph.input:
        raise ModelLoadError(f"{where} holds no ONNX graph; is it really an .onnx model?")
    try:
        _decode_text(model)
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{where} holds a name or text that is not UTF-8 ({e}); the file is corrupted") from e
    return model


def _decode_text(message) -> None:
    """Decode every string field once, and attributes' byte strings (which graph tools decode
    as UTF-8), so a corrupted one fails here with a clear error rather than deep inside a pass."""
    if isinstance(message, onnx.AttributeProto):
        message.s.decode("utf-8")
        for item in message.strings:
            item.decode("utf-8")
    for field, value in message.ListFields():
        if field.type == field.TYPE_STRING:
            # protobuf hands back bytes, not str, for a string field that is not valid UTF-8
            if isinstance(value, bytes) or (not isinstance(value, str) and any(isinstance(v, bytes) for v in value)):
                raise UnicodeDecodeError("utf-8", value if isinstance(value, bytes) else b"", 0, 1,
                                         f"field {field.name!r} of {type(message).__name__}")
            continue
        if field.message_type is None:
            continue
        for item in ([value] if hasattr(value, "ListFields") else value):  # one message, or repeated
            _decode_text(item)


def save(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``model`` atomically: into a temporary folder beside ``path``, then renamed, so a
    failure or an interruption leaves neither a half-written file nor the temporary folder.
    Models past protobuf's 2 GiB limit get their tensors in ``<name>.data`` beside the file.
    Returns the path written."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OnnxSnnError(f"cannot write {path}: {path.parent} is not an existing folder; create it first")
    large = model.ByteSize() > PROTOBUF_LIMIT
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise OnnxSnnError(f"cannot write in {path.parent}: {e}; choose a folder you can write to") from e
    try:
        tmp = tmpdir / path.name
        if large:
            copy = onnx.ModelProto()  # saving with external data rewrites the tensors in place
            copy.CopyFrom(model)
            onnx.save_model(copy, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=f"{path.name}.data", size_threshold=1024)
            os.replace(tmpdir / f"{path.name}.data", path.parent / f"{path.name}.data")
        else:
            tmp.write_bytes(model.SerializeToString())
        os.replace(tmp, path)
    except OSError as e:
        raise OnnxSnnError(f"cannot write {path}: {e}") from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    log.info("wrote %s", path)
    return path
