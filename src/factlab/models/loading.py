"""``load()``: a Hub id, a local folder, a ``.gguf`` file or a packaged short name -> :class:`LoadedModel`."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from factlab.errors import InputError, ModelLoadError, NonFiniteError
from factlab.data.paths import offline_reason
from factlab.models.adapters import Adapter, adapter_for
from factlab.models.packaged import DEFAULT_MODEL, PACKAGED
from factlab.prompts import Batch, PaddingSide, encode

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class Prediction:
    """One next-token candidate: decoded token text, its id and its probability (0..1)."""

    token: str
    token_id: int
    prob: float

    def to_dict(self) -> dict[str, object]:
        return {"token": self.token, "token_id": self.token_id, "prob": self.prob}


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and architecture adapter.

    ``model_id`` identifies the exact weights (name plus revision or content hash). Anything computed *from
    running* the model (statistics, optimised values, scores, traces) depends on the numerics too and keys on
    :attr:`numerics_id`; :attr:`identity` is what run folders and summaries record.
    """

    model: nn.Module
    tokenizer: object
    adapter: Adapter
    name: str
    model_id: str
    attn_implementation: str | None = None

    def __repr__(self) -> str:  # the dataclass repr would print the whole module tree
        return (f"LoadedModel(name={self.name!r}, model_id={self.model_id!r}, family={self.adapter.family!r}, "
                f"layers={self.adapter.n_layers}, dtype={self.dtype_name}, device={self.device})")

    @property
    def dtype_name(self) -> str:
        """The weights' dtype as a short name: ``"float32"``, ``"bfloat16"``, ..."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def numerics(self) -> dict[str, str | None]:
        """Device-independent settings that change computed numbers: weight dtype and attention implementation."""
        return {"dtype": self.dtype_name, "attn_implementation": self.attn_implementation}

    @property
    def identity(self) -> dict[str, str | None]:
        """What a result was computed with: ``model_id`` plus :attr:`numerics` (recorded in every run and summary)."""
        return {"model_id": self.model_id, **self.numerics}

    @property
    def numerics_id(self) -> str:
        """One string for cache keys: ``model_id``, dtype and attention implementation (``id|float32|sdpa``)."""
        return "|".join([self.model_id, self.dtype_name] + ([self.attn_implementation] if self.attn_implementation else []))

    @property
    def device(self) -> torch.device:
        """Device of the input embeddings (where token ids must go)."""
        return self.adapter.embedding(self.model).weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.adapter.embedding(self.model).weight.dtype

    def encode(self, prompts: str | Sequence[str], *, padding_side: PaddingSide = "left") -> Batch:
        """Tokenise and pad prompts on the model's input device."""
        return encode(self.tokenizer, prompts, padding_side=padding_side, device=self.device)

    def forward(self, batch: Batch, **kwargs) -> torch.Tensor:
        """Logits ``(B, T, V)`` for a batch (no cache, no gradient unless enabled by the caller)."""
        out = self.model(**batch.model_inputs(self.adapter.uses_position_ids), use_cache=False, **kwargs)
        return out.logits

    @torch.no_grad()
    def next_token_probs(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """``(B, V)`` float32 next-token probabilities after each prompt's last token."""
        batch = self.encode(prompts)
        logits = self.forward(batch)
        last = logits[torch.arange(batch.size, device=logits.device), batch.last_positions.to(logits.device)]
        if not torch.isfinite(last).all():
            raise NonFiniteError("the model produced NaN/inf logits; try dtype='float32' or check the weights")
        return last.float().softmax(-1)

    def predict(self, prompts: str | Sequence[str], top_k: int = 5) -> list[list[Prediction]]:
        """Top-``k`` next tokens with probabilities, one list per prompt."""
        if top_k < 1:
            raise ValueError("top_k must be at least 1")
        probs = self.next_token_probs(prompts)
        values, ids = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        return [
            [Prediction(self.tokenizer.decode([int(t)]), int(t), float(p)) for p, t in zip(vs, ts)]
            for vs, ts in zip(values.tolist(), ids.tolist())
        ]


# --------------------------------------------------------------------------- cache
def cache_dir() -> Path:
    """Root of factlab's caches: ``$FACTLAB_CACHE`` or the user cache dir."""
    env = os.environ.get("FACTLAB_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("factlab"))


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}") from None


def _dequantised_dir(gguf: Path, label: str) -> tuple[Path, str]:
    """Folder of float (safetensors) weights converted from ``gguf`` once and cached; returns (dir, sha)."""
    sha = file_sha256(gguf)
    target = cache_dir() / "models" / f"{label}-{sha[:16]}"
    if (target / "config.json").exists():
        return target, sha
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s once; later loads read the float copy in %s", gguf, target)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # the weights are plain floats now; drop the GGUF quantiser so save_pretrained writes safetensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "factlab_source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": sha}))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, sha


def _folder_id(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix in {".json", ".safetensors", ".bin"}:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set to a true value in the environment now."""
    return offline_reason(("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")) is not None


def _offline_help(name: str) -> str:
    short = ", ".join(PACKAGED)
    return (
        f"could not load {name!r}: it is not a packaged model, a local folder or a .gguf file, and the Hugging Face Hub "
        "could not provide it (offline, HF_HUB_OFFLINE=1, or not cached). Offline choices: a packaged model "
        f"({short}; e.g. `factlab models`), a folder written by save_pretrained, or a path to a .gguf file."
    )


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` can only mean a local path (a Hub id is ``name`` or ``org/name``)."""
    return (name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name
            or name.endswith((".gguf", ".safetensors", ".bin")) or name in (".", ".."))


def check_device(device: str | torch.device | None) -> None:
    """Refuse a device this PyTorch build cannot use, before anything is loaded."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only PyTorch build" if torch.version.cuda is None else "no visible CUDA device"
            raise InputError(f"device {device!r} asked for, but this is {build} (torch {torch.__version__}); "
                             "use --device cpu, or install a CUDA build of PyTorch on a machine with a GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError(f"device {device!r} is not available here; use --device cpu")


# --------------------------------------------------------------------------- load
def load(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    revision: str | None = None,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer and pick its adapter.

    ``name_or_path``: a packaged short name (``smollm2-135m``, ``gemma3-270m``), a folder written by
    ``save_pretrained``, a ``.gguf`` file, or a Hub id (honours ``HF_HUB_OFFLINE``). GGUF weights are
    dequantised once and cached as safetensors under :func:`cache_dir`. ``dtype`` defaults to float32;
    ``device`` defaults to CUDA when available; ``device_map`` (e.g. ``"auto"``) shards with accelerate
    instead and excludes ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _resolve_dtype(dtype) or torch.float32
    if device is not None and device_map is not None:
        raise InputError("give either device or device_map, not both")
    check_device(device)
    name = str(name_or_path)
    path = Path(name).expanduser()
    source: str
    model_id: str
    if name in PACKAGED:
        pm = PACKAGED[name]
        if not pm.installed():
            raise ModelLoadError(f"the packaged model {name!r} is not installed; install it with: {pm.install}")
        folder, sha = _dequantised_dir(pm.gguf_path(), name)
        source, model_id = str(folder), f"{name}@{sha[:16]}"
    elif path.is_file() and path.suffix == ".gguf":
        folder, sha = _dequantised_dir(path.resolve(), path.stem)
        source, model_id = str(folder), f"{path.stem}@{sha[:16]}"
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is a folder without config.json; give a folder written by save_pretrained")
        source, model_id = str(path.resolve()), f"{path.resolve()}@{_folder_id(path)}"
    elif path.exists():
        raise ModelLoadError(f"{path} is neither a folder written by save_pretrained nor a .gguf file")
    elif _looks_like_path(name):
        raise ModelLoadError(f"{path} does not exist; give an existing folder written by save_pretrained, a .gguf file, "
                             f"a packaged model ({', '.join(PACKAGED)}) or a Hub id like 'org/name'")
    else:
        source, model_id = name, f"{name}@{revision or 'main'}"

    kwargs: dict = {"dtype": torch_dtype}
    if revision is not None:
        kwargs["revision"] = revision
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    hub: dict = {"revision": revision} if revision else {}
    if source == name and _hub_offline():  # read now: huggingface_hub reads it only once, at import
        hub["local_files_only"] = True
    kwargs.update(hub)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **hub)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        if source == name:
            raise ModelLoadError(_offline_help(name) + f" (underlying error: {e})") from e
        raise ModelLoadError(f"could not load {name!r} from {source}: {e}") from e
    if source == name:
        commit = getattr(model.config, "_commit_hash", None)
        if commit:
            model_id = f"{name}@{commit}"
    if device_map is None:
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return wrap(model, tokenizer, name=name, model_id=model_id)


def wrap(model: nn.Module, tokenizer, *, name: str | None = None, model_id: str | None = None) -> LoadedModel:
    """Wrap an already-loaded HF causal LM and tokenizer (picks the adapter, prepares sites, eval mode)."""
    adapter = adapter_for(model.config)
    adapter.prepare(model)
    model.eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    name = name or getattr(model.config, "_name_or_path", None) or type(model).__name__
    attn = getattr(model.config, "_attn_implementation", None)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, name=name, model_id=model_id or name,
                       attn_implementation=attn if isinstance(attn, str) and attn != "factlab" else None)
