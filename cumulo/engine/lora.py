"""Serving many LoRA adapters at once over one base model (multi-LoRA, as Punica and S-LoRA batch them).

The base matmul runs once over the whole step; each adapter's low-rank product then runs only over its own rows:
the engine orders a step's rows by adapter so each adapter's rows are contiguous, and every wrapped linear adds
`(x[rows] @ A^T) @ B^T` for each (adapter, rows) group. No weight is gathered per token. An adapter is kept as
one (A, B) pair per Cumulo linear: the fused q/k/v and gate/up linears stack their parts' A rows (`A [R, in]`)
and place each part's B in its slice of the output rows (`B [out, R]`, the scale folded in), so a fused linear
still costs two matmuls per group.

Adapters are read from PEFT directories (`adapter_config.json`, `adapter_model.safetensors`, and
`cumulo_adapter.json` with the base's seal when Cumulo trained it). The reader lives here, not in
`cumulo.finetune` (which sits above the engine), and `AdapterCache` keeps the most recently used ones in memory.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cumulo.contracts import AdapterRef
from cumulo.errors import InvalidModel, SealMismatch

CONFIG, WEIGHTS, CUMULO = "adapter_config.json", "adapter_model.safetensors", "cumulo_adapter.json"
# fused Cumulo linear -> its original projections in row order, as cumulo.models.registry fuses them
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
PART_OF = {part: fused for fused, parts in FUSED.items() for part in parts}
TARGETS = frozenset(PART_OF) | {"o_proj", "down_proj"}
_KEY = re.compile(r"^base_model\.model\.(.+)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


@dataclass(frozen=True)
class PeftAdapter:
    """A PEFT LoRA directory as read from disk, checked for what Cumulo can serve."""

    rank: int
    alpha: float
    scale: float  # alpha / r, or alpha / sqrt(r) for rsLoRA
    targets: tuple[str, ...]
    tensors: dict[str, torch.Tensor]
    base_model: str | None  # as cumulo_adapter.json or adapter_config.json names it
    base_seal: str | None  # only when Cumulo trained it (cumulo_adapter.json)


def read_peft(directory: Path | str) -> PeftAdapter:
    """Read and check a PEFT LoRA directory; anything Cumulo cannot serve is an `InvalidModel` naming it."""
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG).read_text())
        tensors = load_file(str(directory / WEIGHTS))
        extra = json.loads((directory / CUMULO).read_text()) if (directory / CUMULO).exists() else {}
    except (OSError, ValueError) as exc:
        raise InvalidModel(f"{directory} is not a PEFT LoRA adapter: {exc}".splitlines()[0]) from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise InvalidModel(f"{directory}: only LoRA adapters are supported, not {config.get('peft_type')!r}")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, int | float) or alpha <= 0:
        raise InvalidModel(f"{directory}: adapter_config.json needs a positive integer r and lora_alpha")
    if config.get("use_dora"):
        raise InvalidModel(f"{directory}: DoRA adapters are not supported")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise InvalidModel(f"{directory}: per-module rank_pattern/alpha_pattern are not supported")
    targets = config.get("target_modules") or []
    if isinstance(targets, str) or not set(targets) <= TARGETS:
        bad = targets if isinstance(targets, str) else sorted(set(targets) - TARGETS)
        raise InvalidModel(
            f"{directory}: target_modules {bad!r} not supported; Cumulo serves {sorted(TARGETS)}"
        )
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    base = extra.get("base_model") or config.get("base_model_name_or_path")
    return PeftAdapter(
        rank, float(alpha), scale, tuple(targets), tensors, base, extra.get("base_seal") or None
    )


@dataclass
class LoadedAdapter:
    """One adapter's weights per Cumulo linear (module name -> (A [R, in], B [out, R] * scale)), on the model's
    device and in its dtype. A is contiguous and B is the transposed view of a contiguous Bt [R, out]: the two
    row-major matrices a decode graph's LoRA op reads in place."""

    ref: AdapterRef
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    nbytes: int = 0
    _graph_rows: dict[tuple[str, ...], torch.Tensor] = field(default_factory=dict, repr=False)

    def graph_rows(self, names: tuple[str, ...]) -> torch.Tensor | None:
        """[len(names), 3] int64: per linear, (address of A, address of Bt, R), or zeros where this adapter has no
        product for it; what a decode graph's LoRA ops read for this adapter's rows (None if a tensor is not laid
        out as they read it). Kept with the adapter, so the addresses live as long as the tensors they name."""
        if names not in self._graph_rows:
            table, laid_out = [], True
            for name in names:
                ab = self.weights.get(name)
                if ab is None:
                    table.append((0, 0, 0))
                    continue
                a, b = ab
                laid_out &= a.is_contiguous() and b.t().is_contiguous() and a.device.type == "cpu"
                table.append((a.data_ptr(), b.data_ptr(), a.shape[0]))
            rows = torch.tensor(table, dtype=torch.int64).reshape(len(names), 3)
            self._graph_rows[names] = rows if laid_out else None
        return self._graph_rows[names]

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.weights.values()))[0].dtype

    @property
    def salt(self) -> bytes:
        """What the prefix cache chains its block hashes from: different adapters never share KV blocks."""
        return f"lora\0{self.ref.name}\0{self.ref.path}".encode()


def _linear(model: nn.Module, name: str) -> nn.Module | None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return module.base if isinstance(module, MultiLoRALinear) else module


def _part_slice(model: nn.Module, parent: str, part: str) -> tuple[str, int, int] | None:
    """(Cumulo linear, first output row, rows) of original projection `parent.part`; None if the model has none."""
    fused = PART_OF.get(part)
    if fused and _linear(model, f"{parent}.{fused}") is not None:
        linear = _linear(model, f"{parent}.{fused}")
        if fused == "qkv_proj":
            attn = model.get_submodule(parent)
            sizes = [attn.q_size, attn.kv_size, attn.kv_size]
        else:
            sizes = [linear.out_features // 2] * 2
        i = FUSED[fused].index(part)
        return f"{parent}.{fused}", sum(sizes[:i]), sizes[i]
    linear = _linear(model, f"{parent}.{part}")
    return None if linear is None else (f"{parent}.{part}", 0, linear.out_features)


def load_adapter(model: nn.Module, ref: AdapterRef, base_seal: str) -> LoadedAdapter:
    """Build an adapter's serving weights for `model`; refuse one trained on another base (`SealMismatch`) or
    whose tensors do not fit this model (`InvalidModel`)."""
    peft = read_peft(ref.path)
    for expected in (ref.base_seal, peft.base_seal):
        if expected and base_seal and expected != base_seal:
            raise SealMismatch(
                f"adapter {ref.name!r} was trained on base {expected}, not this one ({base_seal})"
            )
    param = next(model.parameters())
    parts: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # Cumulo linear -> part -> {"A", "B"}
    for key, tensor in peft.tensors.items():
        match = _KEY.match(key)
        if match is None or ".experts." in key:
            raise InvalidModel(f"adapter {ref.name!r}: tensor {key} is not one Cumulo can serve")
        parent, part, which = match[1], match[2], match[3]
        where = _part_slice(model, parent, part) if part in TARGETS else None
        if where is None:
            raise InvalidModel(f"adapter {ref.name!r}: {key} matches no linear of this model")
        parts.setdefault(where[0], {}).setdefault(part, {})[which] = tensor
    weights, nbytes = {}, 0
    for name, by_part in parts.items():
        linear, parent = _linear(model, name), name.rpartition(".")[0]
        placed = sorted((_part_slice(model, parent, part)[1:], part, ab) for part, ab in by_part.items())
        a_rows = []
        b = torch.zeros(linear.out_features, peft.rank * len(placed), dtype=torch.float32)  # [out, R]
        for i, ((start, size), part, ab) in enumerate(placed):
            a, b_part = ab.get("A"), ab.get("B")
            if a is None or b_part is None:
                raise InvalidModel(f"adapter {ref.name!r}: {parent}.{part} lacks lora_A or lora_B")
            if tuple(a.shape) != (peft.rank, linear.in_features) or tuple(b_part.shape) != (size, peft.rank):
                raise InvalidModel(
                    f"adapter {ref.name!r}: {parent}.{part} has A {tuple(a.shape)} and B {tuple(b_part.shape)}, "
                    f"expected ({peft.rank}, {linear.in_features}) and ({size}, {peft.rank})"
                )
            a_rows.append(a.float())
            b[start : start + size, i * peft.rank : (i + 1) * peft.rank] = b_part.float() * peft.scale
        a_cat = torch.cat(a_rows).to(param.device, param.dtype).contiguous()  # [R, in]
        b_cat = (
            b.t().to(param.device, param.dtype).contiguous().t()
        )  # [out, R], a view of a contiguous [R, out]
        weights[name] = (a_cat, b_cat)
        nbytes += a_cat.nbytes + b_cat.nbytes
    if not weights:
        raise InvalidModel(f"adapter {ref.name!r} has no LoRA tensors")
    return LoadedAdapter(ref, weights, nbytes)


@dataclass
class LoRABatch:
    """This step's row groups, shared by every wrapped linear: (adapter, first row, end row), rows contiguous
    per group. Empty: a base-only step, and the wrappers cost one attribute read.

    When the groups are back to back and all the same size (a decode step whose sequences are spread evenly over
    adapters, or equal prompt chunks), `uniform` is (first row, end row, groups, rows per group): every linear
    then runs all groups as two batched matmuls over its adapters' stacked weights instead of two per group."""

    groups: list[tuple[LoadedAdapter, int, int]] = field(default_factory=list)
    uniform: tuple[int, int, int, int] | None = None

    def set(self, groups: list[tuple[LoadedAdapter, int, int]]) -> None:
        self.groups = groups
        sizes = {end - start for _, start, end in groups}
        adjacent = all(a[2] == b[1] for a, b in zip(groups, groups[1:], strict=False))
        if len(groups) > 1 and len(sizes) == 1 and adjacent:
            self.uniform = (groups[0][1], groups[-1][2], len(groups), sizes.pop())
        else:
            self.uniform = None

    def clear(self) -> None:
        self.groups, self.uniform = [], None


class MultiLoRALinear(nn.Module):
    """A base linear plus, per group of rows, that group's adapter's low-rank update. The base's recorded
    form (`graph_op`) is kept, so base-only decode steps still replay as graphs."""

    def __init__(self, base: nn.Module, name: str, batch: LoRABatch) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.batch = batch
        self.in_features, self.out_features = base.in_features, base.out_features
        self.graph_op = getattr(base, "graph_op", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [T, out], once for every row
        batch = self.batch
        if batch.uniform is not None:
            start, end, g, n = batch.uniform
            stacked = self._stacked(batch.groups)
            if stacked is not None:
                a, b = stacked  # [G, in, R], [G, R, out]
                xs = x[start:end].reshape(g, n, -1)  # [G, n, in]
                y[start:end].view(g, n, -1).add_(torch.bmm(torch.bmm(xs, a), b))  # [G, n, R] -> [G, n, out]
            return y
        for adapter, start, end in batch.groups:
            ab = adapter.weights.get(self.name)
            if ab is not None:
                a, b = ab
                y[start:end].addmm_(x[start:end] @ a.t(), b.t())  # [n, in] -> [n, R] -> [n, out]
        return y

    def _stacked(self, groups: list) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The groups' adapters' weights for this linear stacked (ranks zero-padded to the largest), kept while
        the same adapters come in the same order (a run of decode steps); None if none of them touches it."""
        key = tuple(id(adapter) for adapter, _, _ in groups)
        cached = getattr(self, "_stack", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        pairs = [adapter.weights.get(self.name) for adapter, _, _ in groups]
        rank = max((p[0].shape[0] for p in pairs if p is not None), default=0)
        stacked = None
        if rank:
            ref = next(p for p in pairs if p is not None)[0]
            a = ref.new_zeros(len(pairs), self.in_features, rank)
            b = ref.new_zeros(len(pairs), rank, self.out_features)
            for i, p in enumerate(pairs):
                if p is not None:
                    a[i, :, : p[0].shape[0]] = p[0].t()
                    b[i, : p[1].shape[1]] = p[1].t()
            stacked = (a, b)
        self._stack = (key, stacked, [adapter for adapter, _, _ in groups])  # adapters held: ids stay theirs
        return stacked


def wrap_linears(model: nn.Module, batch: LoRABatch) -> int:
    """Put every decoder-layer linear an adapter can target behind a `MultiLoRALinear` (once); returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        child = name.rpartition(".")[2]
        if (
            ".layers." not in f".{name}"
            or ".experts." in name
            or (child not in TARGETS and child not in FUSED)
            or isinstance(module, MultiLoRALinear)
            or not hasattr(module, "in_features")
        ):
            continue
        parent = model.get_submodule(name.rpartition(".")[0])
        setattr(parent, child, MultiLoRALinear(module, name, batch))
        count += 1
    return count


class AdapterCache:
    """The most recently used adapters in memory, at most `capacity`; others are read from disk on demand.
    Evicting only drops the cache's reference: a running sequence keeps the weights it started with."""

    def __init__(self, model: nn.Module, base_seal: str, capacity: int) -> None:
        if capacity < 1:
            raise InvalidModel("the adapter cache needs room for at least one adapter")
        self.model, self.base_seal, self.capacity = model, base_seal, capacity
        self._entries: OrderedDict[AdapterRef, LoadedAdapter] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # reads from disk, for tests and metrics

    def get(self, ref: AdapterRef) -> LoadedAdapter:
        with self._lock:
            hit = self._entries.get(ref)
            if hit is not None:
                self._entries.move_to_end(ref)
                return hit
        loaded = load_adapter(self.model, ref, self.base_seal)  # outside the lock: disk and copies
        with self._lock:
            self.loads += 1
            self._entries[ref] = loaded
            self._entries.move_to_end(ref)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return loaded

    def __contains__(self, ref: AdapterRef) -> bool:
        return ref in self._entries
