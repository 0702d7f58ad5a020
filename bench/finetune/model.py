"""The bench's base model: SmolLM2-135M as a Hugging Face directory, so Cumulo, transformers and PEFT read the
same fp32 weights. Written once (under bench/.anchors/models/) from the catalog's GGUF by transformers' own GGUF
reader (dequantized Q4_1), with its tokenizer and chat template."""

from __future__ import annotations

from pathlib import Path

from bench.common import ANCHORS_DIR, log, model_path

HF_DIR = ANCHORS_DIR / "models" / "smollm2-135m-hf"


def smollm2_dir() -> Path:
    if (HF_DIR / "config.json").exists():
        return HF_DIR
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    gguf = model_path()
    log(f"writing {HF_DIR} from {gguf.name} (transformers' GGUF reader) ...")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # a model read from GGUF refuses save_pretrained: copy its (dequantized) weights into a plain one
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    tmp = HF_DIR.with_name(HF_DIR.name + ".tmp")
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(HF_DIR)
    return HF_DIR
