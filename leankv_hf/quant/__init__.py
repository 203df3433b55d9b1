"""Bit packing and group-wise (int2/4/8, fp8) quantization of KV tensors."""

from .groupwise import QuantizedTensor, dequantize, quantize
from .packing import pack, unpack

__all__ = ["QuantizedTensor", "dequantize", "pack", "quantize", "unpack"]
