"""`fingerprint`: one content hash of everything that decides what a diffusers pipeline computes.

Two pipelines get the same fingerprint only if they compute the same thing: the hash covers

- every ``torch.nn.Module`` component's weights and buffers, in full, byte for byte (a merged or
  attached LoRA adapter changes them, so it is covered), with names, shapes and dtypes, and the
  module's config (diffusers ``ModelMixin`` or transformers ``PretrainedConfig``);
- the tokenizer: class, full vocabulary, added tokens and their flags, special tokens, maximum
  length, padding and truncation sides, and the serialized tokenizer model (SentencePiece proto or
  a fast tokenizer's JSON), so one added token changes it;
- the scheduler's (and any other configured component's) settings;
- the pipeline's class and its component names.

Paths and bookkeeping (``_name_or_path``, library versions) are left out, so a pipeline and the
same pipeline saved and loaded from a folder agree. Tensors are hashed on a few threads (hashlib
releases the GIL), so hashing costs about one read of the weights.

Examples:
    >>> from dit_lens.model.builders import PixArtSpec, build_pixart
    >>> pipe = build_pixart(PixArtSpec(num_layers=2))
    >>> before = fingerprint(pipe)
    >>> len(before)
    32
    >>> _ = pipe.tokenizer.add_tokens(["<polyp>"])
    >>> fingerprint(pipe) == before
    False
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

__all__ = ["fingerprint"]

#: Config keys that record where or with what a component was saved, not what it computes.
_EFFECTIVE = {"added_tokens_decoder", "model_max_length", "padding_side", "truncation_side", "pad_token_type_id"}
_BOOKKEEPING = {"architectures", "dtype", "torch_dtype", "transformers_version", "name_or_path",
                "is_local", "local_files_only"}


def fingerprint(pipeline: Any) -> str:
    """Hex digest (32 characters) of `pipeline`'s weights, configs, tokenizer and scheduler."""
    digest = hashlib.blake2b(digest_size=16)
    components = dict(pipeline.components)
    digest.update(f"pipeline:{type(pipeline).__name__}:{sorted(components)}".encode())
    tensors: list[tuple[str, torch.Tensor]] = []
    for name, component in sorted(components.items()):
        if isinstance(component, torch.nn.Module):
            digest.update(f"{name}:{type(component).__name__}:{_describe_config(component)}".encode())
            tensors += [(f"{name}.{key}", tensor) for key, tensor in component.state_dict().items()]
        elif _is_tokenizer(component):
            digest.update(f"{name}:{type(component).__name__}:".encode())
            digest.update(_describe_tokenizer(component))
        else:
            digest.update(f"{name}:{type(component).__name__}:{_describe_config(component)}".encode())
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for (key, tensor), tensor_digest in zip(tensors, pool.map(_tensor_digest, [t for _, t in tensors])):
            digest.update(f"{key}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor_digest)
    return digest.hexdigest()


def _tensor_digest(tensor: torch.Tensor) -> bytes:
    """blake2b of the tensor's raw bytes (no dtype conversion, no copy for contiguous CPU tensors)."""
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous()
    if flat.numel() == 0:
        return b""
    raw = flat.view(torch.uint8) if flat.element_size() > 0 and flat.dtype != torch.bool else flat.to(torch.uint8)
    return hashlib.blake2b(memoryview(raw.numpy()), digest_size=16).digest()


def _describe_config(component: Any) -> str:
    """The settings of a configured component (diffusers config, transformers config, to_dict)."""
    config = getattr(component, "config", None)
    if config is None and hasattr(component, "to_dict"):
        config = component.to_dict()
    if config is None:
        return ""
    settings = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    settings = {k: v for k, v in settings.items() if not str(k).startswith("_") and k not in _BOOKKEEPING}
    return json.dumps(settings, sort_keys=True, default=str)


def _is_tokenizer(component: Any) -> bool:
    return hasattr(component, "get_vocab") and hasattr(component, "all_special_tokens")


def _describe_tokenizer(tokenizer: Any) -> bytes:
    """Everything that decides the token ids and the padded length a tokenizer produces."""
    added = {int(i): repr(token) for i, token in tokenizer.added_tokens_decoder.items()}
    settings = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "added_tokens": sorted(added.items()),
        "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "all_special_ids": list(tokenizer.all_special_ids),
        "model_max_length": str(tokenizer.model_max_length),
        "padding_side": tokenizer.padding_side,
        "truncation_side": tokenizer.truncation_side,
        "clean_up_tokenization_spaces": getattr(tokenizer, "clean_up_tokenization_spaces", None),
        "pad_token_type_id": getattr(tokenizer, "pad_token_type_id", None),
        # what it was made with, less what is recorded above as it is in effect (a tokenizer made in code
        # and the same one saved and loaded back list those differently)
        "init": {k: str(v) for k, v in sorted(tokenizer.init_kwargs.items())
                 if k not in _BOOKKEEPING and not k.endswith("_file") and k not in _EFFECTIVE and v is not None},
    }
    text = json.dumps(settings, sort_keys=True, default=str).encode()
    model = b""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: model, normalizer, pre-tokenizer, post-processor
        serialized = json.loads(backend.to_str())
        for state in ("truncation", "padding"):  # set by each call (padding="max_length", ...), not the model's
            serialized.pop(state, None)
        model += json.dumps(serialized, sort_keys=True).encode()
    sp_model = getattr(tokenizer, "sp_model", None)
    if sp_model is not None and hasattr(sp_model, "serialized_model_proto"):  # SentencePiece scores
        model += sp_model.serialized_model_proto()
    return text + hashlib.blake2b(model, digest_size=16).digest()
