import json

import numpy as np
import pytest

from processors.runtime import BUILTIN_MODELS, ModelRuntime, discover_models, load_card, split_by_budget
from schemas.errors import ConfigError


def test_split_sorts_by_length_and_respects_padded_budget():
    lengths = [30, 5, 12, 7, 30, 6]
    batches = split_by_budget(lengths, token_budget=40, max_items=10)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths)
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 40 or len(b) == 1


def test_split_caps_rows_and_lets_an_oversized_input_go_alone():
    assert split_by_budget([3] * 5, token_budget=1000, max_items=2) == [[0, 1], [2, 3], [4]]
    assert split_by_budget([500, 2], token_budget=100, max_items=8) == [[1], [0]]


def test_builtin_card_is_valid():
    card = load_card(BUILTIN_MODELS / "all-minilm-l6-v2")
    assert card.uncased and card.dimensions == 384 and "classify" in card.tasks
    assert card.price_per_compute_hour_usd > 0


def test_bad_card_fails_naming_the_file(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "card.json").write_text('{"name": "m"}')
    with pytest.raises(ConfigError, match="card.json"):
        discover_models([tmp_path])


def test_missing_models_dir_names_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="SLUICE_MODELS_DIR"):
        discover_models([tmp_path / "nope"])


@pytest.fixture(scope="module")
def runtime():
    return ModelRuntime(BUILTIN_MODELS / "all-minilm-l6-v2", intra_op_threads=1, token_budget=64, max_items=4).load()


def test_batched_embeddings_equal_one_by_one(runtime):
    texts = [
        "short",
        "a somewhat longer sentence about kafka partitions and batches",
        "medium length text here",
        "x",
        "another one of middling size for the test",
    ]
    together = runtime.embed(texts)  # sorted, split by a 64-token budget, padded per sub-batch
    alone = np.stack([runtime.embed([t])[0] for t in texts])
    assert np.allclose(together, alone, atol=1e-4)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_uncased_model_gives_identical_outputs_for_normalised_variants(runtime):
    a, b = runtime.embed(["Hello   World, how ARE you", "hello world, how are you"])
    assert np.allclose(a, b, atol=1e-6)


def test_classify_scores_are_a_distribution(runtime):
    labels = ["sports", "cooking"]
    out = runtime.classify(runtime.embed(["the match went to penalties"])[0], labels, runtime.label_embeddings(labels))
    assert out["label"] == "sports"
    assert sum(out["scores"].values()) == pytest.approx(1.0, abs=1e-5)


def test_card_output_and_rows_per_call_are_honoured(tmp_path):
    from processors.runtime import _resolve

    src = BUILTIN_MODELS / "all-minilm-l6-v2"
    card = load_card(src).model_dump()
    folder = tmp_path / "m"
    folder.mkdir()
    card.update(
        onnx=str(_resolve(card["onnx"], src)),
        tokenizer=str(_resolve(card["tokenizer"], src)),
        max_rows_per_call=1,
        output="no-such-output",
        onnx_sha256=None,
    )
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(ConfigError, match="no-such-output"):
        ModelRuntime(folder, intra_op_threads=1).load()
    card["output"] = None
    (folder / "card.json").write_text(json.dumps(card))
    rt = ModelRuntime(folder, intra_op_threads=1, max_items=64).load()
    assert rt.max_items == 1
    texts = [f"text number {i} with some words" for i in range(5)]
    from processors.runtime import RunStats

    stats = RunStats()
    rt.embed_encoded(rt.encode(texts), stats)
    assert stats.sub_batches == 5 and set(stats.sizes) == {1}
