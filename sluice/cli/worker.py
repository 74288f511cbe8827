"""`sluice worker` and `sluice model`: run an inference worker; build and list models."""

from __future__ import annotations

import argparse
import asyncio

from sluice.settings import Settings


def cmd_worker(s: Settings, args: argparse.Namespace) -> int:
    from processors.worker import serve

    overrides = {}
    if args.metrics_port is not None:
        overrides["metrics_port"] = args.metrics_port
    asyncio.run(serve(s.worker(**overrides)))
    return 0


def cmd_model(s: Settings, args: argparse.Namespace) -> int:
    if args.model_command == "build":
        from sluice.models import build_fast_model

        build_fast_model(s.state_dir / "models", force=args.force, fp32=args.fp32, log=lambda m: print(m, flush=True))
        return 0
    from processors.runtime import discover_models, load_card

    cfg = s.worker()
    rows = [("name", "version", "tasks", "folder")]
    for name, folder in sorted(discover_models(cfg.models_dir).items()):
        card = load_card(folder)
        rows.append(
            (
                name + (" *" if name == cfg.default_model else ""),
                card.version,
                ",".join(card.tasks),
                str(folder.absolute()),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3])
    print(f"* SLUICE_DEFAULT_MODEL={cfg.default_model}")
    return 0
