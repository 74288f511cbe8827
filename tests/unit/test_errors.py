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


def test_a_missing_extra_names_the_install_line():
    from schemas.errors import MissingExtra, require_extra

    assert require_extra("json", "report", "plotting").__name__ == "json"
    with pytest.raises(MissingExtra) as exc:
        require_extra("sluice_no_such_module", "report", "plotting")
    assert isinstance(exc.value, SluiceError) and exc.value.code == "missing_extra"
    assert exc.value.message.startswith("plotting needs the 'report' extra")
    assert exc.value.message.endswith("pip install 'sluice[report]'")


def test_the_facade_is_lazy_and_names_the_client():
    import subprocess
    import sys

    code = (
        "import sys, sluice; assert 'producers.client' not in sys.modules; "
        "from sluice import SluiceClient, KafkaConfig; from producers.client import SluiceClient as C; "
        "assert SluiceClient is C; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr
