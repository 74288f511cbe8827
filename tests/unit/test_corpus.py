from collections import Counter

from producers.corpus import Workload, text


def test_corpus_is_deterministic_and_varied():
    assert text(3) == text(3) and text(3) != text(4)
    lengths = sorted(len(text(i).split()) for i in range(500))
    assert lengths[0] >= 2 and lengths[-1] <= 80 and 8 <= lengths[250] <= 16


def test_zipf_workload_is_reproducible_and_skewed():
    w = Workload("zipf", distinct=1000, exponent=1.1, seed=1)
    a, b = w.indices(20_000), w.indices(20_000)
    assert (a == b).all()
    top = Counter(a.tolist()).most_common(1)[0]
    assert top[0] == 0 and top[1] > 20_000 * 0.1  # rank 1 carries ~13% of traffic at s=1.1
    assert (Workload("zipf", 1000, 1.1, seed=2).indices(100) != a[:100]).any()


def test_unique_workload_never_repeats():
    texts = Workload("unique", distinct=10).texts(300)
    assert len(set(texts)) == 300


def test_mixed_workload_has_the_asked_share_of_hot_inputs():
    w = Workload("mixed", distinct=50, hot_fraction=0.8, seed=3)
    idx = w.indices(10_000)
    hot = idx < 50
    assert abs(hot.mean() - 0.8) < 0.02
    assert len(set(idx[~hot].tolist())) == (~hot).sum()  # the rest never repeats
    assert len(set(idx[hot].tolist())) == 50


def test_offset_runs_share_hot_inputs_but_no_fresh_ones():
    a = Workload("mixed", distinct=20, hot_fraction=0.5, seed=3, offset=0).indices(1000)
    b = Workload("mixed", distinct=20, hot_fraction=0.5, seed=3, offset=1000).indices(1000)
    assert not set(a[a >= 20].tolist()) & set(b[b >= 20].tolist())
    assert set(a[a < 20].tolist()) == set(b[b < 20].tolist())


def test_steps_of_a_run_never_repeat_each_others_new_texts():
    w = Workload("mixed", distinct=20, hot_fraction=0.5, seed=3)
    a, b = w.step(0).indices(1000), w.step(1).indices(1000)
    assert not set(a[a >= 20].tolist()) & set(b[b >= 20].tolist())
