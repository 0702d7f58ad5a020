"""Write and read packed checkpoints: safetensors plus `quantization_config` in config.json.

Block FP8 keeps DeepSeek-V3's layout exactly (inference/README_WEIGHTS.md) so other tools can read it:
`X.weight` float8_e4m3fn [N, K] and `X.weight_scale_inv` float32 [ceil(N/128), ceil(K/128)], dequantized as
weight x scale_inv per 128 x 128 tile, with quantization_config {quant_method: fp8, fmt: e4m3,
activation_scheme: dynamic, weight_block_size: [128, 128]} and, for power-of-two scales, scale_fmt: ue8m0
(DeepSeek-V3.1). The reader accepts DeepSeek's own checkpoints the same way.

Other formats use Cumulo's layout, quant_method "cumulo": `X.weight` holds the codes (float8_e4m3fn for the
E4M3 formats, uint8 otherwise, FP4/FP6 bit-packed), `X.weight_scale` the scales (fp32, or uint8 E8M0 for MX,
float8_e4m3fn for NVFP4) and NVFP4's fp32 tensor scale is `X.weight_scale_2` (the names NVIDIA ModelOpt uses).
The unpacked shape of every packed weight is in the safetensors metadata (`X.weight.shape` = "N,K").
Tensors that are not `PackedWeight`s (embeddings, norms, kept layers) are stored as given.
"""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from cumulo.errors import FormatError, InvalidModel
from cumulo.formats.packed import PackedWeight
from cumulo.formats.schemes import get_scheme

DEEPSEEK_FORMATS = {"fp8-block": None, "ue8m0-fp8": "ue8m0"}  # format -> scale_fmt
SHARD_BYTES = 4 * 1024**3  # Hugging Face's habit: shards of a few GB, with an index


def quantization_config(format: str, kept: list[str] | None = None) -> dict[str, Any]:
    scheme = get_scheme(format)
    if scheme.name in DEEPSEEK_FORMATS:
        cfg: dict[str, Any] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        }
        if DEEPSEEK_FORMATS[scheme.name]:
            cfg["scale_fmt"] = DEEPSEEK_FORMATS[scheme.name]
    else:
        cfg = {
            "quant_method": "cumulo",
            "format": scheme.name,
            "element": scheme.element.name if scheme.element else "bf16",
            "block": list(scheme.block),
            "scale": scheme.scale,
        }
    if kept:
        cfg["modules_to_not_convert"] = kept
    return cfg


def _packed_tensors(key: str, w: PackedWeight) -> dict[str, torch.Tensor]:
    scheme = w.scheme
    base = key.removesuffix(".weight")
    codes = w.codes
    if scheme.element is None:
        return {key: codes}
    if scheme.element.name == "e4m3fn":
        codes = codes.view(torch.float8_e4m3fn)
    out = {key: codes.contiguous()}
    assert w.scales is not None
    if scheme.name in DEEPSEEK_FORMATS:
        out[f"{base}.weight_scale_inv"] = w.scales.to(torch.float32).contiguous()
    elif scheme.scale == "nvfp4":
        assert w.tensor_scale is not None
        out[f"{base}.weight_scale"] = w.scales.view(torch.float8_e4m3fn).contiguous()
        out[f"{base}.weight_scale_2"] = w.tensor_scale.reshape(()).contiguous()
    else:
        out[f"{base}.weight_scale"] = w.scales.contiguous()
    return out


def save_packed_state_dict(
    state: Mapping[str, torch.Tensor | PackedWeight],
    directory: str | Path,
    format: str,
    *,
    config: Mapping[str, Any] | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Write `state` (HF tensor names -> tensors or PackedWeights) as safetensors, and config.json with
    `quantization_config` merged into `config` (an existing config.json there is kept and updated)."""
    from safetensors.torch import save_file

    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    get_scheme(format)  # unknown names fail before anything is written
    tensors: dict[str, torch.Tensor] = {}
    metadata = {"format": "pt", "cumulo.format": format}
    kept = []
    for key, value in state.items():
        if isinstance(value, PackedWeight) and value.format == "bf16":
            value = value.codes  # a 16-bit weight is a plain tensor in any checkpoint
        if isinstance(value, PackedWeight):
            if value.block_override is not None:
                raise FormatError(
                    f"{key}: a joined weight (concat_rows) has no checkpoint layout; save the parts"
                )
            if value.format != format:
                raise FormatError(f"{key}: packed as {value.format}, but the checkpoint is {format}")
            tensors.update(_packed_tensors(key, value.to("cpu")))
            metadata[f"{key}.shape"] = f"{value.shape[0]},{value.shape[1]}"
        else:
            tensors[key] = value.detach().to("cpu").contiguous()
            if value.dim() == 2 and key.endswith(".weight"):
                kept.append(key.removesuffix(".weight"))
    shards = _shard(tensors, shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out_dir / name), metadata=metadata)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg_path = out_dir / "config.json"
    cfg = dict(config) if config is not None else {}
    if config is None and cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
    if format == "bf16":
        cfg.pop("quantization_config", None)
        cfg["torch_dtype"] = "bfloat16"
    else:
        cfg["quantization_config"] = quantization_config(format, kept)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return out_dir


def _shard(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def iter_safetensors(
    path: str | Path, wanted: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each tensor of one safetensors file (each `wanted` name), in file order, read into
    memory it owns.

    safetensors' own loaders hand out views of one mapping of the whole file: any tensor kept alive keeps
    every page read through it resident, including those of tensors the caller has since copied and dropped
    (q/k/v and gate/up once joined, anything cast to another dtype). Reading each tensor into its own buffer
    (through the page cache, which is not this process's memory) lets a dropped tensor free its bytes.
    """
    path = Path(path)
    try:
        with open(path, "rb", buffering=0) as handle:
            header, data_start = _safetensors_header(path, handle)
            entries = sorted(
                ((k, v) for k, v in header.items() if k != "__metadata__" and (wanted is None or wanted(k))),
                key=lambda kv: kv[1]["data_offsets"],
            )
            for key, info in entries:
                dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
                if dtype is None:
                    raise InvalidModel(
                        f"{path.name}: tensor {key} has unsupported dtype {info.get('dtype')!r}"
                    )
                begin, end = info["data_offsets"]
                tensor = torch.empty(info["shape"], dtype=dtype)
                nbytes = tensor.numel() * tensor.element_size()
                if end - begin != nbytes:
                    raise InvalidModel(
                        f"{path.name}: tensor {key} has offsets {begin}..{end} for {nbytes} bytes"
                    )
                if nbytes:
                    handle.seek(data_start + begin)
                    view = memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")
                    done = 0
                    while done < nbytes:
                        got = handle.readinto(view[done:])
                        if not got:
                            raise InvalidModel(f"{path.name}: truncated (tensor {key})")
                        done += got
                yield key, tensor
    except OSError as exc:
        raise InvalidModel(f"{path.name}: not a readable safetensors file ({exc})") from exc


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` strings of one safetensors file (no tensor data is read)."""
    path = Path(path)
    try:
        with open(path, "rb", buffering=0) as handle:
            header, _ = _safetensors_header(path, handle)
    except OSError as exc:
        raise InvalidModel(f"{path.name}: not a readable safetensors file ({exc})") from exc
    return dict(header.get("__metadata__") or {})


def _safetensors_header(path: Path, handle: Any) -> tuple[dict[str, Any], int]:
    """(header JSON, offset of the data) of an open safetensors file: u64 little-endian size, then JSON."""
    size = os.fstat(handle.fileno()).st_size
    prefix = handle.read(8)
    length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if length < 2 or 8 + length > size:
        raise InvalidModel(f"{path.name}: not a readable safetensors file (bad header size)")
    data_start = 8 + length
    try:
        header = json.loads(handle.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            shape = info["shape"]
            if not all(isinstance(v, int) and v >= 0 for v in (begin, end, *shape)) or begin > end:
                raise ValueError(f"tensor {key} has a bad shape or data_offsets")
            if end > size - data_start:
                raise ValueError(f"truncated: tensor {key} ends past the end of the file")
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidModel(f"{path.name}: not a readable safetensors file ({exc})") from exc
    return header, data_start


def _read_all(
    directory: Path, wanted: Callable[[str], bool] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [directory / n for n in names]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise InvalidModel(f"{directory}: no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for path in files:
        metadata.update(safetensors_metadata(path))
        tensors.update(iter_safetensors(path, wanted=wanted))
    return tensors, metadata


def format_of(qcfg: Mapping[str, Any] | None) -> str:
    """The Cumulo format name a quantization_config describes ("bf16" when there is none)."""
    if not qcfg:
        return "bf16"
    method = qcfg.get("quant_method")
    if method == "fp8":
        if qcfg.get("weight_block_size") not in ([128, 128], (128, 128)) or qcfg.get("fmt", "e4m3") != "e4m3":
            raise FormatError(f"unsupported fp8 quantization_config {dict(qcfg)}: only e4m3 128x128 blocks")
        return "ue8m0-fp8" if qcfg.get("scale_fmt") == "ue8m0" else "fp8-block"
    if method == "cumulo":
        return get_scheme(str(qcfg.get("format"))).name
    raise FormatError(f"unsupported quantization method {method!r}")


def _powers_of_two(raw: Mapping[str, torch.Tensor]) -> bool:
    """Whether every `weight_scale_inv` holds positive powers of two only (what the ue8m0 kernels assume)."""
    for key, scales in raw.items():
        if key.endswith(".weight_scale_inv"):
            mantissa, _ = torch.frexp(scales.float())
            if not bool((mantissa == 0.5).all()):
                return False
    return True


def load_packed_state_dict(
    directory: str | Path, wanted: Callable[[str], bool] | None = None
) -> tuple[dict[str, torch.Tensor | PackedWeight], str]:
    """Read a checkpoint written by `save_packed_state_dict` (or a DeepSeek block-FP8 one); `wanted`: only the
    tensors whose stored names it accepts (a packed weight's scales are named after it, `X.weight_scale...`, so a
    filter on module prefixes keeps both).

    Returns (HF name -> plain tensor or PackedWeight, format name)."""
    path = Path(directory)
    cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    format = format_of(cfg.get("quantization_config"))
    raw, metadata = _read_all(path, wanted)
    if format == "ue8m0-fp8" and not _powers_of_two(raw):
        format = "fp8-block"  # scale_fmt says ue8m0 but the scales are not: keep them exact as fp32 scales
    out: dict[str, torch.Tensor | PackedWeight] = {}
    scale_keys = {k for k in raw if k.endswith((".weight_scale_inv", ".weight_scale", ".weight_scale_2"))}
    for key, tensor in raw.items():
        if key in scale_keys:
            continue
        base = key.removesuffix(".weight")
        if format in DEEPSEEK_FORMATS and f"{base}.weight_scale_inv" in raw:
            codes = tensor.view(torch.uint8) if tensor.element_size() == 1 else tensor
            out[key] = PackedWeight(
                format,
                codes,
                raw[f"{base}.weight_scale_inv"].to(torch.float32),
                (tensor.shape[0], tensor.shape[1]),
            )
        elif format not in DEEPSEEK_FORMATS and f"{base}.weight_scale" in raw:
            shape_text = metadata.get(f"{key}.shape")
            shape = tuple(int(v) for v in shape_text.split(",")) if shape_text else tuple(tensor.shape)
            scales = raw[f"{base}.weight_scale"]
            scales = scales.view(torch.uint8) if scales.dtype == torch.float8_e4m3fn else scales
            tensor_scale = raw.get(f"{base}.weight_scale_2")
            out[key] = PackedWeight(
                format, tensor.view(torch.uint8), scales, (shape[0], shape[1]), tensor_scale
            )
        else:
            out[key] = tensor
    return out, format
