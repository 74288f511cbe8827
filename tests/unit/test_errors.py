"""One exception root: every error class of ours is a SluiceError, with a code."""

import importlib
import inspect

import pytest

from schemas.errors import RequestError, SluiceError, error_label

MODULES = [
    "schemas.errors",
    "schemas.records",
    "producers.client",
    "processors.consumer",
    "processors.publisher",
    "processors.scheduling",
    "processors.model_process",
    "sinks.errors",
    "sinks.sink",
    "sinks.analytics",
    "sluice.errors",
    "sluice.models",
]


@pytest.mark.parametrize("name", MODULES)
def test_every_exception_of_ours_is_a_sluice_error(name):
    mod = importlib.import_module(name)
    ours = [
        c
        for _, c in inspect.getmembers(mod, inspect.isclass)
        if issubclass(c, BaseException) and c.__module__.split(".")[0] == name.split(".")[0]
    ]
    for cls in ours:
        assert issubclass(cls, SluiceError), cls
        assert isinstance(cls.code, str) and cls.code, cls


def test_error_label_is_the_code_or_internal():
    assert error_label(RequestError("bad", code="invalid_json")) == "invalid_json"
    assert error_label(SluiceError("x")) == "internal"
    assert error_label(KeyError("x")) == "internal"
