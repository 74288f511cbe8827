"""sluice/models.py: the card, idempotence, the quality gate, the real build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from processors.runtime import BUILTIN_MODELS, ModelCard, ModelRuntime, discover_models, load_card
from sluice.models import (
    FAST_MODEL,
    FAST_VERSION,
    FP32_FILE,
    ModelBuildError,
    build_fast_model,
    fast_card,
    is_built,
    quality_gate,
    sha256,
    write_card,
)


def _fake_built(models_dir: Path, content: bytes = b"not really onnx", sha: str | None = None) -> Path:
    folder = models_dir / FAST_MODEL
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(content)
    write_card(folder, fast_card(sha or sha256(folder / "model.onnx")))
    return folder


@pytest.fixture
def no_maven(tmp_path, monkeypatch):
    """No jar in the local Maven repository and no mvn: any attempt to build fails fast."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("MAVEN_REPO", str(empty))
    monkeypatch.setenv("PATH", str(empty))


def test_card_is_valid_and_like_the_builtin_one(tmp_path):
    folder = _fake_built(tmp_path)
    card = load_card(folder)
    assert (card.name, card.version, card.onnx) == (FAST_MODEL, FAST_VERSION, "model.onnx")
    assert card.onnx_sha256 == sha256(folder / "model.onnx")
    assert "langchain4j" in card.description and "sluice model build" in card.description
    builtin = load_card(BUILTIN_MODELS / "all-minilm-l6-v2")
    same = set(ModelCard.model_fields) - {"name", "version", "description", "onnx", "onnx_sha256", "max_rows_per_call"}
    assert {k: getattr(card, k) for k in same} == {k: getattr(builtin, k) for k in same}
    # dynamic int8: one row per call, so an embedding never depends on its batch-mates
    assert card.max_rows_per_call == 1 and builtin.max_rows_per_call is None
    assert discover_models([tmp_path])[FAST_MODEL] == folder  # .build/ and the like are not models


def test_a_built_folder_is_returned_at_once(tmp_path, no_maven):
    folder = _fake_built(tmp_path)
    lines: list[str] = []
    before = (folder / "model.onnx").stat().st_mtime_ns
    assert build_fast_model(tmp_path, log=lines.append) == folder
    assert "already built" in lines[-1] and not (tmp_path / ".build").exists()
    assert (folder / "model.onnx").stat().st_mtime_ns == before  # nothing rebuilt


@pytest.mark.parametrize("case", ["sha mismatch", "old version", "force"])
def test_a_stale_folder_is_rebuilt_and_kept_if_that_fails(tmp_path, no_maven, case):
    folder = _fake_built(tmp_path, sha="0" * 64 if case == "sha mismatch" else None)
    if case == "old version":
        write_card(folder, {**fast_card(sha256(folder / "model.onnx")), "version": "sq8-0"})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert is_built(folder) == (case == "force")
    with pytest.raises(ModelBuildError, match="no mvn"):  # it went for the fp32 jar
        build_fast_model(tmp_path, log=lambda _: None, force=case == "force")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the old folder is untouched
    assert [p.name for p in (tmp_path / ".build").iterdir()] == ["lock"]  # no half-made files


def _tiny_model(path: Path, table: np.ndarray) -> Path:
    """input_ids -> a row of `table` per token, masked: [batch, seq, dim]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["last_hidden_state"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"]),
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["b", "s", table.shape[1]])],
        [
            numpy_helper.from_array(table.astype(np.float32), "table"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_quality_gate_passes_a_close_file_and_refuses_a_far_one(tmp_path):
    rng = np.random.default_rng(0)
    vocab, dim = 30522, 8  # the tokenizer's vocabulary; a small embedding
    table = rng.standard_normal((vocab, dim))
    ref = _tiny_model(tmp_path / "ref.onnx", table)
    close = _tiny_model(tmp_path / "close.onnx", table + 1e-3 * rng.standard_normal((vocab, dim)))
    far = _tiny_model(tmp_path / "far.onnx", rng.standard_normal((vocab, dim)))
    card = {**fast_card(""), "dimensions": dim}
    texts = ["the striker scored", "a recipe for dinner", "kafka partitions and batches", "x"]
    lines: list[str] = []
    lo, mean = quality_gate(ref, close, texts, work=tmp_path / "w", card=card, log=lines.append)
    assert 0.999 < lo <= mean <= 1.0 + 1e-6
    assert lines[-1].startswith("quality gate: cosine to fp32 on 4 texts min ")
    with pytest.raises(ModelBuildError, match="cosine min"):
        quality_gate(ref, far, texts, work=tmp_path / "w", card=card, log=lines.append)
    assert list((tmp_path / "w").iterdir()) == []  # its temporary cards are gone


def test_worker_finds_built_models_before_models_dir(tmp_path, monkeypatch):
    from sluice.cli import main
    from sluice.settings import load_settings

    monkeypatch.setenv("SLUICE_STATE_DIR", str(tmp_path))
    assert load_settings().worker().models_dir == ()
    _fake_built(tmp_path / "models")
    extra = tmp_path / "extra"
    extra.mkdir()
    monkeypatch.setenv("SLUICE_MODELS_DIR", orjson.dumps([str(extra)]).decode())
    assert load_settings().worker().models_dir == (tmp_path / "models", extra)
    assert main(["model", "list"]) == 0


def test_model_list_shows_what_the_worker_finds(tmp_path, monkeypatch, capsys):
    from sluice.cli import main

    monkeypatch.setenv("SLUICE_STATE_DIR", str(tmp_path))
    folder = _fake_built(tmp_path / "models")
    assert main(["model", "list"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(FAST_MODEL))
    assert FAST_VERSION in row and "embed,classify" in row and row.endswith(str(folder))
    assert FAST_MODEL + " *" in out  # the built model is the default


def test_real_build(tmp_path, monkeypatch):
    """The whole recipe (fetches the jar with mvn when ~/.m2 lacks it); then
    a rebuild that fails the gate leaves the good folder as it was."""
    lines: list[str] = []
    folder = build_fast_model(tmp_path, log=lines.append)
    assert folder == tmp_path / FAST_MODEL and is_built(folder)
    assert any(line.startswith("quality gate:") for line in lines)
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "model.onnx"]
    assert sorted(p.name for p in (tmp_path / ".build").iterdir()) == [FP32_FILE, "lock"]  # fp32 kept
    rt = ModelRuntime(folder, intra_op_threads=1).load()
    assert rt.card.ref == f"{FAST_MODEL}@{FAST_VERSION}"
    vecs = rt.embed(["the striker scored", "a goal in the last minute", "a recipe for dinner"])
    assert vecs.shape == (3, 384) and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]
    before = (folder / "model.onnx").stat().st_mtime_ns
    assert build_fast_model(tmp_path, log=lines.append) == folder
    assert "already built" in lines[-1] and (folder / "model.onnx").stat().st_mtime_ns == before

    import sluice.models

    monkeypatch.setattr(sluice.models, "GATE_MIN_COS", 0.9999)  # int8 cannot reach this
    before = (folder / "model.onnx").stat().st_mtime_ns
    with pytest.raises(ModelBuildError, match=r"cosine min 0\.99\d+ < 0\.9999"):
        build_fast_model(tmp_path, log=lines.append, force=True)
    assert is_built(folder) and (folder / "model.onnx").stat().st_mtime_ns == before
    assert sorted(p.name for p in (tmp_path / ".build").iterdir()) == [FP32_FILE, "lock"]


def test_fp32_model_is_installed_only_on_request_and_linked_not_copied(tmp_path):
    from sluice.models import FP32_MODEL, FP32_VERSION, install_fp32_model

    work = tmp_path / ".build"
    work.mkdir()
    dest = install_fp32_model(tmp_path, work, log=lambda _: None)
    assert dest == tmp_path / FP32_MODEL and is_built(dest, FP32_VERSION)
    assert (dest / "model.onnx").stat().st_ino == (work / FP32_FILE).stat().st_ino  # 90 MB once
    card = load_card(dest)
    assert card.max_rows_per_call is None and card.dimensions == 384  # batched freely: GPUs want that
    assert set(discover_models([tmp_path])) >= {FP32_MODEL}
    rt = ModelRuntime(dest, intra_op_threads=1).load()
    ref = ModelRuntime(BUILTIN_MODELS / "all-minilm-l6-v2", intra_op_threads=1).load()
    texts = ["the striker scored", "a recipe for dinner", "quarterly revenue grew"]
    cos = np.sum(rt.embed(texts) * ref.embed(texts), axis=1)
    assert cos.min() > 0.98  # the same model as the PyPI int8 file, in full precision
    # what the worker warns about when a GPU runs an int8 file, and not this one
    from processors.runtime import _cpu_only_under_cuda

    assert _cpu_only_under_cuda(dest / "model.onnx") == set()
    from onnx import TensorProto, helper, save

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    outs = [
        helper.make_tensor_value_info(n, t, s)
        for n, t, s in (
            ("q", TensorProto.UINT8, [1, 4]),
            ("scale", TensorProto.FLOAT, []),
            ("zero", TensorProto.UINT8, []),
        )
    ]
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "scale", "zero"])
    save(helper.make_model(helper.make_graph([node], "g", [x], outs)), tmp_path / "int8.onnx")
    assert _cpu_only_under_cuda(tmp_path / "int8.onnx") == {"DynamicQuantizeLinear"}
