"""`python -m sinks`: run the ClickHouse sink with settings from SLUICE_* env vars.

The control plane runs the same thing as `sluice sink` (sinks.sink.serve);
this entry point exists so the sink runs without importing `sluice`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.errors import SluiceError
from sinks.config import SinkConfig


class SinkSettings(BaseSettings, SinkConfig):
    model_config = SettingsConfigDict(env_prefix="SLUICE_", extra="ignore", frozen=True)


def main() -> int:
    logging.basicConfig(
        level=os.environ.get("SLUICE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = SinkSettings()
    except ValidationError as exc:
        for err in exc.errors():
            name = "SLUICE_" + "_".join(str(p) for p in err["loc"]).upper()
            print(f"error: {name}: {err['msg']}", file=sys.stderr)
        return 2
    from sinks.sink import serve

    try:
        asyncio.run(serve(config))
    except SluiceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
