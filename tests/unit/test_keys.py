from schemas.keys import cache_key, normalise, partition_key


def key(**kw):
    base = dict(scope="acme", model="m@1", task="embed", labels=None, text="hello world")
    base.update(kw)
    return cache_key(**base)


def test_normalise_folds_whitespace_and_case_only_for_uncased_models():
    assert normalise("  Hello \t\n  World ", uncased=True) == "hello world"
    assert normalise("  Hello \t\n  World ", uncased=False) == "Hello World"
    # nothing else changes: punctuation and accents stay
    assert normalise("Café, ok?", uncased=True) == "café, ok?"


def test_cache_key_is_stable_and_separates_everything_that_changes_the_answer():
    assert key() == key()
    variants = [
        key(scope="other"),
        key(model="m@2"),
        key(task="classify", labels=("a",)),
        key(task="classify", labels=("b",)),
        key(text="hello there"),
    ]
    assert len({key(), *variants}) == 1 + len(variants)


def test_label_boundaries_cannot_collide():
    assert key(task="classify", labels=("a b", "c")) != key(task="classify", labels=("a", "b c"))


def test_partition_key_puts_case_and_whitespace_variants_together():
    a = partition_key(tenant="t", model=None, task="embed", labels=None, text="Hello  World")
    b = partition_key(tenant="t", model=None, task="embed", labels=None, text="hello world")
    c = partition_key(tenant="u", model=None, task="embed", labels=None, text="hello world")
    assert a == b != c
