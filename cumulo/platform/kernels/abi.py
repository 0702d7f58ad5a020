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
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

Op = tuple[int, list[int]]  # (function address, its int64 arguments): one recorded call


def pointer(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    return value.data_ptr()  # a tensor


def integer(value: Any) -> int:
    if not isinstance(value, int):
        raise TypeError(f"an integer argument got {type(value).__name__}")
    return value


def f32_bits(value: Any) -> int:
    """An fp32 argument as the int64 the C side reads it from (its IEEE bit pattern)."""
    if not isinstance(value, (int, float)):
        raise TypeError(f"a float argument got {type(value).__name__}")
    return struct.unpack("=I", struct.pack("=f", value))[0]


def converter(c_type: str) -> Callable[[Any], int]:
    """How a value of this C type (as the signature spells it) becomes its int64 slot."""
    if c_type.endswith("*"):
        return pointer
    if c_type in ("int64_t", "int"):
        return integer
    if c_type == "float":
        return f32_bits
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
        self._convert = [converter(t) for t, _ in self.fields]
        self._index = {n: i for i, n in enumerate(self.names)}
        self._pack = struct.Struct(f"={len(self.names)}q")
        self.address = ctypes.cast(self._fn, ctypes.c_void_p).value or 0

    def _check(self, given: Iterable[str], expected: Iterable[str]) -> None:
        given, expected = set(given), set(expected)
        if given != expected:
            missing, unknown = sorted(expected - given), sorted(given - expected)
            raise TypeError(f"{self.name}: missing arguments {missing}, unknown {unknown}")

    def args(self, **values: Any) -> list[int]:
        """The int64 argument array for these values, in the order the C side reads them."""
        if values.keys() != self._index.keys():
            self._check(values, self.names)
        return [convert(values[n]) for n, convert in zip(self.names, self._convert, strict=True)]

    def __call__(self, **values: Any) -> int:
        return self._fn(self._pack.pack(*self.args(**values)))

    def call_array(self, args: list[int]) -> int:
        """Call with an argument array already built (by `args` or `Partial`)."""
        return self._fn(self._pack.pack(*args))

    def op(self, **values: Any) -> Op:
        """The call recorded for a decode graph."""
        return self.address, self.args(**values)

    def partial(self, **fixed: Any) -> Partial:
        """The arguments that stay the same from call to call (a bound weight's), converted once."""
        unknown = fixed.keys() - self._index.keys()
        if unknown:
            raise TypeError(f"{self.name}: unknown arguments {sorted(unknown)}")
        return Partial(self, fixed)


class Partial:
    """A kernel with some arguments fixed; calls and records take the rest by name."""

    def __init__(self, kernel: Kernel, fixed: Mapping[str, Any]) -> None:
        self.kernel = kernel
        self._keep = list(fixed.values())  # the tensors its pointers point into live as long as it does
        self._base = [0] * len(kernel.names)
        for name, value in fixed.items():
            i = kernel._index[name]
            self._base[i] = kernel._convert[i](value)
        self._free = {n: kernel._index[n] for n in kernel.names if n not in fixed}

    def args(self, **values: Any) -> list[int]:
        if values.keys() != self._free.keys():
            self.kernel._check(values, self._free)
        out = self._base.copy()
        convert = self.kernel._convert
        for name, value in values.items():
            i = self._free[name]
            out[i] = convert[i](value)
        return out

    def __call__(self, **values: Any) -> int:
        return self.kernel.call_array(self.args(**values))

    def op(self, **values: Any) -> Op:
        return self.kernel.address, self.args(**values)


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
