"""The model runtime: model cards, tokenizer, ONNX Runtime session, pooling.

Everything here is synchronous; in the worker it runs in the model process
(processors/model_process.py), and the event loop only hands misses over
and takes results back.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
from cachetools import LRUCache
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

# Package data. ONNX Runtime and tokenizers open real files, so the packages
# are installed as folders (what pip does), and this is one.
BUILTIN_MODELS = Path(str(resources.files("processors").joinpath("models")))


def default_threads() -> int:
    """One ONNX Runtime thread per core, but on a small machine leave one core
    to the event loop, which fetches, answers cache hits and publishes while
    the model runs (measured on 2 cores: 1 thread served 184 misses/s through
    the pipeline, 2 threads 119/s)."""
    cores = os.cpu_count() or 1
    return cores - 1 if 1 < cores <= 4 else cores


class ModelCard(BaseModel):
    """`card.json` beside (or pointing to) a model's files."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: str
    description: str = ""
    onnx: str = "model.onnx"
    onnx_sha256: str | None = None
    tokenizer: str = "tokenizer.json"
    tasks: tuple[Literal["embed", "classify"], ...] = ("embed", "classify")
    default_task: Literal["embed", "classify"] = "embed"
    max_tokens: int = Field(256, ge=8, le=8192)
    dimensions: int = Field(384, ge=1)
    pooling: Literal["mean", "cls", "none"] = "mean"
    normalize: bool = True
    uncased: bool = False
    classify_scale: float = Field(20.0, gt=0)
    label_template: str = "{label}"
    price_per_compute_hour_usd: float = Field(0.10, ge=0)
    # what a tenant is charged against its budget: per token computed (a cache
    # hit computes none), known at admission from the tokenizer
    price_per_million_tokens_usd: float = Field(0.02, ge=0)
    # Dynamic int8 quantises activations per ONNX Runtime call, so a row's
    # output moves a little with its batch-mates. 1 makes every embedding
    # depend on its own text only (what a cache needs), at a small cost on
    # few threads.
    max_rows_per_call: int | None = Field(None, ge=1)
    # Exports often carry several outputs (token states, pooled vector):
    # name the one to use; default: the first.
    output: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def _resolve(spec: str, folder: Path) -> Path:
    """`package:pkg/path` points into an installed Python package (models
    shipped on PyPI); anything else is relative to the card's folder."""
    if spec.startswith("package:"):
        pkg, _, rel = spec[len("package:") :].partition("/")
        found = importlib.util.find_spec(pkg)
        if found is None or not found.submodule_search_locations:
            raise ConfigError(
                f"model file {spec}: Python package {pkg!r} is not installed (pip install {pkg.replace('_', '-')})"
            )
        return Path(list(found.submodule_search_locations)[0]) / rel
    return (folder / spec).resolve()


def load_card(folder: Path) -> ModelCard:
    path = folder / "card.json"
    try:
        return ModelCard.model_validate(orjson.loads(path.read_bytes()))
    except FileNotFoundError:
        raise ConfigError(f"model folder {folder}: no card.json") from None
    except (orjson.JSONDecodeError, ValidationError) as exc:
        raise ConfigError(f"model card {path}: {str(exc).splitlines()[0]} {str(exc).splitlines()[1:2]}") from None


def discover_models(extra_dirs: Sequence[Path] = ()) -> dict[str, Path]:
    """Model name -> folder: the built-in cards, then each extra folder's
    subfolders with a card.json (a later folder overrides an earlier one)."""
    found: dict[str, Path] = {}
    for root in (BUILTIN_MODELS, *extra_dirs):
        if not root.is_dir():
            raise ConfigError(f"SLUICE_MODELS_DIR={root}: not a folder")
        for card in sorted(root.glob("*/card.json")):
            found[load_card(card.parent).name] = card.parent
    return found


def load_tokenizer(card: ModelCard, path: Path) -> Any:
    """The model's tokenizer as the worker runs it: no padding (the shipped
    tokenizer.json pads everything to 128 tokens, ~6x the work for typical
    inputs; the runtime pads per sub-batch), truncated at the card's max tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.enable_truncation(max_length=card.max_tokens)
    return tok


def model_tokenizer(folder: Path) -> tuple[ModelCard, Any]:
    """A model folder's card and tokenizer, without its ONNX session (counting tokens elsewhere)."""
    card = load_card(folder)
    path = _resolve(card.tokenizer, folder)
    if not path.is_file():
        raise ConfigError(f"model {card.name}: file {path} not found")
    return card, load_tokenizer(card, path)


_INT8_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul"}


def _cpu_only_under_cuda(onnx_path: Path) -> set[str]:
    """The dynamic-int8 op types in a file: under CUDA some of them fall
    back to the CPU (the sq8 file got 75 copy nodes between the two)."""
    try:
        import onnx

        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except Exception:
        return set()
    return {n.op_type for n in graph.node} & _INT8_OPS


@dataclass(slots=True)
class Encoded:
    """One tokenised input: ids and their count (the padded-cost unit)."""

    ids: np.ndarray  # int64 [n_tokens]
    truncated: bool

    @property
    def tokens(self) -> int:
        return int(self.ids.shape[0])


@dataclass(slots=True)
class RunStats:
    """What one `embed` call cost, for timings and the cost share."""

    seconds: float = 0.0
    sub_batches: int = 0
    padded_tokens: int = 0
    sizes: list[int] = field(default_factory=list)


def split_by_budget(lengths: Sequence[int], token_budget: int, max_items: int) -> list[list[int]]:
    """Indices sorted by length, cut so each sub-batch's padded cost
    (items x longest) stays within the token budget; an input longer than
    the budget forms a sub-batch of its own rather than stalling the rest."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # sorted ascending, so lengths[i] is the longest of current + [i]
        if current and ((len(current) + 1) * lengths[i] > token_budget or len(current) >= max_items):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class ModelRuntime:
    """One model: tokenizer + ONNX Runtime session + pooling."""

    def __init__(
        self,
        folder: Path,
        *,
        intra_op_threads: int = 0,
        provider: str = "auto",
        token_budget: int = 2048,
        max_items: int = 64,
        label_cache_entries: int = 4096,
        allow_spinning: bool = False,
    ) -> None:
        self.folder = folder
        self.card = load_card(folder)
        self.intra_op_threads = intra_op_threads
        self.provider = provider
        self.token_budget = token_budget
        self.max_items = min(max_items, self.card.max_rows_per_call or max_items)
        self.allow_spinning = allow_spinning
        self._labels: LRUCache[str, np.ndarray] = LRUCache(maxsize=label_cache_entries)
        self._session: Any = None  # an onnxruntime InferenceSession, once loaded
        self._tokenizer: Any = None  # a tokenizers Tokenizer, once loaded
        self.providers: list[str] = []

    # -- loading ---------------------------------------------------------------
    def load(self) -> ModelRuntime:
        import onnxruntime as ort

        card = self.card
        onnx_path = _resolve(card.onnx, self.folder)
        tok_path = _resolve(card.tokenizer, self.folder)
        for p in (onnx_path, tok_path):
            if not p.is_file():
                raise ConfigError(f"model {card.name}: file {p} not found")
        if card.onnx_sha256:
            digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
            if digest != card.onnx_sha256:
                raise ConfigError(
                    f"model {card.name}: {onnx_path} sha256 {digest[:12]}... does not "
                    f"match the card's {card.onnx_sha256[:12]}..."
                )
        self._tokenizer = load_tokenizer(card, tok_path)

        available = ort.get_available_providers()
        if self.provider == "auto":
            wanted = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []
        elif self.provider == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise ConfigError(
                    "SLUICE_ORT_PROVIDER=cuda: onnxruntime has no CUDA provider "
                    f"here (available: {', '.join(available)}); "
                    "pip install 'sluice[gpu]'"
                )
            wanted = ["CUDAExecutionProvider"]
        else:
            wanted = []
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self.intra_op_threads or default_threads()
        opts.inter_op_num_threads = 1
        if not self.allow_spinning:
            # Spinning threads burn the cores that the event loop, the broker
            # and the client share with the model on a small machine.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(
                str(onnx_path), sess_options=opts, providers=[*wanted, "CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ConfigError(f"model {card.name}: ONNX Runtime cannot load {onnx_path}: {exc}") from None
        self.providers = self._session.get_providers()
        if self.providers[0] == "CUDAExecutionProvider":
            slow = _cpu_only_under_cuda(onnx_path)
            if slow or card.max_rows_per_call == 1:
                # measured on an H200: the sq8 file ran 2.6-3.6k seq/s under
                # CUDA, the fp32 file 29-40k (bench/RESULTS.md, GPU check)
                log.warning(
                    "model %s on CUDA: %s; a GPU wants an fp32 model (`sluice model build "
                    "--fp32`, SLUICE_DEFAULT_MODEL=all-minilm-l6-v2-fp32)",
                    card.ref,
                    f"it is dynamic int8 ({', '.join(sorted(slow))}), and ONNX Runtime copies "
                    "between the GPU and the CPU around the nodes CUDA lacks"
                    if slow
                    else "one row per call (max_rows_per_call 1)",
                )
        self._input_names = {i.name for i in self._session.get_inputs()}
        outputs = [o.name for o in self._session.get_outputs()]
        if card.output is not None and card.output not in outputs:
            raise ConfigError(
                f"model {card.name}: the card's output {card.output!r} is not among "
                f"the file's outputs ({', '.join(outputs)})"
            )
        self._output_name = card.output or outputs[0]
        self.embed_encoded([self.encode(["warm up the session"])[0]] * 2)
        log.info("model %s loaded: %s, providers %s", card.ref, onnx_path, self.providers)
        return self

    # -- tokenising --------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        if self._tokenizer is None:
            raise ModelError("model not loaded")
        out = []
        for enc in self._tokenizer.encode_batch(list(texts), add_special_tokens=True):
            out.append(Encoded(np.asarray(enc.ids, dtype=np.int64), bool(enc.overflowing)))
        return out

    # -- inference ---------------------------------------------------------------
    def embed_encoded(self, items: Sequence[Encoded], stats: RunStats | None = None) -> np.ndarray:
        """Embeddings [n, dim] float32, in input order."""
        if self._session is None:
            raise ModelError("model not loaded")
        n = len(items)
        out = np.empty((n, self.card.dimensions), dtype=np.float32)
        if n == 0:
            return out
        t0 = time.perf_counter()
        lengths = [it.tokens for it in items]
        for idx in split_by_budget(lengths, self.token_budget, self.max_items):
            width = lengths[idx[-1]]
            ids = np.zeros((len(idx), width), dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for row, i in enumerate(idx):
                ids[row, : lengths[i]] = items[i].ids
                mask[row, : lengths[i]] = 1
            feeds = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self._input_names:
                feeds["token_type_ids"] = np.zeros_like(ids)
            hidden = self._session.run([self._output_name], feeds)[0]
            out[idx] = self._pool(hidden, mask)
            if stats is not None:
                stats.sub_batches += 1
                stats.padded_tokens += len(idx) * width
                stats.sizes.append(len(idx))
        if stats is not None:
            stats.seconds += time.perf_counter() - t0
        return out

    def _pool(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        card = self.card
        if hidden.ndim == 2 or card.pooling == "none":
            pooled = hidden
        elif card.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask[..., None].astype(np.float32)
            pooled = (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
        pooled = pooled.astype(np.float32, copy=False)
        if card.normalize:
            pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        return pooled

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed_encoded(self.encode(texts))

    def label_embeddings(self, labels: Sequence[str], stats: RunStats | None = None) -> np.ndarray:
        """Embeddings of classify labels, computed once per label text."""
        missing = [lab for lab in dict.fromkeys(labels) if lab not in self._labels]
        if missing:
            texts = [self.card.label_template.format(label=lab) for lab in missing]
            for lab, vec in zip(missing, self.embed_encoded(self.encode(texts), stats)):
                self._labels[lab] = vec
        return np.stack([self._labels[lab] for lab in labels])

    def classify(self, embedding: np.ndarray, labels: Sequence[str], label_vectors: np.ndarray) -> dict:
        """Zero-shot: cosine to each label's embedding, softmax over scaled
        cosines (the scale is the card's temperature), best label."""
        emb = embedding / max(float(np.linalg.norm(embedding)), 1e-12)
        cos = label_vectors @ emb
        logits = cos * self.card.classify_scale
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        best = int(np.argmax(probs))
        return {"label": labels[best], "scores": {lab: round(float(p), 6) for lab, p in zip(labels, probs)}}
