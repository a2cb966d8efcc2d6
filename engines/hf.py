"""A local Hugging Face causal LM as a stage's model (``model.family: hf``).

Design decisions:
- Read from a local directory only (``model.init_from``); nothing is
  downloaded. transformers is imported only when a model is built, so the
  plan, the optimizer and the CLI stay torch- and transformers-free.
- The shape the optimizer prices is read from the directory's
  ``config.json`` (``hf_shape``), not guessed from ``model.scale``: width,
  depth, heads, key/value heads (GQA), the MLP's width, the vocabulary and
  the rotary base of a Llama-style decoder (llama, mistral, qwen2, qwen3 and
  the other model types listed in ``LLAMA_STYLE``: pre-norm blocks, SwiGLU
  MLP, rotary attention — the blocks muse's own decoder has, so its memory
  and throughput models price them as they are). Another model type is
  refused in one line rather than priced as something it is not.
- Weights are fp32 master weights on the stage's device; the executor's
  autocast runs the mixed precision, as for muse's own decoder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engines.options import read_from

LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite", "phi3")


def hf_config(directory: str) -> dict[str, Any]:
    """The model's ``config.json``; ``ValueError`` in one line when there is none to read."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise ValueError(f"model.init_from {directory!r} is not a Hugging Face model directory: no such "
                         f"folder{read_from(path)}")
    config = path / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"model.init_from {directory!r} is not a Hugging Face model directory: it has no "
                         "config.json") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{config}: can't be read as JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{config}: not a JSON object")
    return data


def hf_shape(directory: str) -> dict[str, Any]:
    """The decoder shape of a Llama-style model's ``config.json``, as ``ModelConfig`` fields
    (vocab_size, n_layers, d_model, n_heads, n_kv_heads, d_ff, tied_embeddings, rope_theta, norm_eps)."""
    data = hf_config(directory)
    kind = data.get("model_type")
    if kind not in LLAMA_STYLE:
        raise ValueError(f"model.init_from {directory!r} is a {kind!r} model; muse prices and trains "
                         f"Llama-style decoders: {', '.join(LLAMA_STYLE)}")
    try:
        heads = int(data["num_attention_heads"])
        shape = {"vocab_size": int(data["vocab_size"]), "n_layers": int(data["num_hidden_layers"]),
                 "d_model": int(data["hidden_size"]), "n_heads": heads,
                 "n_kv_heads": int(data.get("num_key_value_heads") or heads),
                 "d_ff": int(data["intermediate_size"])}
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"model.init_from {directory!r}: config.json lacks a usable {exc} field") from None
    # transformers' own default where config.json is silent: Gemma ties its tables, Llama-style models don't
    shape["tied_embeddings"] = bool(data.get("tie_word_embeddings", kind in ("gemma", "gemma2")))
    shape["rope_theta"] = float(data.get("rope_theta") or 10000.0)
    shape["norm_eps"] = float(data.get("rms_norm_eps") or 1e-6)
    return shape


def has_bitsandbytes() -> bool:
    """Whether bitsandbytes (the ``qlora`` extra) is installed here; not imported to tell."""
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def quantization_unavailable(cuda: bool) -> str | None:
    """Why a 4-bit base can't be loaded here, or None when it can."""
    if not cuda:
        return "a 4-bit (QLoRA) base needs a CUDA GPU (bitsandbytes' 4-bit kernels run on CUDA)"
    if not has_bitsandbytes():
        return "a 4-bit (QLoRA) base needs bitsandbytes: pip install -e '.[qlora]'"
    return None


def load_hf(directory: str, device: str, quantize: str = "none") -> Any:
    """A causal LM from a local directory on ``device``; nothing is downloaded.

    ``quantize: none``: fp32 master weights (the executor's autocast does the mixed
    precision). ``4bit``: QLoRA's base (Dettmers et al. 2023) — every linear layer
    of the blocks in NF4 with double quantisation and bf16 compute, the rest
    (embeddings, norms, the head) in bf16; nothing of it trains, adapters go on top."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers comes with peft
        raise ValueError("a Hugging Face model needs the 'transformers' package: pip install -e '.[hf]'") from None
    hf_logging.disable_progress_bar()  # muse's own progress bar is on screen
    hf_config(directory)  # a missing folder or config.json in one line, before transformers guesses a hub name
    extra: dict[str, Any] = {}
    if quantize == "4bit":
        why = quantization_unavailable(str(device).startswith("cuda"))
        if why is not None:
            raise ValueError(why)
        from transformers import BitsAndBytesConfig

        extra = {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16), "dtype": torch.bfloat16, "device_map": {"": str(device)}}
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, **extra)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model.init_from {directory!r} is not a Hugging Face model directory: "
                         f"{str(exc).splitlines()[0]}") from None
    if quantize == "4bit":
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    return model.float().to(device)  # fp32 master weights; the executor's autocast does mixed precision


def enable_checkpointing(model: Any) -> None:
    """Activation checkpointing on a Hugging Face model's blocks (non-reentrant, so LoRA's
    frozen base still passes gradients through); training reads no KV cache, so the
    config says so once instead of transformers warning at every step. Sampling asks
    for its cache explicitly (``engines/grpo/policy``)."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers 5's name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
