"""`sluice settings`: every setting, its default and meaning."""

from __future__ import annotations

import argparse

from sluice.settings import Settings


def cmd_settings(s: Settings, args: argparse.Namespace) -> int:
    from sluice.settings import settings_table

    print(settings_table())
    return 0
