"""Sluice: Kafka-native inference for small transformer models.

The public facade for users:

    from sluice import KafkaConfig, SluiceClient

    async with SluiceClient(KafkaConfig(bootstrap_servers="127.0.0.1:9092")) as client:
        result = await client.submit("hello world")

The names are imported on first use, so `import sluice` (which every
`sluice` command does) stays light and pulls in no Kafka client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_FACADE = {
    "SluiceClient": "producers.client",
    "ClientError": "producers.client",
    "ResultTimeout": "producers.client",
    "make_request": "producers.client",
    "KafkaConfig": "schemas.topics",
    "SluiceError": "schemas.errors",
}

__all__ = ["ClientError", "KafkaConfig", "ResultTimeout", "SluiceClient", "SluiceError", "__version__", "make_request"]

if TYPE_CHECKING:
    from producers.client import ClientError, ResultTimeout, SluiceClient, make_request
    from schemas.errors import SluiceError
    from schemas.topics import KafkaConfig


def __getattr__(name: str) -> Any:
    module = _FACADE.get(name)
    if module is None:
        raise AttributeError(f"module 'sluice' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
