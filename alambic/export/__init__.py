"""Export a trained student: safetensors weights (always) and a verified ONNX graph (optional extra).

``import alambic.export`` works without the ``onnx`` extra: :func:`export_onnx` imports onnx, onnxscript
and onnxruntime only when called, and raises an :class:`~alambic.errors.AlambicError` naming the install
command if they are missing.
"""

from alambic.export.onnx import export_onnx
from alambic.export.weights import export_safetensors, load_weights, serialize, state_dict_tensors

__all__ = ["export_onnx", "export_safetensors", "load_weights", "serialize", "state_dict_tensors"]
