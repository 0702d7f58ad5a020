"""The kernels' calling convention, from the one declaration of each kernel's arguments (kernel.h).

Every kernel is a C function `int64_t name(const int64_t* args)` whose arguments the C side declares once, as a
list of (C type, name) from which it also reports `<name>_signature()`. A `Kernel` reads that signature when
its library loads and builds the int64 array by argument name: `kernel(**args)` calls it now (returning its
code: 0, or an error the wrapper maps to a message), `kernel.op(**args)` is the same call recorded for a decode
graph (cumulo.platform.kernels.graph). A missing or unknown name, or a tensor where a number belongs, raises
TypeError before anything reaches C. Pointers take a tensor (its data pointer), an address, or None (null);
floats travel as their fp32 bit patterns.
"""

from __future__ import annotations

import ctypes
import operator
import struct
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

Op = tuple[int, list[int]]  # (function address, its int64 arguments): one recorded call
KINDS = ("ptr", "int", "f32")
_INTS = (int, bool)
_NUMBERS = (float, int, bool)


def f32_bits(value: float) -> int:
    """An fp32 argument as the int64 the C side reads it from (its IEEE bit pattern)."""
    return struct.unpack("=I", struct.pack("=f", value))[0]


def kind(c_type: str) -> str:
    """How a C type (as the signature spells it) travels: "ptr" (an address), "int", or "f32" (its bits)."""
    if c_type.endswith("*"):
        return "ptr"
    if c_type in ("int64_t", "int"):
        return "int"
    if c_type == "float":
        return "f32"
    raise ValueError(f"kernel argument of unsupported C type {c_type!r}")


def parse_signature(text: str) -> list[tuple[str, str]]:
    """'const void* x,int64_t M,' -> [('const void*', 'x'), ('int64_t', 'M')]."""
    fields = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        c_type, _, name = item.rpartition(" ")
        fields.append((c_type.strip(), name))
    return fields


class Kernel:
    """One kernel of a loaded library, its arguments as the library declares them."""

    def __init__(self, lib: ctypes.CDLL, name: str) -> None:
        self.name = name
        self._fn = getattr(lib, name)
        self._fn.argtypes = [ctypes.c_char_p]
        self._fn.restype = ctypes.c_int64
        describe = getattr(lib, name + "_signature")
        describe.restype = ctypes.c_char_p
        self.fields = parse_signature(describe().decode())
        self.names = tuple(n for _, n in self.fields)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"{name}: argument names repeat: {self.names}")
        self.kinds = tuple(kind(t) for t, _ in self.fields)
        self.index = {n: i for i, n in enumerate(self.names)}
        self._f32 = tuple(i for i, k in enumerate(self.kinds) if k == "f32")
        # An eager call packs floats as floats, each padded to its 8-byte slot: the low half of a little-endian
        # int64 is then the fp32 bit pattern the C side reads (kernel.h), without converting in Python.
        self._eager = struct.Struct("=" + "".join("f4x" if k == "f32" else "q" for k in self.kinds))
        self.address = ctypes.cast(self._fn, ctypes.c_void_p).value or 0
        self._all = Partial(self, {})

    def __call__(self, **values: Any) -> int:
        return self._fn(self._eager.pack(*self._all.values(values)))

    def call(self, values: Mapping[str, Any]) -> int:
        """`kernel(**values)` without copying the mapping (the wrappers' hot path)."""
        return self._fn(self._eager.pack(*self._all.values(values)))

    def args(self, **values: Any) -> list[int]:
        """The int64 argument array for these values, in the order the C side reads them."""
        return self.as_array(self._all.values(values))

    def op(self, **values: Any) -> Op:
        """The call recorded for a decode graph."""
        return self.address, self.args(**values)

    def partial(self, **fixed: Any) -> Partial:
        """The arguments that stay the same from call to call (a bound weight's), checked once."""
        return Partial(self, fixed)

    def as_array(self, values: list) -> list[int]:
        out = list(values)
        for i in self._f32:
            out[i] = f32_bits(out[i])
        return out

    def check_names(self, given: Iterable[str], expected: Iterable[str]) -> None:
        given, expected = set(given), set(expected)
        if given != expected:
            missing, unknown = sorted(expected - given), sorted(given - expected)
            raise TypeError(f"{self.name}: missing arguments {missing}, unknown {unknown}")


class Partial:
    """A kernel with some arguments fixed (none, for the kernel's own calls); calls and records take the rest by
    name. Every eager call goes through `values`, so it is written for speed: one C-level lookup of the given
    names, then type identity checks, the isinstance and error paths only for what fails them."""

    def __init__(self, kernel: Kernel, fixed: Mapping[str, Any]) -> None:
        unknown = fixed.keys() - kernel.index.keys()
        if unknown:
            raise TypeError(f"{kernel.name}: unknown arguments {sorted(unknown)}")
        self.kernel = kernel
        self._keep = list(fixed.values())  # the tensors its pointers point into live as long as it does
        free = [n for n in kernel.names if n not in fixed]
        self._free = dict.fromkeys(free).keys()
        self._get = operator.itemgetter(*free) if len(free) > 1 else lambda d: tuple(d[n] for n in free)
        self._positions = tuple(kernel.index[n] for n in free)
        kinds = [kernel.kinds[kernel.index[n]] for n in free]
        self._ptr, self._int, self._f32 = (
            tuple(j for j, k in enumerate(kinds) if k == want) for want in KINDS
        )
        self._base = [None] * len(kernel.names)
        for name, value in fixed.items():
            i = kernel.index[name]
            self._base[i] = _checked(kernel, name, kernel.kinds[i], value)

    def values(self, given: Mapping[str, Any]) -> list:
        """Checked values in declaration order, pointers as addresses (floats still floats)."""
        if given.keys() != self._free:
            self.kernel.check_names(given, self._free)
        vals = list(self._get(given))
        for j in self._ptr:
            v = vals[j]
            if v.__class__ is not int:
                vals[j] = 0 if v is None else v.data_ptr() if hasattr(v, "data_ptr") else self._bad(j, v)
        for j in self._int:
            if vals[j].__class__ not in _INTS:
                self._bad(j, vals[j])
        for j in self._f32:
            if vals[j].__class__ not in _NUMBERS:
                self._bad(j, vals[j])
        if len(vals) == len(self._base):
            return vals
        out = self._base.copy()
        for j, i in enumerate(self._positions):
            out[i] = vals[j]
        return out

    def _bad(self, j: int, value: Any) -> Any:
        i = self._positions[j]
        return _checked(self.kernel, self.kernel.names[i], self.kernel.kinds[i], value)

    def args(self, **values: Any) -> list[int]:
        return self.kernel.as_array(self.values(values))

    def __call__(self, **values: Any) -> int:
        return self.kernel._fn(self.kernel._eager.pack(*self.values(values)))

    def call(self, values: Mapping[str, Any]) -> int:
        """`partial(**values)` without copying the mapping (the bound kernels' hot path)."""
        return self.kernel._fn(self.kernel._eager.pack(*self.values(values)))

    def op(self, **values: Any) -> Op:
        return self.kernel.address, self.args(**values)


def _checked(kernel: Kernel, name: str, kind: str, value: Any) -> Any:
    """One value of this kind, as its slot takes it (a pointer as its address), or TypeError naming it."""
    if kind == "ptr":
        if value is None:
            return 0
        if isinstance(value, int):
            return value
        if hasattr(value, "data_ptr"):
            return value.data_ptr()
    elif kind == "int" and isinstance(value, int):
        return value
    elif kind == "f32" and isinstance(value, (int, float)):
        return value
    what = {"ptr": "a pointer", "int": "an integer argument", "f32": "a float argument"}[kind]
    raise TypeError(f"{kernel.name}: {name} is {what}, got {type(value).__name__}")


class Kernels:
    """The kernels a library offers, by name (`kernels.cumulo_rms_norm`); the ctypes library as `lib`."""

    def __init__(self, lib: ctypes.CDLL, names: Iterable[str]) -> None:
        self.lib = lib
        self._kernels = {name: Kernel(lib, name) for name in names}

    def __getattr__(self, name: str) -> Kernel:
        try:
            return self.__dict__["_kernels"][name]
        except KeyError:
            raise AttributeError(f"no kernel {name!r} loaded from this library") from None

    def __iter__(self) -> Iterator[Kernel]:
        return iter(self._kernels.values())
