"""Estimate the peak memory of training a decoder language model with each optimizer.

The estimate is a model of one training step's timeline, not a sum of sizes. Every tensor that
exists at some moment falls in one of five components:

* **weights**: every parameter, in the training dtype (pure bf16 or fp32 training: no master copy).
* **optimizer state**: exactly what our optimizers allocate (see :func:`optimizer_state_bytes_of`):
  torch AdamW keeps two full moments in the parameter's dtype; ``GaLoreAdamW`` keeps the moments of
  the projected ``r x n`` (or ``m x r``) gradient in the parameter's dtype and a basis in the
  parameter's dtype; ``GaLoreAdamW8bit`` keeps each moment of at least 4096 elements as one uint8
  code per element plus one fp32 absmax per 256-element block (smaller moments in fp32) and a bf16
  basis; ``GaLoreAdafactor`` keeps a factored second moment (a row and a column vector) and an
  fp32 basis. Every parameter has a 4-byte step; a GaLore parameter whose refresh is staggered
  away from step 0 has a 4-byte refresh offset.
* **gradients**: non-layer-wise, one full gradient per parameter (all of them exist from the end of
  backward until ``zero_grad``; with gradient accumulation also during the next micro-batches).
  Layer-wise (:class:`galore_opt.layerwise.LayerwiseOptimizer`), each gradient is updated and freed
  by its post-accumulate-grad hook. The autograd engine runs ``AccumulateGrad`` nodes (and so the
  hooks) before any other ready node, so one gradient exists at a time: the one being updated,
  next to the layer's backward temporaries (measured on the CPU: the layer-wise estimates match to
  the byte). This is tighter than assuming a whole decoder layer's gradients at once (which would
  add, for LLaMA-7B, 0.3 GiB); the largest single gradient is usually the embedding's or the
  head's. Under gradient accumulation the parameters that cannot accumulate a projected gradient
  keep full gradients between micro-batches (embeddings, head, norms, parameters updated in full,
  the GaLore matrices whose basis is refreshed on the coming update, every parameter of a
  non-GaLore optimizer or of ``GaLoreAdafactor``) and a projected one keeps an fp32 ``r x n``
  buffer. Before the first update no basis exists, so the first accumulation keeps *every* full
  gradient: the estimate includes that update (phases ``first update: ...``, where the state is
  still being created). Tied embeddings: the head's contribution to the shared gradient waits in
  the autograd engine until the embedding's arrives, and the two are summed out of place.
* **activations**: what autograd saves in the forward pass (:func:`activation_bytes`).
* **workspace**: temporaries: the loss's fp32 logits and their gradients, one decoder layer's
  backward, and one optimizer update (see :func:`step_workspace_bytes`).

The peak is the largest of these moments ("phases"): the forward at the loss (and, with
checkpointing, inside the top layer), the backward of the loss, of the output head, of the final
norm, of the top and of the bottom decoder layer (linear in between; each layer in four sub-steps:
MLP, post-attention norm, attention, input norm), of the embedding, and the optimizer step (or,
layer-wise, each update inside the backward). :class:`MemoryEstimate` reports each component's own
peak, the phase at the peak and what is alive there (which sums to ``total``).

Activations of one LLaMA decoder layer (``transformers`` eager/sdpa code, per token, ``d`` bytes per
element of the training dtype, hidden ``h``, MLP width ``I``, ``q = heads * head_dim``,
``kv = kv_heads * head_dim``)::

    RMSNorm (x2)     fp32 copy of its input (4h; the input itself when fp32), normalized (d h),
                     the rsqrt (4)                                    2 ((4 + d) h + 4)
    q/k/v input      the normed hidden state (one tensor)             d h
    attention        rotated q, rotated k, v, output, logsumexp       d (2q + 2kv) + 4 heads
                     (flash / memory-efficient SDPA; the output is the o_proj input, no copy)
    MLP input        the normed hidden state                          d h
    MLP              gate out (SiLU input), SiLU out, up out, product 4 d I

    sdpa, bf16 (q = kv = h): 24 h + 8 I + 4 heads + 8 bytes per token per layer
    sdpa, fp32:              40 h + 16 I + 4 heads + 8

Eager attention saves the fp32 softmax (``4 heads seq`` per token), its cast to the training dtype
(``d heads seq`` when ``d != 4``), ``repeat_kv`` copies of k and v for grouped-query attention,
and a contiguous copy of the output instead of the logsumexp. Once per model: the input ids and
the shifted labels (int64), the rotary cos/sin (``2 seq head_dim d``, shared by the layers and the
batch), the final norm, the lm_head input (``d h``) and the fp32 log-softmax of the logits
(``4 vocab`` per token: ``transformers`` upcasts the logits before the cross entropy). The logits
themselves are not saved; the caller is assumed to drop the model output (``loss =
model(...).loss``); holding it keeps ``d vocab`` more per token.

These are exact: on the CPU the tensors saved by autograd (``saved_tensors_hooks``) match the
formula to the byte for the tiny LLaMA (fp32 and bf16, sdpa and eager; a test checks it). Activation checkpointing (``transformers``' non-reentrant
``gradient_checkpointing_enable``) keeps each layer's input (``d h``) and recomputes one layer
during the backward.

Workspace (each measured on the CPU with the profiler's allocation events, see :func:`validate`):

* the loss's forward holds the logits and their fp32 copy (``(d + 4) vocab`` per token beyond the
  saved log-softmax; in fp32 the copy is the logits), its backward two fp32 ``vocab``-wide
  gradients (``8 vocab`` per token: for a 32000-token vocabulary this is often the peak);
* a decoder layer's backward holds the incoming gradient (``d h``) plus, above the tensors it
  still has saved, the largest of the MLP's ``2 d I`` (gradients of the SiLU output and of the up
  projection), the RMSNorm's fp32 intermediates (``12 h`` in fp32, ``16 h`` in bf16) and the
  attention's ``d (q + 2 kv) + 4 q`` (eager: plus the fp32 gradients of the probabilities and
  scores, ``(8 or 4 + d) heads seq``), per token (:data:`LAYER_BACKWARD_COEF` = 1);
* a checkpointed layer's forward holds ``3 d I + 2 d h`` per token; its recomputation its saved
  tensors;
* an optimizer update (:func:`step_workspace_bytes`): torch AdamW ``sqrt(v)`` and the denominator
  (2 full tensors; the foreach implementation, CUDA's default, one per parameter at once);
  GaLore a refresh: an fp32 copy of a non-fp32 gradient plus
  ``(4.1 max(m, n) + 1.1 min(m, n)) (r + 8) 4`` bytes for the randomized range finder of the cold
  start (``(0.75 max + 1.7 min) r 4`` for the warm power iteration), or
  the update: 3 low-rank tensors (8-bit: the fp32 dequantized moments and intermediates, 20-22
  bytes per low-rank element); a full-size parameter of ``GaLoreAdamW8bit`` (embeddings, head)
  is updated in slices of ``GaLoreAdamW8bit.FULL_CHUNK`` elements through fp32 copies of the
  slice's moments and gradient (:func:`_adamw8bit_full_workspace`).

Everything assumes one device, no tensor/pipeline/data parallel sharding, and allocator-exact
accounting: a CUDA caching allocator rounds blocks up and fragments, and CUDA context, cuBLAS and
NCCL buffers are not counted (``torch.cuda.max_memory_allocated`` is what this estimates, not
``nvidia-smi``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .functional.adamw import CPU_SLICE
from .param_groups import _is_all_linear, _module_matches, is_conv1d
from .quant import DEFAULT_BLOCK_SIZE, DEFAULT_CHUNK_SIZE, SMALL_TENSOR_THRESHOLD

__all__ = [
    "LLAMA_PAPER_RECIPES",
    "OPTIMIZERS",
    "MemoryEstimate",
    "ModelSpec",
    "ParamSpec",
    "activation_bytes",
    "estimate_memory",
    "main",
    "measure_peak_bytes",
    "model_spec",
    "optimizer_state_bytes_of",
    "parse_bytes",
    "step_workspace_bytes",
    "validate",
]

OPTIMIZERS = ("adamw", "adamw8bit", "galore-adamw", "galore-adamw8bit", "galore-adafactor")
DTYPES = {"bf16": 2, "fp32": 4}
ATTENTIONS = ("sdpa", "eager", "flash_attention_2")
DEVICES = ("cuda", "cpu")
GALORE_OPTIMIZERS = ("galore-adamw", "galore-adamw8bit", "galore-adafactor")

#: vocabulary of the named models (``llama-60m`` ...): LLaMA's 32000-token tokenizer, as in the
#: GaLore paper's configs
DEFAULT_VOCAB = 32000
#: (rank, update_proj_gap) of the GaLore paper's recipe by model size (rank d_model / 4 up to 1B,
#: 1024 and gap 500 for 7B); other configs default to rank 128, gap 200
LLAMA_PAPER_RECIPES: dict[str, tuple[int, int]] = {
    "tiny": (128, 200),
    "60m": (128, 200),
    "130m": (256, 200),
    "350m": (256, 200),
    "1b": (512, 200),
    "7b": (1024, 500),
}
_NAMED_MODEL = re.compile(r"(?:llama[-_]?)?(tiny|60m|130m|350m|1b|7b)", re.IGNORECASE)

#: scales the per-token temporaries of a decoder layer's backward (see
#: :func:`_layer_backward_steps`); 1.0 matches the CPU measurements of the tiny LLaMA to the byte in
#: fp32 and bf16 (sdpa; eager to within 4%)
LAYER_BACKWARD_COEF = 1.0
#: randomized range finder (cold refresh): fp32 temporaries in units of (r + 8) columns
COLD_REFRESH_COEF = (4.1, 1.1)  # times max(m, n), times min(m, n)
#: one warm-started subspace iteration with basis alignment: in units of r columns
WARM_REFRESH_COEF = (0.75, 1.7)
_OVERSAMPLE = 8


# --- the model's parameters ---------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its name, shape, role (``embed``, ``head``, ``layer``, ``norm``, ``other``),
    decoder layer index (``None`` outside the layers) and whether it is in the GaLore group."""

    name: str
    shape: tuple[int, ...]
    role: str
    layer: int | None
    galore: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) >= 2

    @property
    def matrix(self) -> tuple[int, int]:
        """The 2-D view the optimizers project: ``(shape[0], prod(shape[1:]))``."""
        return self.shape[0], math.prod(self.shape[1:])


@dataclass(frozen=True)
class ModelSpec:
    """The shapes that the estimate needs, read from a ``transformers`` config."""

    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool
    attention: str
    params: tuple[ParamSpec, ...]
    exact_activations: bool  # False: not a LLaMA-style decoder, the activation formula is a guess
    size: str | None = None  # the named LLaMA size ("60m" ... "7b") if the config was given by name

    @property
    def num_params(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


_LLAMA_LIKE = ("llama", "mistral")


def _named_llama(size: str, vocab_size: int) -> Any:
    """The fields of :func:`galore_opt.toy.llama_config` that the estimate reads, without
    importing ``transformers`` (the command line stays fast)."""
    from types import SimpleNamespace

    from .toy import LLAMA_SIZES

    hidden, intermediate, layers, heads = LLAMA_SIZES[size]
    return SimpleNamespace(
        model_type="llama", vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads, head_dim=hidden // heads,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, _attn_implementation="sdpa",
    )


def _load_config(config: Any, vocab_size: int | None) -> tuple[Any, str]:
    """A ``transformers`` config and a display name from a config, a name or a path."""
    if isinstance(config, (str, os.PathLike)):
        text = os.fspath(config)
        match = _NAMED_MODEL.fullmatch(text.strip())
        if match:
            size = match.group(1).lower()
            return _named_llama(size, vocab_size or DEFAULT_VOCAB), f"llama-{size}"
        path = Path(text)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(
                f"Invalid config: {text!r} - not a model name (llama-tiny, llama-60m, llama-130m, llama-350m, "
                "llama-1b, llama-7b) nor a path to a config.json"
            )
        from transformers import AutoConfig

        try:
            loaded = AutoConfig.from_pretrained(str(path))
        except (ValueError, KeyError, OSError) as exc:
            raise ValueError(f"Invalid config: {text!r} - transformers cannot load it ({exc})") from exc
        if vocab_size:
            loaded.vocab_size = vocab_size
        return loaded, path.parent.name or path.name
    if isinstance(config, Mapping):
        from transformers import AutoConfig

        data = dict(config)
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"Invalid config: a dict without 'model_type' (keys {sorted(data)[:8]})")
        loaded = AutoConfig.for_model(model_type, **data)
        if vocab_size:
            loaded.vocab_size = vocab_size
        return loaded, model_type
    if not hasattr(config, "hidden_size") or not hasattr(config, "num_hidden_layers"):
        raise ValueError(
            f"Invalid config: {type(config).__name__} - need a transformers PretrainedConfig of a decoder "
            "(hidden_size, num_hidden_layers, ...), a model name or a path to a config.json"
        )
    if vocab_size:
        config = copy.copy(config)
        config.vocab_size = vocab_size
    return config, getattr(config, "_name_or_path", "") or getattr(config, "model_type", "model")


def _select_galore(module_name: str, target_modules: Any) -> bool:
    if target_modules is None or _is_all_linear(target_modules):
        return True  # every nn.Linear; the head, which the callers never pass here, is decided apart
    return _module_matches(target_modules, module_name)


def _llama_params(cfg: Any, target_modules: Any) -> list[ParamSpec]:
    """LLaMA/Mistral parameters from the config alone, in ``named_parameters()`` order."""
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    attn_bias, mlp_bias = bool(getattr(cfg, "attention_bias", False)), bool(getattr(cfg, "mlp_bias", False))
    vocab = cfg.vocab_size
    params = [ParamSpec("model.embed_tokens.weight", (vocab, h), "embed", None, False)]
    linears = (
        ("self_attn.q_proj", (heads * head_dim, h), attn_bias),
        ("self_attn.k_proj", (kv_heads * head_dim, h), attn_bias),
        ("self_attn.v_proj", (kv_heads * head_dim, h), attn_bias),
        ("self_attn.o_proj", (h, heads * head_dim), attn_bias),
        ("mlp.gate_proj", (inter, h), mlp_bias),
        ("mlp.up_proj", (inter, h), mlp_bias),
        ("mlp.down_proj", (h, inter), mlp_bias),
    )
    for i in range(layers):
        for name, shape, bias in linears:
            module = f"model.layers.{i}.{name}"
            params.append(ParamSpec(f"{module}.weight", shape, "layer", i, _select_galore(module, target_modules)))
            if bias:
                params.append(ParamSpec(f"{module}.bias", (shape[0],), "layer", i, False))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            params.append(ParamSpec(f"model.layers.{i}.{norm}.weight", (h,), "norm", i, False))
    params.append(ParamSpec("model.norm.weight", (h,), "norm", None, False))
    if not getattr(cfg, "tie_word_embeddings", False):
        # None (galore_param_groups' default) leaves the head out; "all-linear" (the Trainer's) keeps it
        head_galore = target_modules is not None and (
            _is_all_linear(target_modules) or _module_matches(target_modules, "lm_head")
        )
        params.append(ParamSpec("lm_head.weight", (vocab, h), "head", None, head_galore))
    return params


def _meta_params(cfg: Any, target_modules: Any) -> list[ParamSpec]:
    """Any ``transformers`` causal LM: instantiate it on the meta device (no memory) and read its
    parameters, selecting GaLore matrices as :func:`galore_opt.galore_param_groups` does."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    galore: set[int] = set()
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            continue
        if module is head and (target_modules is None or (embed is not None and head.weight is embed.weight)):
            continue  # the default leaves the head out; a tied head is the embedding's parameter
        if target_modules is None or _is_all_linear(target_modules) or _module_matches(target_modules, name):
            galore.add(id(module.weight))
    layer_re = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
    params = []
    for name, p in model.named_parameters():
        match = layer_re.search(name)
        layer = int(match.group(1)) if match else None
        if embed is not None and p is embed.weight:
            role = "embed"
        elif head is not None and p is head.weight:
            role = "head"
        elif p.dim() < 2 and "norm" in name.lower():
            role = "norm"
        else:
            role = "layer" if layer is not None else "other"
        params.append(ParamSpec(name, tuple(p.shape), role, layer, id(p) in galore and p.dim() >= 2))
    return params


def model_spec(
    config: Any,
    *,
    target_modules: str | Iterable[str] | None = None,
    vocab_size: int | None = None,
    attention: str | None = None,
) -> ModelSpec:
    """The parameters and shapes of a decoder model.

    Args:
        config: a ``transformers.PretrainedConfig``, a path to a ``config.json`` (or its folder), a
            dict with ``model_type``, or a name ``"llama-60m"`` ... ``"llama-7b"`` (also
            ``"llama-tiny"``; :func:`galore_opt.toy.llama_config` with a 32000-token vocabulary).
        target_modules: which ``nn.Linear`` weights are GaLore matrices, as in
            :func:`galore_opt.galore_param_groups` (default ``None``: every linear layer but the
            output head; ``"all-linear"``: the head too, when it is not tied).
        vocab_size: overrides the config's vocabulary.
        attention: ``"sdpa"``, ``"eager"`` or ``"flash_attention_2"``; default: the config's
            ``_attn_implementation`` if it is one of these, else ``"sdpa"``.

    LLaMA and Mistral parameters are computed from the config; any other architecture is built on
    the meta device to list its parameters exactly (its activations are estimated with the LLaMA
    formula, which may not fit it).
    """
    if attention is not None and attention not in ATTENTIONS:
        raise ValueError(f"Invalid attention: {attention!r} - must be one of {ATTENTIONS}")
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1):
        raise ValueError(f"Invalid vocab_size: {vocab_size!r} - must be an int >= 1")
    cfg, name = _load_config(config, vocab_size)
    named = _NAMED_MODEL.fullmatch(os.fspath(config).strip()) if isinstance(config, (str, os.PathLike)) else None
    model_type = getattr(cfg, "model_type", "") or ""
    if model_type in _LLAMA_LIKE:
        params = _llama_params(cfg, target_modules)
    else:
        params = _meta_params(cfg, target_modules)
    if not any(p.galore for p in params):
        raise ValueError(f"Invalid target_modules: {target_modules!r} - selects no nn.Linear weight of this model")
    heads = cfg.num_attention_heads
    if attention is None:
        impl = getattr(cfg, "_attn_implementation", None)
        attention = impl if impl in ATTENTIONS else "sdpa"
    return ModelSpec(
        name=name,
        model_type=model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        tied_embeddings=not any(p.role == "head" for p in params),
        attention=attention,
        params=tuple(params),
        exact_activations=model_type in _LLAMA_LIKE,
        size=named.group(1).lower() if named else None,
    )


# --- optimizer state ------------------------------------------------------------------------------


def _side(m: int, n: int, rank: int) -> str:
    """``proj_type="std"`` under torch numerics (:func:`galore_opt.projector.choose_side`)."""
    if rank >= min(m, n):
        return "none"
    return "right" if m >= n else "left"


def _low_rank(m: int, n: int, rank: int) -> tuple[int, int, str]:
    """(low-rank numel, basis numel, side) of an ``(m, n)`` GaLore matrix."""
    side = _side(m, n, rank)
    if side == "none":
        return m * n, 0, side
    r = min(rank, m, n)
    return (r * n, m * r, side) if side == "left" else (m * r, r * n, side)


def _moment8_bytes(numel: int) -> int:
    """One moment of GaLoreAdamW8bit: uint8 codes + fp32 absmax per block, fp32 when small."""
    if numel < SMALL_TENSOR_THRESHOLD:
        return 4 * numel
    return numel + 4 * -(-numel // DEFAULT_BLOCK_SIZE)


def _adafactor_bytes(shape: tuple[int, ...], d: int) -> int:
    if len(shape) >= 2:  # factored: (.., m, 1) row and (.., 1, n) column, in the parameter's dtype
        return d * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1])
    return d * math.prod(shape)


def _param_state_bytes(p: ParamSpec, optimizer: str, rank: int, d: int) -> int:
    """State bytes of one parameter, without the refresh offset (see :func:`optimizer_state_bytes_of`)."""
    step = 4  # a float32 0-dim tensor, as torch.optim keeps it
    galore = p.galore and optimizer in GALORE_OPTIMIZERS
    if optimizer == "adamw" or (optimizer == "galore-adamw" and not galore):
        return step + 2 * d * p.numel
    if optimizer == "adamw8bit" or (optimizer == "galore-adamw8bit" and not galore):
        return step + 2 * _moment8_bytes(p.numel)
    if optimizer == "galore-adafactor" and not galore:
        return step + _adafactor_bytes(p.shape, d)
    m, n = p.matrix
    low, basis, side = _low_rank(m, n, rank)
    shape = (m, n) if side == "none" else ((min(rank, m), n) if side == "left" else (m, min(rank, n)))
    if optimizer == "galore-adamw":
        return step + 2 * d * low + d * basis
    if optimizer == "galore-adamw8bit":
        return step + 2 * _moment8_bytes(low) + 2 * basis  # bf16 basis
    return step + _adafactor_bytes(shape, d) + 4 * basis  # galore-adafactor: fp32 basis


def _nonzero_offsets(n_galore: int, gap: int) -> int:
    """GaLore parameters whose staggered refresh offset ``k * gap // n`` is not 0 (those keep a
    4-byte ``refresh_offset`` tensor)."""
    return max(0, n_galore - -(-n_galore // gap)) if n_galore else 0


def _state_by_param(spec: ModelSpec, optimizer: str, rank: int, d: int, gap: int) -> dict[str, int]:
    """Each parameter's state bytes, refresh offset included (they sum to
    :func:`optimizer_state_bytes_of`)."""
    galore = [p for p in spec.params if p.galore] if optimizer in GALORE_OPTIMIZERS else []
    offsets = {p.name: 4 for k, p in enumerate(galore) if k * gap // len(galore)}
    return {p.name: _param_state_bytes(p, optimizer, rank, d) + offsets.get(p.name, 0) for p in spec.params}


def optimizer_state_bytes_of(
    spec: ModelSpec, optimizer: str, rank: int, dtype: str = "bf16", update_proj_gap: int = 200
) -> int:
    """Bytes of ``optimizer.state`` after the first step, exactly as
    :func:`galore_opt.optimizer_state_bytes` counts them, for our optimizers built with
    ``galore_param_groups(model, rank=rank, update_proj_gap=update_proj_gap)`` (torch numerics,
    ``proj_type="std"``, default basis dtypes). ``"adamw"`` is ``torch.optim.AdamW``;
    ``"adamw8bit"`` is ``GaLoreAdamW8bit`` without GaLore groups, which stores what bitsandbytes'
    ``AdamW8bit`` stores (bitsandbytes keeps its step as a Python int and shares two 1 KiB maps)."""
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_choice("dtype", dtype, tuple(DTYPES))
    d = DTYPES[dtype]
    total = sum(_param_state_bytes(p, optimizer, rank, d) for p in spec.params)
    if optimizer in GALORE_OPTIMIZERS:
        total += 4 * _nonzero_offsets(sum(p.galore for p in spec.params), update_proj_gap)
    return total


# --- activations ----------------------------------------------------------------------------------


def _layer_activation_parts(spec: ModelSpec, d: int, seq: int) -> tuple[int, int, int]:
    """Bytes autograd saves per token in one decoder layer: (one RMSNorm, the attention block with
    its input, the MLP block with its input); the layer saves ``2 norm + attention + mlp``."""
    h, inter, q, kv, heads = spec.hidden_size, spec.intermediate_size, spec.q_dim, spec.kv_dim, spec.num_heads
    norm = (4 + d) * h + 4
    if spec.attention == "eager":
        kv_saved = q if spec.num_kv_heads != spec.num_heads else kv  # repeat_kv copies
        scores = heads * seq * (4 + (d if d != 4 else 0))  # fp32 softmax, and its cast
        attention = d * (q + 2 * kv_saved) + scores + d * q  # q, k, v, probabilities, output copy
    else:
        attention = d * (2 * q + 2 * kv) + 4 * heads  # q, k, v, output, logsumexp
    return norm, d * h + attention, d * h + 4 * d * inter


def _layer_activation_per_token(spec: ModelSpec, d: int, seq: int) -> int:
    """Bytes autograd saves per token in one decoder layer (module docstring)."""
    norm, attention, mlp = _layer_activation_parts(spec, d, seq)
    return 2 * norm + attention + mlp


def activation_bytes(spec: ModelSpec, *, batch: int, seq: int, dtype: str = "bf16", checkpointing: bool = False) -> dict[str, int]:
    """What autograd holds at the end of the forward pass, by part.

    Returns ``{"layers", "layer" (one layer, not checkpointed), "logits" (the fp32 log-softmax),
    "head" (final norm and lm_head input), "other" (ids, labels, cos/sin, the cross entropy's fp32
    total weight), "total"}``.
    """
    d = DTYPES[dtype]
    tokens = batch * seq
    layer = _layer_activation_per_token(spec, d, seq) * tokens
    layers = spec.num_layers * (d * spec.hidden_size * tokens if checkpointing else layer)
    head = ((4 + d) * spec.hidden_size + 4 + d * spec.hidden_size) * tokens
    logits = 4 * spec.vocab_size * tokens
    # ids, labels (with batch 1 a view of the padded labels: one more), cos/sin, the loss's total weight
    other = 16 * tokens + (8 if batch == 1 else 0) + 2 * seq * spec.head_dim * d + 4
    return {
        "layers": layers,
        "layer": layer,
        "head": head,
        "logits": logits,
        "other": other,
        "total": layers + head + logits + other,
    }


def _norm_backward_per_token(spec: ModelSpec, d: int) -> int:
    """RMSNorm backward: fp32 intermediates of the pow / rsqrt / mean chain (3 h-vectors; 4 when
    the input is cast from a lower precision)."""
    return 4 * spec.hidden_size * (3 if d == 4 else 4)


#: one decoder layer's backward, in order: (sub-step, fragments of the weight names whose
#: gradients exist during it, fragments of those the layer-wise hooks update during it)
_LAYER_STEPS = (
    ("mlp", ("mlp.down_proj",), ("mlp.down_proj",)),
    ("post-attention norm", ("mlp.",), ("mlp.gate_proj", "mlp.up_proj")),
    ("attention", ("mlp.", "post_attention_layernorm", "self_attn.o_proj"),
     ("post_attention_layernorm", "self_attn.o_proj")),
    ("input norm", ("mlp.", "post_attention_layernorm", "self_attn."),
     ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "input_layernorm")),
)


def _layer_backward_steps(spec: ModelSpec, d: int, batch: int, seq: int, checkpointing: bool) -> list[tuple[str, int, int]]:
    """``(sub-step, bytes this layer still holds saved, temporaries)`` of one decoder layer's
    backward (module docstring). The temporaries are the incoming gradient (``d h``) plus the
    sub-step's own: the MLP's gradients of the SiLU output and of the up projection (the product's
    gradient replaces the freed product), the RMSNorm's fp32 intermediates, the attention's q, k, v
    gradients and an fp32 ``dq`` accumulator (eager: the fp32 gradients of the probabilities and
    scores). Under checkpointing the layer's saved tensors are the recomputed ones (in fp32 its
    input norm saves the kept layer input itself, which is counted with the kept inputs)."""
    h, inter, q, kv = spec.hidden_size, spec.intermediate_size, spec.q_dim, spec.kv_dim
    norm, attention, mlp = _layer_activation_parts(spec, d, seq)
    if spec.attention == "eager":
        kv_saved = q if spec.num_kv_heads != spec.num_heads else kv
        # the fp32 gradients of the probabilities and of the scores; bf16 frees its saved copy
        attention_work = d * (q + 2 * kv_saved) + (8 if d == 4 else 4 + d) * spec.num_heads * seq
    else:
        attention_work = d * (q + 2 * kv) + 4 * q
    norm_work = _norm_backward_per_token(spec, d)
    kept = d * h if checkpointing and d == 4 else 0
    saved = (2 * norm + attention + mlp, 2 * norm + attention, norm + attention, norm)
    work = (2 * d * inter, norm_work, attention_work, norm_work)
    tokens = batch * seq
    return [
        (name, (held - kept) * tokens, int((d * h + LAYER_BACKWARD_COEF * extra) * tokens))
        for (name, _, _), held, extra in zip(_LAYER_STEPS, saved, work)
    ]


# --- optimizer-step temporaries -------------------------------------------------------------------


def _refresh_workspace(m: int, n: int, rank: int, d: int, kind: bool | str = True) -> int:
    """A basis refresh: in fp32 the gradient's copy (when it is not fp32; on the first refresh
    always, since its non-finite entries are zeroed in a copy) and the randomized range finder's
    (``kind="cold"``: the first refresh) or the warm-started power iteration's (``"warm"``) skinny
    temporaries; ``True``: the larger. (The finiteness check is a max-abs reduction: no
    temporary.)"""
    big, small = max(m, n), min(m, n)
    k = min(rank + _OVERSAMPLE, small)
    copy = 4 * m * n
    cold = (COLD_REFRESH_COEF[0] * big + COLD_REFRESH_COEF[1] * small) * k * 4 + copy
    warm = (WARM_REFRESH_COEF[0] * big + WARM_REFRESH_COEF[1] * small) * min(rank, small) * 4 + (copy if d != 4 else 0)
    return int({"cold": cold, "warm": warm}.get(kind, max(cold, warm)) if isinstance(kind, str) else max(cold, warm))


def _adamw8bit_full_workspace(numel: int, d: int, device: str) -> int:
    """GaLoreAdamW8bit's reference update of a full-size parameter. Small (fp32-moment)
    parameters: the fp32 gradient (4 bytes per element, when the parameter is not fp32),
    ``sqrt(v)``, divided and shifted in place into the denominator (4); on the CPU a bf16
    parameter's ``addcdiv_`` with fp32 operands adds two fp32 temporaries (8; TensorIterator
    promotes through temporaries on the CPU only, CUDA kernels cast in registers). 8-bit
    parameters are updated in slices of ``GaLoreAdamW8bit.FULL_CHUNK`` (=
    ``quant.DEFAULT_CHUNK_SIZE``) elements: the same per slice element plus the slice's fp32
    moments (8) and the requantization scratch (21)."""
    cast = 4 if d != 4 else 0
    promote = 8 if d != 4 and device == "cpu" else 0
    if numel < SMALL_TENSOR_THRESHOLD:  # fp32 moments stored as they are
        return cast * numel + (4 + promote) * numel
    c = min(DEFAULT_CHUNK_SIZE, numel)
    update = cast * c + (4 + promote) * c
    # requantization: the quantizer's 17 bytes per element and one more fp32 slice (measured on
    # the CPU for fp32 and bf16: 29 bytes per slice element in all)
    return 8 * c + max(update, 21 * c)


def step_workspace_bytes(
    p: ParamSpec, optimizer: str, rank: int, dtype: str = "bf16", device: str = "cuda", refresh: bool | str = True
) -> int:
    """Peak temporaries of one parameter's update (the gradient itself not counted).

    ``refresh``: ``"cold"`` (the first update: randomized range finder), ``"warm"`` (a later one:
    one power iteration), ``True`` (the larger) or ``False`` (an update without refresh).

    torch AdamW: ``sqrt(v)`` and the denominator (for-loop implementation, the CPU default); on
    CUDA torch defaults to the foreach implementation, whose ``sqrt`` of every moment exists at
    once (:func:`estimate_memory` sums it over the parameters). GaLoreAdamW's full-size
    parameters: ``sqrt(v)`` only (divided and shifted in place), of one slice of
    ``functional.adamw.CPU_SLICE`` elements on the CPU. GaLore: the larger of the refresh
    (``refresh=True``) and the update: the projected gradient, denominator and normalized update
    (3 low-rank tensors in the parameter's dtype); 8-bit: the fp32 dequantized moments and
    intermediates (20-22 bytes per low-rank element) and, for fp32 parameters, an fp32 copy of
    the bf16 basis; Adafactor: the projected gradient, the variance estimate and the full-size
    update projected back. Full-size parameters of GaLoreAdamW8bit (embeddings, head) run the
    reference 8-bit update, slice by slice for 8-bit moments (:func:`_adamw8bit_full_workspace`).
    """
    d = DTYPES[dtype]
    n_el = p.numel
    galore = p.galore and optimizer in GALORE_OPTIMIZERS
    if optimizer == "adamw":
        return (1 if device == "cuda" else 2) * d * n_el
    if optimizer == "galore-adamw" and not galore:  # sqrt(v), divided and eps added in place
        return d * (min(n_el, CPU_SLICE) if device == "cpu" and n_el > CPU_SLICE else n_el)
    if optimizer == "adamw8bit":
        return 0 if device == "cuda" else _adamw8bit_full_workspace(n_el, d, device)  # bitsandbytes' kernel: none
    if optimizer == "galore-adamw8bit" and not galore:
        return _adamw8bit_full_workspace(n_el, d, device)
    if optimizer == "galore-adafactor" and not galore:
        return d * n_el if len(p.shape) >= 2 else 2 * d * n_el
    m, n = p.matrix
    low, basis, side = _low_rank(m, n, rank)
    refresh_ws = _refresh_workspace(m, n, rank, d, refresh) if refresh and side != "none" else 0
    if optimizer == "galore-adamw":
        update = 2 * d * n_el if side == "none" else 3 * d * low
    elif optimizer == "galore-adamw8bit":
        moments = 8 * low if low >= SMALL_TENSOR_THRESHOLD else 0
        if side == "none":
            update = _adamw8bit_full_workspace(n_el, d, device)
        elif d == 4:
            update = 4 * basis + moments + 12 * low
        else:
            update = moments + 14 * low
        if low >= SMALL_TENSOR_THRESHOLD:
            update = max(update, 8 * low + 17 * min(DEFAULT_CHUNK_SIZE, low) + (4 * basis if d == 4 else 0))
    elif side == "none":  # galore-adafactor updated in full: the variance estimate
        update = d * n_el
    else:  # galore-adafactor: fp32 basis cast to the gradient's dtype twice, low, variance, back
        update = d * n_el + 2 * d * low + (2 * d * basis if d != 4 else 0)
    return max(refresh_ws, update)


# --- the estimate ---------------------------------------------------------------------------------


COMPONENTS = ("weights", "optimizer_state", "gradients", "activations", "workspace")


@dataclass
class MemoryEstimate:
    """Estimated peak memory of one training step, in bytes.

    ``weights``, ``optimizer_state``, ``gradients`` (the most gradient memory alive at once),
    ``activations`` (saved by autograd at the end of the forward pass) and ``workspace`` (the
    largest temporary) are each component's own peak; they do not all peak at the same moment.
    ``total`` is the peak of the step: the largest phase, ``peak_phase``, whose live bytes by
    component are ``at_peak`` (they sum to ``total``). ``phases`` lists every phase's total.
    """

    model: str
    optimizer: str
    layerwise: bool
    batch: int
    seq: int
    rank: int | None
    dtype: str
    activation_checkpointing: bool
    grad_accumulation: int
    device: str
    attention: str
    num_params: int
    weights: int
    optimizer_state: int
    gradients: int
    activations: int
    workspace: int
    total: int
    peak_phase: str
    at_peak: dict[str, int]
    phases: dict[str, int]
    notes: list[str] = field(default_factory=list)

    def fits(self, budget_bytes: int | float | str) -> bool:
        """Whether the peak fits ``budget_bytes`` (a number or a string such as ``"24GiB"``)."""
        return self.total <= parse_bytes(budget_bytes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self, budget: int | float | str | None = None) -> str:
        """A human-readable breakdown (GiB / MiB), with the verdict against ``budget`` if given."""
        head = (
            f"{self.model} ({self.num_params / 1e6:,.1f}M params), {self.optimizer}"
            f"{' layer-wise' if self.layerwise else ''}, {self.dtype}, batch {self.batch} x seq {self.seq}"
            f"{f', accumulation {self.grad_accumulation}' if self.grad_accumulation > 1 else ''}"
            f"{', activation checkpointing' if self.activation_checkpointing else ''}"
            f"{f', rank {self.rank}' if self.rank else ''}, {self.attention} attention, {self.device}"
        )
        lines = [head, f"  {'component':<18}{'own peak':>12}{'at peak':>12}"]
        for name in COMPONENTS:
            lines.append(f"  {name:<18}{fmt_bytes(getattr(self, name)):>12}{fmt_bytes(self.at_peak[name]):>12}")
        lines.append(f"  {'total (peak)':<18}{'':>12}{fmt_bytes(self.total):>12}   at: {self.peak_phase}")
        if budget is not None:
            limit = parse_bytes(budget)
            verdict = "fits" if self.total <= limit else "does not fit"
            lines.append(f"  budget {fmt_bytes(limit)}: {verdict} ({fmt_bytes(abs(limit - self.total))} "
                         f"{'to spare' if self.total <= limit else 'over'})")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def fmt_bytes(n: float) -> str:
    """``n`` bytes as GiB (>= 1 GiB), MiB or KiB."""
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if abs(n) >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"


_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}


def parse_bytes(value: int | float | str) -> int:
    """Bytes from a number or a string: ``"24GiB"``, ``"24 GB"`` (10^9), ``"24G"`` (GiB), ``"1.5e9"``."""
    if isinstance(value, bool):
        raise ValueError(f"Invalid byte count: {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"Invalid byte count: {value!r} - must be a finite number >= 0")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"Invalid byte count: {value!r} - e.g. '24GiB', '24GB', '80G', '1.5e9'")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"Invalid {name}: {value!r} - must be one of {tuple(allowed)}")


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r} - must be an int >= {minimum}")


def _default_recipe(spec: ModelSpec) -> tuple[int, int]:
    return LLAMA_PAPER_RECIPES.get(spec.size or "", (128, 200))


def estimate_memory(
    config: Any,
    optimizer: str,
    *,
    layerwise: bool,
    batch: int,
    seq: int,
    rank: int | None = None,
    dtype: str = "bf16",
    activation_checkpointing: bool = False,
    target_modules: str | Iterable[str] | None = None,
    grad_accumulation: int = 1,
    update_proj_gap: int | None = None,
    vocab_size: int | None = None,
    attention: str | None = None,
    device: str = "cuda",
) -> MemoryEstimate:
    """Estimate the peak memory of training ``config`` with ``optimizer`` (see the module docstring
    for what is counted and how).

    Args:
        config: a ``transformers.PretrainedConfig``, a path to a ``config.json``, a dict with
            ``model_type``, ``"llama-60m"`` ... ``"llama-7b"`` / ``"llama-tiny"`` (32000-token
            vocabulary), or a :class:`ModelSpec` from :func:`model_spec`.
        optimizer: ``"adamw"`` (``torch.optim.AdamW``), ``"adamw8bit"`` (bitsandbytes-style 8-bit
            AdamW for every parameter), ``"galore-adamw"``, ``"galore-adamw8bit"`` or
            ``"galore-adafactor"`` (galore-opt's optimizers, GaLore on ``target_modules``).
        layerwise: optimizer-in-backward (:class:`galore_opt.layerwise.LayerwiseOptimizer`).
        batch: sequences per micro-batch. seq: tokens per sequence.
        rank: GaLore rank; default the GaLore paper's for a named LLaMA size (60m 128, 130m and
            350m 256, 1b 512, 7b 1024), else 128.
        dtype: ``"bf16"`` or ``"fp32"``: the weights, gradients and activations (pure-dtype
            training, no fp32 master weights).
        activation_checkpointing: ``transformers``' gradient checkpointing of every decoder layer.
        target_modules: GaLore matrices, as :func:`galore_opt.galore_param_groups`.
        grad_accumulation: micro-batches per optimizer update.
        update_proj_gap: refresh gap (default 200, 7b 500); only the number of 4-byte refresh
            offsets and, under layer-wise accumulation, how many bases refresh per update depend
            on it.
        vocab_size: overrides the config's (named models: 32000).
        attention: ``"sdpa"`` (default), ``"eager"`` or ``"flash_attention_2"`` (saves what
            sdpa's flash kernel saves).
        device: ``"cuda"`` (default) or ``"cpu"``: torch AdamW's default implementation (foreach on
            CUDA, for-loop on the CPU) and bitsandbytes' fused 8-bit kernel (CUDA) vs galore-opt's
            reference 8-bit update (CPU).

    Returns:
        A :class:`MemoryEstimate`. Raises ``ValueError`` naming any invalid argument.
    """
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_choice("dtype", dtype, tuple(DTYPES))
    _check_choice("device", device, DEVICES)
    if not isinstance(layerwise, bool):
        raise ValueError(f"Invalid layerwise: {layerwise!r} - must be a bool")
    if not isinstance(activation_checkpointing, bool):
        raise ValueError(f"Invalid activation_checkpointing: {activation_checkpointing!r} - must be a bool")
    _check_int("batch", batch)
    _check_int("seq", seq)
    _check_int("grad_accumulation", grad_accumulation)
    if rank is not None:
        _check_int("rank", rank)
    if update_proj_gap is not None:
        _check_int("update_proj_gap", update_proj_gap)
    spec = config if isinstance(config, ModelSpec) else model_spec(
        config, target_modules=target_modules, vocab_size=vocab_size, attention=attention
    )
    default_rank, default_gap = _default_recipe(spec)
    galore = optimizer in GALORE_OPTIMIZERS
    rank = (rank or default_rank) if galore else None
    gap = update_proj_gap or default_gap
    d = DTYPES[dtype]
    tokens = batch * seq
    vocab, hidden = spec.vocab_size, spec.hidden_size
    notes: list[str] = []
    if not spec.exact_activations:
        notes.append(f"model_type {spec.model_type!r}: activations use the LLaMA decoder formula")
    if spec.attention == "eager" and seq > 4096:
        notes.append("eager attention materializes batch x heads x seq^2 scores per layer")

    params = spec.params
    weights = d * spec.num_params
    state_of = _state_by_param(spec, optimizer, rank or 0, d, gap)
    state = sum(state_of.values())
    grad_of = {p.name: d * p.numel for p in params}
    grads_all = sum(grad_of.values())
    embed = next((p for p in params if p.role == "embed"), None)
    head = next((p for p in params if p.role == "head"), None)  # None when tied
    g_embed = grad_of[embed.name] if embed else 0
    g_head = grad_of[head.name] if head else (g_embed if spec.tied_embeddings else 0)
    layers = spec.num_layers
    top, bottom = layers - 1, 0
    by_layer: dict[int, list[ParamSpec]] = {}
    for p in params:
        if p.layer is not None:
            by_layer.setdefault(p.layer, []).append(p)
    layer_grads = {i: sum(grad_of[p.name] for p in ps) for i, ps in by_layer.items()}
    final = [p for p in params if p.layer is None and p.role not in ("embed", "head")]  # final norm and others

    act = activation_bytes(spec, batch=batch, seq=seq, dtype=dtype, checkpointing=activation_checkpointing)
    acts = act["total"]
    a_layer = act["layers"] // max(layers, 1)  # saved per layer (its kept input under checkpointing)
    final_norm_saved = ((4 + d) * hidden + 4) * tokens
    final_norm_ws = (d * hidden + _norm_backward_per_token(spec, d)) * tokens
    loss_fwd_ws = d * vocab * tokens + (4 * vocab * tokens if d != 4 else 0)
    loss_bwd_ws = 8 * vocab * tokens
    head_bwd_ws = d * vocab * tokens + d * hidden * tokens
    if device == "cpu" and d != 4 and not spec.tied_embeddings:
        # the CPU's bf16/fp16 GEMM writes the head's weight gradient through an fp32 buffer of its
        # size (measured: +62.5 MiB at a 32000x512 head; not seen with tied embeddings, whose
        # gradient is accumulated); cuBLAS writes the low-precision result directly
        head_bwd_ws += 4 * vocab * hidden
    incoming = d * hidden * tokens  # the gradient flowing into a layer or norm
    # the embedding's backward: the index sort / accumulation buffers (fp32 rows on CUDA)
    embed_bwd_ws = 4 * hidden * tokens + 16 * tokens
    # a checkpointed layer's forward saves nothing, but its MLP holds the SiLU output, the up
    # projection and their product at once, next to its input and the normed input
    ckpt_fwd_ws = (3 * d * spec.intermediate_size + 2 * d * hidden) * tokens

    # One decoder layer's backward in sub-steps: (saved bytes still held, temporaries, weights whose
    # gradients exist, weights updated there by layer-wise hooks). LLaMA names tell them apart;
    # for other architectures the layer is one step holding everything.
    steps = _layer_backward_steps(spec, d, batch, seq, activation_checkpointing)

    def layer_steps(layer: int) -> list[tuple[int, int, list[ParamSpec], list[ParamSpec]]]:
        ps = by_layer.get(layer, [])
        if not spec.exact_activations:
            return [(steps[0][1], max(w for _, _, w in steps), ps, ps)]
        out = []
        for (_, present, updated), (_, saved, work) in zip(_LAYER_STEPS, steps):
            out.append((saved, work, [p for p in ps if any(f in p.name for f in present)],
                        [p for p in ps if any(f in p.name for f in updated)]))
        return out

    def below(layer: int) -> int:
        """Saved bytes of the layers below ``layer`` (kept inputs under checkpointing, its own
        included) and of the model's ids, labels and cos/sin."""
        return layer * a_layer + (a_layer if activation_checkpointing else 0) + act["other"]

    def ws(p: ParamSpec | None, refresh: bool | str = "warm") -> int:
        return 0 if p is None else step_workspace_bytes(p, optimizer, rank or 0, dtype, device, refresh)

    phases: dict[str, dict[str, int]] = {}

    def phase(name: str, gradients: int, activations: int, workspace: int, optimizer_state: int = state) -> None:
        phases[name] = {
            "weights": weights, "optimizer_state": optimizer_state, "gradients": gradients,
            "activations": activations, "workspace": workspace,
        }

    k = grad_accumulation
    if not layerwise:
        persist = grads_all if k > 1 else 0  # earlier micro-batches' gradients
        # the first micro-batch of the first update has no state yet: the steady phases dominate
        if activation_checkpointing:
            phase("forward: top layer (checkpointed)", persist, below(top), ckpt_fwd_ws)
        phase("forward: loss", persist, acts, loss_fwd_ws)
        phase("backward: loss", persist, acts, loss_bwd_ws)
        phase("backward: lm_head", persist + g_head, acts - act["logits"], head_bwd_ws)
        non_layer = sum(grad_of[p.name] for p in final) + g_head
        phase("backward: final norm", persist or non_layer, act["layers"] + act["other"] + final_norm_saved,
              final_norm_ws)
        for label, layer in (("top", top), ("bottom", bottom)):
            done_above = sum(layer_grads.get(j, 0) for j in range(layer + 1, layers))
            best = None
            for saved, work, present, updated in layer_steps(layer):
                if k > 1:  # every gradient exists; the new one is added in place
                    grads = grads_all + max((grad_of[p.name] for p in updated), default=0)
                else:
                    grads = non_layer + done_above + sum(grad_of[p.name] for p in present)
                total = grads + below(layer) + saved + work
                if best is None or total > best[0]:
                    best = (total, grads, below(layer) + saved, work)
            phase(f"backward: {label} layer", best[1], best[2], best[3])
        # the embedding's new gradient: added in place into a kept one (accumulation); a tied weight's
        # two contributions are summed out of place (the head's is a transposed view) first
        phase("backward: embedding", grads_all, act["other"],
              embed_bwd_ws + g_embed * ((2 if spec.tied_embeddings else 0) + (1 if k > 1 else 0)))
        if optimizer == "adamw" and device == "cuda":  # foreach: sqrt of every moment at once
            phase("optimizer step", grads_all, 0, sum(ws(p) for p in params))
        else:
            phase("optimizer step", grads_all, 0, max((ws(p) for p in params), default=0))
            # the first step creates the state parameter by parameter (GaLore matrices first, as
            # galore_param_groups orders them) and computes every basis from scratch
            order = sorted(params, key=lambda p: not p.galore) if galore else list(params)
            created = 0
            worst = (0, 0, 0)
            for p in order:
                created += state_of[p.name]
                worst = max(worst, (created + ws(p, "cold"), created, ws(p, "cold")))
            phase("first optimizer step", grads_all, 0, worst[2], optimizer_state=worst[1])
    else:
        _layerwise_phases(
            phase, spec, optimizer, rank or 0, d, gap, k, galore, layer_steps, below, ws, state_of, grad_of,
            acts=acts, act=act, head=head, embed=embed, final=final, g_embed=g_embed,
            grads_all=grads_all, loss_fwd_ws=loss_fwd_ws, loss_bwd_ws=loss_bwd_ws, head_bwd_ws=head_bwd_ws,
            incoming=incoming, final_norm_saved=final_norm_saved, final_norm_ws=final_norm_ws,
            embed_bwd_ws=embed_bwd_ws, ckpt_fwd_ws=ckpt_fwd_ws if activation_checkpointing else None,
        )
        if k > 1:
            notes.append(
                "layer-wise accumulation: the first update has no basis yet, so every full gradient is kept "
                "across its micro-batches (phases 'first update: ...')"
            )

    totals = {name: sum(parts.values()) for name, parts in phases.items()}
    peak_phase = max(totals, key=totals.get)
    own = {c: max(parts[c] for parts in phases.values()) for c in ("gradients", "activations", "workspace")}
    return MemoryEstimate(
        model=spec.name,
        optimizer=optimizer,
        layerwise=layerwise,
        batch=batch,
        seq=seq,
        rank=rank,
        dtype=dtype,
        activation_checkpointing=activation_checkpointing,
        grad_accumulation=k,
        device=device,
        attention=spec.attention,
        num_params=spec.num_params,
        weights=weights,
        optimizer_state=state,
        gradients=own["gradients"],
        activations=own["activations"],
        workspace=own["workspace"],
        total=totals[peak_phase],
        peak_phase=peak_phase,
        at_peak=dict(phases[peak_phase]),
        phases=totals,
        notes=notes,
    )


def _layerwise_phases(
    phase: Callable[..., None],
    spec: ModelSpec,
    optimizer: str,
    rank: int,
    d: int,
    gap: int,
    k: int,
    galore: bool,
    layer_steps: Callable[[int], list[tuple[int, int, list[ParamSpec], list[ParamSpec]]]],
    below: Callable[[int], int],
    ws: Callable[..., int],
    state_of: dict[str, int],
    grad_of: dict[str, int],
    **sizes: Any,
) -> None:
    """The phases of a layer-wise (optimizer-in-backward) step, walked in backward order: the
    output head, the final norm, the top and the bottom decoder layer (each in its sub-steps), the
    embedding. Each parameter's update happens when its gradient is accumulated; only the gradient
    being updated exists (plus what accumulation keeps, see :func:`_layerwise_persistent_grads`).

    Two walks: the steady state (every state tensor exists, refreshes are warm) and the first
    update (the state is created parameter by parameter, every basis is computed cold, and with
    accumulation every full gradient of the earlier micro-batches is still there)."""
    params = spec.params
    head, embed, final = sizes["head"], sizes["embed"], sizes["final"]
    act, acts, incoming = sizes["act"], sizes["acts"], sizes["incoming"]
    g_embed, grads_all = sizes["g_embed"], sizes["grads_all"]
    layers = spec.num_layers
    tied = g_embed if spec.tied_embeddings else 0  # a tied weight's first gradient waits in the engine
    project_ws = 0
    if k > 1 and optimizer in ("galore-adamw", "galore-adamw8bit"):
        project_ws = max(((4 * p.numel if d != 4 else 0) + 4 * _low_rank(*p.matrix, rank)[0]
                          for p in params if p.galore), default=0)
    order = ([head] if head is not None else []) + list(final)
    for layer in range(layers - 1, -1, -1):
        for _, _, _, updated in layer_steps(layer):
            order += updated
    state_total = sum(state_of.values())

    def capable(p: ParamSpec) -> bool:
        return optimizer in ("galore-adamw", "galore-adamw8bit") and p.galore and _low_rank(*p.matrix, rank)[2] != "none"

    def walk(first: bool) -> None:
        prefix = "first update: " if first else ""
        refresh = "cold" if first else "warm"
        # gradients kept from earlier micro-batches, and the state, before this backward
        if k == 1:
            kept = 0
        elif first:
            kept = grads_all
        else:
            kept = _layerwise_persistent_grads(params, optimizer, rank, d, gap)
        extra_ws = 0 if first else project_ws
        made = 0 if first else state_total
        done: set[str] = set()

        def update(p: ParamSpec) -> tuple[int, int]:
            """(gradient, workspace) of ``p``'s update; marks its state as created."""
            nonlocal made
            if first and p.name not in done:
                made += state_of[p.name]
                done.add(p.name)
            return grad_of[p.name], max(ws(p, refresh), extra_ws)

        def freed(p: ParamSpec) -> int:
            """What the update of ``p`` frees of the kept gradients (a full one or a projected buffer)."""
            if k == 1:
                return 0
            return 4 * _low_rank(*p.matrix, rank)[0] if capable(p) and not first else grad_of[p.name]

        if sizes["ckpt_fwd_ws"] is not None:
            phase(prefix + "forward: top layer (checkpointed)", kept, below(layers - 1), sizes["ckpt_fwd_ws"],
                  optimizer_state=made)
        phase(prefix + "forward: loss", kept, acts, sizes["loss_fwd_ws"], optimizer_state=made)
        phase(prefix + "backward: loss", kept, acts, sizes["loss_bwd_ws"], optimizer_state=made)
        if head is None:  # tied: no update yet
            phase(prefix + "backward: lm_head", kept + tied, acts - act["logits"], sizes["head_bwd_ws"],
                  optimizer_state=made)
        else:
            g, w = update(head)
            # the new gradient (added into a kept one), then the update once the logits' gradient is freed
            if kept:
                phase(prefix + "backward: lm_head", kept, acts - act["logits"],
                      max(g + sizes["head_bwd_ws"], incoming + w), optimizer_state=made)
            else:
                phase(prefix + "backward: lm_head", g, acts - act["logits"],
                      max(sizes["head_bwd_ws"], incoming + w), optimizer_state=made)
            kept -= freed(head)
        kept += tied
        for p in final:
            update(p)
            kept -= freed(p)
        phase(prefix + "backward: final norm", kept, act["layers"] + act["other"] + sizes["final_norm_saved"],
              sizes["final_norm_ws"], optimizer_state=made)
        for layer in range(layers - 1, -1, -1):
            best = None
            for saved, work, _, updated in layer_steps(layer):
                # one new gradient at a time: the engine runs AccumulateGrad (and its hook) first
                g_p = w_p = 0
                for p in updated:
                    g, w = update(p)
                    if g + w > g_p + w_p:
                        g_p, w_p = g, w
                grads, work_now = kept, work
                if g_p + w_p + incoming > work:
                    grads, work_now = kept + g_p, incoming + w_p
                total = grads + below(layer) + saved + work_now + made
                if best is None or total > best[0]:
                    best = (total, grads, below(layer) + saved, work_now, made)
                for p in updated:
                    kept -= freed(p)
            if layer in (layers - 1, 0):
                label = "top" if layer == layers - 1 else "bottom"
                phase(f"{prefix}backward: {label} layer", best[1], best[2], best[3], optimizer_state=best[4])
        if embed is not None:
            g, w = update(embed)
            # the new gradient (added into a kept one; summed out of place with a tied one), then the update
            if kept:
                phase(prefix + "backward: embedding", kept, act["other"],
                      max((2 if tied else 1) * g + sizes["embed_bwd_ws"], w), optimizer_state=made)
            else:
                phase(prefix + "backward: embedding", g, act["other"], max(sizes["embed_bwd_ws"], w),
                      optimizer_state=made)

    walk(first=False)
    if galore or k > 1:  # else the state only grows, there is no refresh: the steady walk dominates
        walk(first=True)


def _layerwise_persistent_grads(params: Sequence[ParamSpec], optimizer: str, rank: int, d: int, gap: int) -> int:
    """Gradient bytes the layer-wise optimizer keeps between micro-batches (steady state): full
    gradients of the parameters that cannot accumulate a projection, an fp32 projected buffer for
    the others, except the matrices whose basis is refreshed on the coming update, which keep their
    full gradient. Refreshes are staggered: the ``k``-th of ``n`` GaLore matrices refreshes when
    ``(step - k * gap // n) % gap == 0``; the worst update is counted."""
    low_rank_capable = optimizer in ("galore-adamw", "galore-adamw8bit")
    galore = [p for p in params if p.galore and optimizer in GALORE_OPTIMIZERS]
    kept = sum(d * p.numel for p in params if not (p.galore and optimizer in GALORE_OPTIMIZERS))
    extra_by_offset: dict[int, int] = {}
    for index, p in enumerate(galore):
        low, _, side = _low_rank(*p.matrix, rank)
        if not low_rank_capable or side == "none":
            kept += d * p.numel
            continue
        kept += 4 * low  # fp32 projected accumulation buffer
        offset = index * gap // len(galore)
        extra_by_offset[offset] = extra_by_offset.get(offset, 0) + d * p.numel - 4 * low
    return kept + max(extra_by_offset.values(), default=0)


# --- measurement and validation on the CPU ----------------------------------------------------------


def measure_peak_bytes(fn: Callable[[], Any]) -> tuple[int, int, dict[str, int]]:
    """Run ``fn`` and return ``(peak, net, peak_by_region)``: bytes allocated above the level at
    the start, at their peak and at the end, on the CPU.

    PyTorch has no ``max_memory_allocated`` for the CPU allocator, so the allocator's events are
    recorded with ``torch.profiler`` (``profile_memory=True``): each allocation and free is a raw
    ``[memory]`` event with a signed size; their running sum in time order is the memory held
    above the starting level. ``peak_by_region`` is the peak inside each
    ``torch.profiler.record_function`` range whose name starts with ``##`` (e.g. ``"##backward"``).
    The same method as ``benchmarks/_common.py``'s ``cpu_peak_extra_bytes``, re-implemented here so
    that the package does not import the benchmarks.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        fn()
    events = list(prof.profiler.kineto_results.events())
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    memory = [e for e in memory if str(e.device_type()).lower().endswith("cpu") or e.device_type() == torch.device("cpu").type]
    regions = [(e.name()[2:], e.start_ns(), e.start_ns() + e.duration_ns()) for e in events if e.name().startswith("##")]
    by_region: dict[str, int] = {}
    level = peak = 0
    for e in memory:
        level += e.nbytes()
        peak = max(peak, level)
        t = e.start_ns()
        for name, start, stop in regions:
            if start <= t <= stop and level > by_region.get(name, -1):
                by_region[name] = level
    return peak, level, by_region


@dataclass(frozen=True)
class ValidationCase:
    """One training configuration measured by :func:`validate`."""

    size: str
    optimizer: str
    dtype: str = "fp32"
    batch: int = 2
    seq: int = 256
    vocab: int = DEFAULT_VOCAB
    layerwise: bool = False
    checkpointing: bool = False
    accumulation: int = 1
    attention: str = "sdpa"
    rank: int = 64
    tied: bool = False

    @property
    def label(self) -> str:
        return (
            f"llama-{self.size}{' tied' if self.tied else ''} V{self.vocab} {self.dtype} {self.batch}x{self.seq} "
            f"{self.optimizer}{' layerwise' if self.layerwise else ''}{' ckpt' if self.checkpointing else ''}"
            f"{f' acc{self.accumulation}' if self.accumulation > 1 else ''}"
            f"{' eager' if self.attention == 'eager' else ''} r{self.rank}"
        )


def _default_cases(quick: bool) -> list[ValidationCase]:
    """The tiny LLaMA in regimes where each phase is the peak: the loss (32000-token vocabulary),
    the decoder layers (512 tokens), checkpointing, eager attention; then (unless ``quick``)
    llama-60m with every optimizer, the optimizer step (1 x 64 tokens), layer-wise training with
    accumulation, tied embeddings, and llama-130m."""
    cases = []
    for dtype in ("fp32", "bf16"):
        for opt in ("adamw", "galore-adamw", "galore-adamw8bit"):
            cases.append(ValidationCase("tiny", opt, dtype, batch=4, seq=256))
        cases.append(ValidationCase("tiny", "galore-adamw8bit", dtype, batch=4, seq=256, layerwise=True))
        small_vocab = dict(vocab=512, batch=4, seq=512)
        cases.append(ValidationCase("tiny", "galore-adamw", dtype, **small_vocab))
        cases.append(ValidationCase("tiny", "galore-adamw", dtype, **small_vocab, checkpointing=True))
        cases.append(ValidationCase("tiny", "galore-adamw8bit", dtype, **small_vocab, checkpointing=True, layerwise=True))
        cases.append(ValidationCase("tiny", "galore-adamw", dtype, vocab=512, batch=2, seq=512, attention="eager"))
    if quick:
        return cases
    for dtype in ("fp32", "bf16"):
        for opt in OPTIMIZERS:
            cases.append(ValidationCase("60m", opt, dtype, batch=2, seq=256, rank=128))
        for opt in ("adamw", "galore-adamw8bit"):
            cases.append(ValidationCase("60m", opt, dtype, batch=1, seq=64, rank=128))
        cases.append(ValidationCase("60m", "galore-adamw8bit", dtype, batch=1, seq=64, rank=128, layerwise=True))
        cases.append(ValidationCase("60m", "galore-adamw8bit", dtype, batch=2, seq=256, rank=128, layerwise=True,
                                    accumulation=2))
        cases.append(ValidationCase("60m", "galore-adamw", dtype, batch=2, seq=256, rank=128, accumulation=2))
        cases.append(ValidationCase("60m", "galore-adamw8bit", dtype, batch=2, seq=256, rank=128, checkpointing=True))
    for layerwise in (False, True):
        cases.append(ValidationCase("tiny", "galore-adamw8bit", "fp32", batch=1, seq=64, tied=True, layerwise=layerwise))
        cases.append(ValidationCase("tiny", "galore-adamw", "bf16", batch=1, seq=64, tied=True, layerwise=layerwise,
                                    accumulation=2))
    cases.append(ValidationCase("130m", "galore-adamw8bit", "bf16", batch=1, seq=512, rank=256, layerwise=True))
    cases.append(ValidationCase("130m", "galore-adamw", "bf16", batch=1, seq=512, rank=256))
    cases.append(ValidationCase("130m", "adamw", "fp32", batch=1, seq=256, rank=256))
    return cases


def _saved_activation_bytes(model: Any, x: Any) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward pass."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Any) -> Any:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=x, labels=x).loss
    del loss
    return sum(seen.values())


def _run_case(case: ValidationCase, updates: int = 4, seed: int = 0) -> dict[str, Any]:
    import gc
    import warnings

    import torch
    from torch.profiler import record_function

    from . import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, galore_param_groups, optimizer_state_bytes, toy
    from .layerwise import LayerwiseOptimizer

    gap = 2  # refreshes inside the measured updates: cold on update 0, then half the matrices per update
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[case.dtype]
    cfg = toy.llama_config(case.size, case.vocab, max_position_embeddings=max(case.seq, 512),
                           attn_implementation=case.attention, tie_word_embeddings=case.tied)
    model = toy.build_llama(cfg, seed).to(torch_dtype)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, case.vocab, (case.batch, case.seq), generator=gen)
    saved = None if case.checkpointing else _saved_activation_bytes(model, x0)
    if case.checkpointing:
        model.config.use_cache = False
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = galore_param_groups(model, rank=case.rank, update_proj_gap=gap)
        if case.optimizer == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
        elif case.optimizer == "adamw8bit":
            opt = GaLoreAdamW8bit(model.parameters(), lr=1e-4)
        else:
            cls = {"galore-adamw": GaLoreAdamW, "galore-adamw8bit": GaLoreAdamW8bit,
                   "galore-adafactor": GaLoreAdafactor}[case.optimizer]
            opt = cls(groups, lr=1e-4) if case.optimizer != "galore-adafactor" else cls(groups)
    if case.layerwise:
        opt = LayerwiseOptimizer(opt, accumulation_steps=case.accumulation)
    k = case.accumulation

    def train() -> None:
        for _ in range(updates):
            for _ in range(k):
                x = torch.randint(0, case.vocab, (case.batch, case.seq), generator=gen)
                with record_function("##forward"):
                    loss = model(input_ids=x, labels=x).loss
                    if k > 1:
                        loss = loss / k
                with record_function("##backward"):
                    loss.backward()
                del loss
            with record_function("##step"):
                opt.step()
                opt.zero_grad(set_to_none=True)

    gc.collect()
    weights = sum(p.untyped_storage().nbytes() for p in model.parameters())
    t0 = time.perf_counter()
    peak, _, regions = measure_peak_bytes(train)
    seconds = time.perf_counter() - t0
    state = optimizer_state_bytes(opt)
    est = estimate_memory(
        cfg, case.optimizer, layerwise=case.layerwise, batch=case.batch, seq=case.seq,
        rank=case.rank, dtype=case.dtype, activation_checkpointing=case.checkpointing,
        grad_accumulation=k, update_proj_gap=gap, device="cpu",
    )
    measured = weights + peak
    act_est = activation_bytes(model_spec(cfg), batch=case.batch, seq=case.seq, dtype=case.dtype)["total"]
    return {
        "case": case.label,
        **dataclasses.asdict(case),
        "num_params": est.num_params,
        "estimate_bytes": est.total,
        "estimate_phase": est.peak_phase,
        "estimate_at_peak": est.at_peak,
        "estimate_phases": est.phases,
        "measured_bytes": measured,
        "measured_region_peaks": {name: weights + v for name, v in regions.items()},
        "ratio": est.total / measured,
        "within_10pct": abs(est.total / measured - 1) <= 0.10,
        "weights_bytes": weights,
        "state_bytes_measured": state,
        "state_bytes_estimated": est.optimizer_state,
        "saved_activation_bytes_measured": saved,
        "saved_activation_bytes_estimated": None if case.checkpointing else act_est,
        "seconds": seconds,
        "updates": updates,
    }


def _results_dir() -> Path:
    root = Path(__file__).resolve().parent.parent
    return root / "benchmarks" / "results" if (root / "benchmarks").is_dir() else Path.cwd()


def validate(
    cases: Sequence[ValidationCase] | None = None,
    *,
    quick: bool = False,
    out: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train small LLaMAs on the CPU (forward, backward, optimizer step; 4 updates with a refresh
    gap of 2, so cold and warm refreshes are included), measure the peak with
    :func:`measure_peak_bytes` and compare it with :func:`estimate_memory` (``device="cpu"``).

    Writes ``benchmarks/results/memory-validation-cpu-<date>.json`` (or ``out``) and returns it.
    """
    import platform

    import torch

    cases = list(cases) if cases is not None else _default_cases(quick)
    rows = []
    log(f"{'case':<62} {'estimate':>10} {'measured':>10} {'ratio':>6}  phase")
    for case in cases:
        row = _run_case(case)
        rows.append(row)
        log(f"{row['case']:<62} {fmt_bytes(row['estimate_bytes']):>10} {fmt_bytes(row['measured_bytes']):>10} "
            f"{row['ratio']:6.3f}  {row['estimate_phase']}  ({row['seconds']:.0f} s)")
    within = sum(r["within_10pct"] for r in rows)
    log(f"{within}/{len(rows)} within 10%")
    payload = {
        "what": "estimate_memory vs measured CPU peak (weights + profiler allocation-event peak)",
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        },
        "within_10pct": within,
        "cases": rows,
    }
    try:
        import transformers

        payload["machine"]["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    path = Path(out) if out else _results_dir() / f"memory-validation-cpu-{_dt.date.today():%Y%m%d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    log(f"wrote {path}")
    return payload


# --- command line -----------------------------------------------------------------------------------

ALL_SIZES = ("60m", "130m", "350m", "1b", "7b")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m galore_opt.memory",
        description="Estimate the peak memory of training a decoder LM with each optimizer.",
    )
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="llama-60m, llama-130m, llama-350m, llama-1b, llama-7b, llama-tiny")
    src.add_argument("--config", default=None, help="path to a transformers config.json (or its folder)")
    ap.add_argument("--optimizer", default=None,
                    help=f"one of {', '.join(OPTIMIZERS)} (default galore-adamw8bit; with --all: every one)")
    ap.add_argument("--layerwise", action="store_true", help="optimizer-in-backward (LayerwiseOptimizer)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per sequence (default 1024)")
    ap.add_argument("--rank", type=int, default=None, help="GaLore rank (default: the paper's for the size, else 128)")
    ap.add_argument("--update-proj-gap", type=int, default=None, help="GaLore refresh gap (default 200, 7b 500)")
    ap.add_argument("--dtype", default="bf16", help="bf16 or fp32 (default bf16)")
    ap.add_argument("--checkpointing", action="store_true", help="activation (gradient) checkpointing")
    ap.add_argument("--accumulation", type=int, default=1, help="micro-batches per update (default 1)")
    ap.add_argument("--vocab-size", type=int, default=None, help="override the vocabulary (named models: 32000)")
    ap.add_argument("--attention", default=None, help="sdpa (default), eager or flash_attention_2")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu: default optimizer implementations")
    ap.add_argument("--target-modules", default=None,
                    help="GaLore modules: all-linear (head included), a regex, or a,b,c; default every linear but the head")
    ap.add_argument("--budget", default=None, help="memory budget, e.g. 24GiB, 80GB, 24G")
    ap.add_argument("--json", default=None, help="also write the estimate(s) as JSON here")
    ap.add_argument("--all", action="store_true", help="table over llama-60m..7b and every optimizer")
    ap.add_argument("--validate", action="store_true", help="measure small LLaMAs on this CPU against the estimate")
    ap.add_argument("--quick", action="store_true", help="with --validate: the tiny model only")
    ap.add_argument("--out", default=None, help="with --validate: the JSON path")
    return ap


def _targets(text: str | None) -> str | list[str] | None:
    if text is None:
        return None
    return text if _is_all_linear(text) or "," not in text else [t.strip() for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (``python -m galore_opt.memory --help``); invalid values exit with the
    estimator's ``ValueError`` message."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _main(args)
    except ValueError as exc:
        parser.error(str(exc))
        return 2  # pragma: no cover - parser.error exits


def _main(args: argparse.Namespace) -> int:
    if args.validate:
        payload = validate(quick=args.quick, out=args.out)
        return 0 if payload["within_10pct"] == len(payload["cases"]) else 1
    budget = parse_bytes(args.budget) if args.budget is not None else None
    common = dict(
        layerwise=args.layerwise, batch=args.batch, seq=args.seq, rank=args.rank, dtype=args.dtype,
        activation_checkpointing=args.checkpointing, grad_accumulation=args.accumulation,
        update_proj_gap=args.update_proj_gap, vocab_size=args.vocab_size, attention=args.attention,
        device=args.device, target_modules=_targets(args.target_modules),
    )
    if args.all:
        optimizers = OPTIMIZERS if args.optimizer is None else (args.optimizer,)
        estimates = [estimate_memory(f"llama-{s}", o, **common) for s in ALL_SIZES for o in optimizers]
        print(f"batch {args.batch} x seq {args.seq}, {args.dtype}{', layer-wise' if args.layerwise else ''}"
              f"{', checkpointing' if args.checkpointing else ''}"
              f"{f', accumulation {args.accumulation}' if args.accumulation > 1 else ''}, {args.device}")
        header = f"{'model':<11}{'optimizer':<18}{'weights':>11}{'state':>11}{'grads':>11}{'activ.':>11}{'work':>11}{'peak':>11}"
        print(header + ("   budget" if budget is not None else ""))
        for e in estimates:
            line = (f"{e.model:<11}{e.optimizer:<18}" + "".join(
                f"{fmt_bytes(getattr(e, c)):>11}" for c in COMPONENTS) + f"{fmt_bytes(e.total):>11}")
            if budget is not None:
                line += "   fits" if e.total <= budget else "   does not fit"
            print(line)
    else:
        config = args.config or args.model or "llama-7b"
        estimates = [estimate_memory(config, args.optimizer or "galore-adamw8bit", **common)]
        print(estimates[0].table(budget))
    if args.json:
        data = [e.to_dict() for e in estimates]
        Path(args.json).write_text(json.dumps(data if args.all else data[0], indent=1) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
