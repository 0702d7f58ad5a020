"""Number formats and kernels: minifloat codecs, block scaling, packed weights and fused dequantize-matmuls.

The public names are re-exported here; docs/formats.md describes the formats, their sources and the kernels.
"""

from cumulo.formats.codec import decode, encode, round_to
from cumulo.formats.element import ELEMENT_FORMATS, ElementFormat, element_format
from cumulo.formats.packed import PackedWeight
from cumulo.formats.quantize import quantize
from cumulo.formats.schemes import SCHEMES, Scheme, get_scheme

__all__ = [
    "ELEMENT_FORMATS",
    "SCHEMES",
    "ElementFormat",
    "PackedWeight",
    "Scheme",
    "decode",
    "element_format",
    "encode",
    "get_scheme",
    "quantize",
    "round_to",
]
