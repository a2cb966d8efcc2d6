"""A trained model as a Hugging Face model directory (``muse export``).

``to_hf(model, tokenizer, out_dir)`` writes muse's ``DecoderLM`` as a
``LlamaForCausalLM`` folder (``config.json``, ``model.safetensors``,
``generation_config.json`` and the tokenizer) that
``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads without
muse installed and that computes the same logits; ``hf_to_hf`` saves a model
that already is a Hugging Face one (its LoRA adapters merged first);
``export_trained`` picks between them for what ``muse_plan.trained`` opened.

Design decisions:
- **Llama, and only the standard residual.** muse's decoder with the
  standard residual is Llama's block exactly: pre-norm RMSNorm, rotary
  attention with grouped key/value heads, SwiGLU MLP (gate/up/down), no
  biases, a final RMSNorm and an LM head. So the export is a stock
  ``LlamaForCausalLM`` checkpoint, which every tool that reads Llama
  checkpoints reads. The other residual modes (hc, mhc, mgt
  carry several residual streams mixed by learned matrices; ddl gates its
  residual update) are refused in one line (``PlanError``): a Llama block has
  one residual stream, ``x + f(x)``, and no field to say otherwise. The
  alternative, a ``trust_remote_code`` modeling file shipped in the folder,
  was judged and not chosen: it runs code from the folder on load, which many
  users and serving stacks refuse, and it would be a second copy of the
  decoder to keep in step with ``engines/architecture`` forever.
- **Rotary layout.** muse rotates interleaved pairs (x[2i], x[2i+1]) of each
  head by angle t·θ_i; Llama's ``rotate_half`` rotates (x[i], x[i+hd/2]) by
  the same θ_i. Reordering each head's query and key dimensions by
  ``rope_permutation`` (new j < hd/2 takes old 2j, new hd/2 + j takes old
  2j+1) turns one into the other: a muse pair becomes a Llama pair, rotated
  by the same angle, and q·k is unchanged because queries and keys are
  reordered alike. So the rows of wq and wk are permuted per head (wv, wo are
  untouched); with GQA wk has ``n_kv_heads`` heads.
- **Rotary scaling.** muse's ``rope_scale`` s turns position t by the angle of
  t/s (position interpolation); Llama's ``linear`` rope type divides the
  inverse frequencies by ``factor``: the same angles, so s is written as
  ``{"rope_type": "linear", "factor": s}`` (none when s = 1).
- **config.json is written as JSON, not through transformers.** It carries
  both spellings of the rotary settings: ``rope_theta`` / ``rope_scaling``
  (transformers 4) and ``rope_parameters`` (transformers 5), so the folder
  is meant to load under either (the tests run transformers 5, where either
  spelling alone gives the same logits); exporting a muse model needs no
  transformers.
- **A Hugging Face model** is saved with its own ``save_pretrained``
  (safetensors), a peft model merged first (``merge_and_unload``, which
  changes the model passed in), its tokenizer copied beside it.
- **Tied or untied.** muse's decoder ties its head to the embedding; the
  export writes one matrix and ``tie_word_embeddings: true`` then, or both
  matrices and ``false`` when the head is a tensor of its own.
- **LoRA.** A model whose linears are peft LoRA layers is exported merged
  (W = W0 + the adapters' ΔW, in fp32), as a checkpoint loaded into a plain
  model through ``executor.weights.load_into`` would be. Weights keep the
  model's dtype (the embedding's).
- **Anything Llama can't express is refused in one line**: a bias, norms
  with different eps, a non-standard residual.
- **Tokenizer.** muse's byte tokenizer becomes a ``tokenizer.json`` built with
  the ``tokenizers`` library: a byte-level pre-tokenizer (each UTF-8 byte
  shown as one character, GPT-2's byte-to-unicode scheme) and a vocabulary in
  which byte b's character has id b, no merges, so every byte is its own
  token with muse's id; BOS, EOS, PAD, SEP are special tokens
  ``<|bos|>`` … ``<|sep|>`` at muse's ids 256…259. No post-processor adds
  them: like muse's ``encode``, ``tokenizer.encode(text)`` gives the bytes
  only. One difference is unavoidable: a text containing a special token's
  literal name (``<|eos|>``) is encoded as that special token by Hugging
  Face, as bytes by muse. A Hugging Face tokenizer directory is copied
  (its tokenizer files only).
- **The output folder** is built in a temporary sibling and moved into place
  once complete, so a failure leaves no half-written model. A non-empty
  folder is refused unless ``force``; then the export's files (and stale
  weight and tokenizer files that would shadow them) are replaced and the
  folder's other files are left.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

from engines.architecture.model import DecoderLM, RMSNorm
from engines.architecture.modes import RESIDUAL_MODES
from engines.data.tokenizer import ByteTokenizer, HFTokenizer
from muse_plan.errors import Conflict, PlanError

ARCHITECTURE = "LlamaForCausalLM"
BYTE_SPECIALS = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>", "sep": "<|sep|>"}
# what a model folder's loader reads: replaced (or removed when stale) by an export with force
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
               "pytorch_model*.bin", "*.bin.index.json", "adapter_config.json", "adapter_model.*")
TOKENIZER_FILES = ("tokenizer*.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "sentencepiece*.model",
                   "*.tiktoken", "chat_template.json", "chat_template.jinja")


# ---- the weights ---------------------------------------------------------------------------


def rope_permutation(head_dim: int) -> list[int]:
    """Llama's dimension j of a head takes muse's dimension ``perm[j]``: muse rotates pairs
    (2i, 2i+1), Llama pairs (i, i + head_dim/2), each by the angle of frequency i."""
    half = head_dim // 2
    return [2 * j for j in range(half)] + [2 * j + 1 for j in range(half)]


def _permute_heads(weight: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """The rows of a q or k projection (heads·head_dim, d_in), reordered within each head."""
    perm = torch.tensor(rope_permutation(head_dim), device=weight.device)
    d_in = weight.shape[1]
    return weight.reshape(heads, head_dim, d_in)[:, perm].reshape(heads * head_dim, d_in)


def _decoder(model: torch.nn.Module) -> DecoderLM:
    """The ``DecoderLM`` itself, also when wrapped in a peft ``PeftModel``."""
    inner = model
    while not isinstance(inner, DecoderLM):
        unwrap = getattr(inner, "get_base_model", None)
        if unwrap is None:
            raise TypeError(f"to_hf exports muse's DecoderLM, got {type(model).__name__}")
        nested = unwrap()
        if nested is inner:
            raise TypeError(f"to_hf exports muse's DecoderLM, got {type(model).__name__}")
        inner = nested
    return inner


def check_exportable(model: torch.nn.Module) -> None:
    """``PlanError`` (one line) when the model has something a Llama checkpoint can't say."""
    decoder = _decoder(model)
    c = decoder.config
    if c.residual != "standard":
        what = (f"carries {c.streams} residual streams mixed by learned connections"
                if RESIDUAL_MODES[c.residual].multi_stream else "gates its update with learned weights")
        raise PlanError(f"export supports the standard residual only: this model's {c.residual!r} residual {what}, "
                        "and a Llama block has one residual stream, updated as x + f(x)")
    for name, module in decoder.named_modules():
        base = getattr(module, "base_layer", module)
        if isinstance(base, torch.nn.Linear) and base.bias is not None:
            raise PlanError(f"export: {name} has a bias, which the Llama export (bias-free, as muse's "
                            "decoder) does not map")
    eps = {m.eps for m in decoder.modules() if isinstance(m, RMSNorm)}
    if len(eps) > 1:
        raise PlanError(f"export: the model's norms use different eps ({', '.join(map(str, sorted(eps)))}); "
                        "Llama has one rms_norm_eps")


def _weight(module: torch.nn.Module) -> torch.Tensor:
    """A linear's effective weight: a peft LoRA layer's base plus its active adapters' update."""
    base = getattr(module, "base_layer", None)
    if base is None:
        return module.weight.detach()
    weight = base.weight.detach()
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return weight
    merged = weight.float()
    for name in module.active_adapters:
        if name in module.lora_A:
            merged = merged + module.get_delta_weight(name).detach().float()
    return merged.to(weight.dtype)


def _is_tied(decoder: DecoderLM) -> bool:
    head, emb = decoder.lm_head.weight, decoder.tok_emb.weight
    return head is emb or (head.data_ptr() == emb.data_ptr() and head.shape == emb.shape)


def llama_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The decoder's weights under Llama's names, q and k rows reordered for rotate_half."""
    decoder = _decoder(model)
    c = decoder.config
    dtype = decoder.tok_emb.weight.dtype
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": decoder.tok_emb.weight.detach()}
    for i, block in enumerate(decoder.blocks):
        p = f"model.layers.{i}."
        attn, mlp = block.attn, block.mlp
        out[p + "input_layernorm.weight"] = block.attn_norm.weight.detach()
        out[p + "self_attn.q_proj.weight"] = _permute_heads(_weight(attn.wq), c.n_heads, c.head_dim)
        out[p + "self_attn.k_proj.weight"] = _permute_heads(_weight(attn.wk), c.kv_heads, c.head_dim)
        out[p + "self_attn.v_proj.weight"] = _weight(attn.wv)
        out[p + "self_attn.o_proj.weight"] = _weight(attn.wo)
        out[p + "post_attention_layernorm.weight"] = block.mlp_norm.weight.detach()
        out[p + "mlp.gate_proj.weight"] = _weight(mlp.w_gate)
        out[p + "mlp.up_proj.weight"] = _weight(mlp.w_up)
        out[p + "mlp.down_proj.weight"] = _weight(mlp.w_down)
    out["model.norm.weight"] = decoder.norm.weight.detach()
    if not _is_tied(decoder):
        out["lm_head.weight"] = _weight(decoder.lm_head)
    # safetensors stores each tensor once, contiguous, on the CPU
    return {k: v.to(device="cpu", dtype=dtype).contiguous().clone() for k, v in out.items()}


def llama_config(model: torch.nn.Module, ids: dict[str, int | None]) -> dict[str, Any]:
    """``config.json`` of the Llama equivalent of ``model`` (``ids``: bos, eos, pad token ids)."""
    decoder = _decoder(model)
    c = decoder.config
    dtype = str(decoder.tok_emb.weight.dtype).removeprefix("torch.")
    scaling = None if c.rope_scale == 1.0 else {"rope_type": "linear", "type": "linear", "factor": c.rope_scale}
    rope = {"rope_type": "default", "rope_theta": c.rope_theta} if scaling is None else \
        {"rope_type": "linear", "factor": c.rope_scale, "rope_theta": c.rope_theta}
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.ffn_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.seq_len,
        "rms_norm_eps": decoder.norm.eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": rope,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": _is_tied(decoder),
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": ids.get("bos"),
        "eos_token_id": ids.get("eos"),
        "pad_token_id": ids.get("pad"),
        "torch_dtype": dtype,
        "dtype": dtype,
    }


# ---- the tokenizer -------------------------------------------------------------------------


def byte_chars() -> list[str]:
    """The character that stands for each byte 0..255 in a byte-level tokenizer: a printable
    Latin-1 byte stands for itself; the others (controls, space, 0x7f-0xa0, 0xad) take the
    code points from 256 up, in byte order. (GPT-2's scheme, which ``tokenizers``' ByteLevel
    pre-tokenizer applies.)"""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_byte_tokenizer(tokenizer: ByteTokenizer, out_dir: Path, max_length: int) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` of muse's
    byte tokenizer: byte b is token b, the specials at muse's ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    chars = byte_chars()
    if set(chars) != set(pre_tokenizers.ByteLevel.alphabet()):  # the scheme this module writes down
        raise RuntimeError("the byte-level alphabet of this 'tokenizers' version is not GPT-2's")
    fast = Tokenizer(models.BPE(vocab={ch: b for b, ch in enumerate(chars)}, merges=[]))
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    fast.decoder = decoders.ByteLevel()
    wanted = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id,
              "sep": getattr(tokenizer, "sep_id", None)}
    specials = sorted((i, BYTE_SPECIALS[k]) for k, i in wanted.items() if i is not None)
    if [i for i, _ in specials] != list(range(256, 256 + len(specials))):
        raise RuntimeError(f"byte tokenizer specials {specials} don't follow the 256 bytes")
    fast.add_special_tokens([AddedToken(name, special=True, normalized=False) for _, name in specials])
    for i, name in specials:
        if fast.token_to_id(name) != i:
            raise RuntimeError(f"{name} got id {fast.token_to_id(name)}, not muse's {i}")
    fast.save(str(out_dir / "tokenizer.json"))
    named = {f"{k}_token": BYTE_SPECIALS[k] for k in ("bos", "eos", "pad") if wanted[k] is not None}
    extra = [BYTE_SPECIALS["sep"]] if wanted["sep"] is not None else []
    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", **named,
        "additional_special_tokens": extra,
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": max_length,
    })
    _write_json(out_dir / "special_tokens_map.json", {**named, "additional_special_tokens": extra})


def _is_tokenizer_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in TOKENIZER_FILES)


def copy_hf_tokenizer(directory: Path, out_dir: Path) -> list[str]:
    """A Hugging Face tokenizer directory's tokenizer files (not its model files) into out_dir."""
    copied = []
    for path in sorted(Path(directory).iterdir()):
        if path.is_file() and _is_tokenizer_file(path.name):
            shutil.copy2(path, out_dir / path.name)
            copied.append(path.name)
    if not copied:
        raise PlanError(f"export: tokenizer directory '{directory}' holds no tokenizer files to copy")
    return copied


def token_ids(tokenizer: Any) -> dict[str, int | None]:
    """bos / eos / pad ids of a muse tokenizer or a transformers one."""
    if hasattr(tokenizer, "eos_id"):
        return {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    return {"bos": getattr(tokenizer, "bos_token_id", None), "eos": getattr(tokenizer, "eos_token_id", None),
            "pad": getattr(tokenizer, "pad_token_id", None)}


def save_tokenizer(tokenizer: Any, out_dir: Path, max_length: int) -> None:
    """muse's byte tokenizer built as a fast tokenizer; a Hugging Face directory copied; a
    transformers tokenizer object saved with its own save_pretrained."""
    if tokenizer is None:
        return
    if isinstance(tokenizer, ByteTokenizer):
        save_byte_tokenizer(tokenizer, out_dir, max_length)
    elif isinstance(tokenizer, HFTokenizer):
        copy_hf_tokenizer(tokenizer.directory, out_dir)
    elif hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out_dir))
    else:
        raise PlanError(f"export: don't know how to save a {type(tokenizer).__name__} tokenizer")


def _generation_config(ids: dict[str, int | None]) -> dict[str, Any]:
    return {"bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos"), "pad_token_id": ids.get("pad")}


# ---- the folder ----------------------------------------------------------------------------


def check_output(out_dir: Path, force: bool) -> Path:
    """The output folder, refused (``Conflict``, one line) when it is a file, or a non-empty
    folder without ``force``."""
    from engines.data.train_tokenizer import check_output as check_folder

    try:
        return check_folder(out_dir, force, "the model and tokenizer files")
    except FileExistsError as exc:
        raise Conflict(str(exc)) from None


@contextlib.contextmanager
def _output(out_dir: Path, force: bool) -> Iterator[Path]:
    """A temporary sibling of ``out_dir`` to write into, moved into place on success."""
    out_dir = check_output(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    try:
        yield tmp
        if not out_dir.exists():
            os.replace(tmp, out_dir)
            return
        for old in out_dir.iterdir():  # stale weights or tokenizer files would shadow the new ones
            if old.is_file() and (_is_tokenizer_file(old.name)
                                  or any(fnmatch.fnmatch(old.name, p) for p in MODEL_FILES)):
                old.unlink()
        for new in tmp.iterdir():
            os.replace(new, out_dir / new.name)
        tmp.rmdir()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def to_hf(model: torch.nn.Module, tokenizer: Any, out_dir: Path, *, force: bool = False) -> Path:
    """Write muse's standard-residual ``DecoderLM`` (plain, or with peft LoRA layers, which are
    merged) and its tokenizer as a ``LlamaForCausalLM`` folder; returns the folder."""
    check_exportable(model)
    decoder = _decoder(model)
    ids = token_ids(tokenizer) if tokenizer is not None else {}
    with _output(Path(out_dir), force) as tmp:
        save_file(llama_state_dict(decoder), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", llama_config(decoder, ids))
        _write_json(tmp / "generation_config.json", _generation_config(ids))
        save_tokenizer(tokenizer, tmp, decoder.config.seq_len)
    return Path(out_dir).expanduser()


def hf_to_hf(model: torch.nn.Module, tokenizer: Any, out_dir: Path, *, force: bool = False) -> Path:
    """A Hugging Face causal LM (LoRA adapters merged first) with ``save_pretrained``
    (safetensors), and its tokenizer beside it."""
    if hasattr(model, "merge_and_unload"):  # a peft PeftModel
        model = model.merge_and_unload()
    ids = token_ids(tokenizer) if tokenizer is not None else {}
    with _output(Path(out_dir), force) as tmp:
        model.save_pretrained(str(tmp))
        if not (tmp / "generation_config.json").exists():
            _write_json(tmp / "generation_config.json", _generation_config(ids))
        save_tokenizer(tokenizer, tmp, int(getattr(model.config, "max_position_embeddings", 0) or 0))
    return Path(out_dir).expanduser()


def export_trained(trained: Any, out_dir: Path, *, force: bool = False) -> Path:
    """What ``muse_plan.trained.open_trained`` opened, as a Hugging Face folder."""
    if trained.kind == "muse":
        return to_hf(trained.model, trained.tokenizer, out_dir, force=force)
    if trained.kind == "hf":
        return hf_to_hf(trained.model, trained.tokenizer, out_dir, force=force)
    raise PlanError(f"export: unknown model kind {trained.kind!r}")


LOAD_SNIPPET = ("from transformers import AutoModelForCausalLM, AutoTokenizer; "
                "model = AutoModelForCausalLM.from_pretrained({d!r}); tokenizer = AutoTokenizer.from_pretrained({d!r})")
