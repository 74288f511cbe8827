"""GPU check: the worker's model runtime on ONNX Runtime's CUDA provider.

    python -m bench.gpu_check --model-dir DIR [--texts 2048] [--out FILE]

Needs onnxruntime-gpu (`pip install 'sluice[gpu]'`) and a GPU. Loads one model
folder (card.json, model.onnx, tokenizer.json) through
`processors.runtime.ModelRuntime`, the class the worker runs, with
`provider="cuda"`, `"auto"` and `"cpu"`, and prints JSON:

- the providers each session got (auto must pick CUDA when it is there);
- agreement: cosine between the CUDA and the CPU embedding of each text;
- throughput (sequences/s, median of 3 passes over the texts) at the
  worker's default budgets and at larger ones a GPU wants, and on the CPU
  at the default budget, side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

from processors.runtime import ModelRuntime
from producers.corpus import text

# (padded tokens per call, rows per call): the worker's defaults, then larger
BUDGETS = ((2048, 64), (16384, 256), (65536, 1024))


def throughput(rt: ModelRuntime, encoded: list, budget: int, rows: int, passes: int = 3) -> float:
    rt.token_budget, rt.max_items = budget, rows
    rt.embed_encoded(encoded[:rows])  # shapes of this budget, once, before timing
    rates = []
    for _ in range(passes):
        t0 = time.perf_counter()
        rt.embed_encoded(encoded)
        rates.append(len(encoded) / (time.perf_counter() - t0))
    return statistics.median(rates)


def gpu_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip() or out.stderr.strip()
    except OSError as exc:
        return f"nvidia-smi: {exc}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--texts", type=int, default=2048)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import onnxruntime as ort

    report: dict = {
        "gpu": gpu_name(),
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        "available_providers": ort.get_available_providers(),
    }
    t0 = time.perf_counter()
    cuda = ModelRuntime(args.model_dir, provider="cuda").load()
    report["cuda_load_s"] = round(time.perf_counter() - t0, 2)
    auto = ModelRuntime(args.model_dir, provider="auto").load()
    cpu = ModelRuntime(args.model_dir, provider="cpu").load()
    report["providers"] = {"cuda": cuda.providers, "auto": auto.providers, "cpu": cpu.providers}
    report["model"] = cuda.card.ref

    texts = [text(i, 11) for i in range(args.texts)]
    encoded = cuda.encode(texts)
    report["tokens"] = {
        "median": int(np.median([e.tokens for e in encoded])),
        "max": int(max(e.tokens for e in encoded)),
    }
    g, c = cuda.embed_encoded(encoded), cpu.embed_encoded(encoded)
    cos = np.sum(g * c, axis=1) / (np.linalg.norm(g, axis=1) * np.linalg.norm(c, axis=1))
    report["cosine_cuda_vs_cpu"] = {"min": float(cos.min()), "mean": float(cos.mean())}

    report["seq_per_s"] = {}
    for budget, rows in BUDGETS:
        report["seq_per_s"][f"cuda budget {budget} rows {rows}"] = round(throughput(cuda, encoded, budget, rows))
    budget, rows = BUDGETS[0]
    report["seq_per_s"][f"cpu budget {budget} rows {rows}"] = round(throughput(cpu, encoded, budget, rows))
    out = json.dumps(report, indent=1)
    print(out)
    if args.out:
        args.out.write_text(out)


if __name__ == "__main__":
    main()
