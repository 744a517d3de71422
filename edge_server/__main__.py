"""``python -m edge_server``: the edge with every :class:`~edge_server.service.EdgeConfig` field as an option
(scheduler fields included, e.g. ``--policy request``), generated from the dataclasses and their ``help``.

``meg edge`` is the user-facing command; this entry point exists so benchmarks can start an edge with any
configuration field, including ones the CLI does not expose yet.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Any

from edge_server.scheduler import SchedulerConfig
from edge_server.service import EdgeConfig, serve
from models.backends import ModelFolderError
from telemetry.logs import configure_logging

log = logging.getLogger(__name__)

_TYPES = {"int": int, "float": float, "str": str, "Path": Path}


def _add_fields(parser: argparse.ArgumentParser, cls: type, skip: set[str]) -> None:
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        type_name = f.type if isinstance(f.type, str) else f.type.__name__
        flag, text = "--" + f.name.replace("_", "-"), f"{f.metadata.get('help', f.name)} (default: {default})"
        if type_name == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=_TYPES.get(type_name, str), default=default, help=text)


def parse_config(argv: list[str] | None = None) -> tuple[EdgeConfig, str]:
    """(edge configuration, log level) from command-line options."""
    parser = argparse.ArgumentParser(prog="python -m edge_server", description=__doc__.split("\n\n")[0])
    _add_fields(parser, EdgeConfig, skip={"engine"})
    _add_fields(parser, SchedulerConfig, skip=set())
    parser.add_argument("--log-level", default="INFO")
    args = vars(parser.parse_args(argv))
    level = args.pop("log_level")
    engine: dict[str, Any] = {f.name: args.pop(f.name) for f in dataclasses.fields(SchedulerConfig)}
    return EdgeConfig(**args, engine=SchedulerConfig(**engine)), level


def main(argv: list[str] | None = None) -> int:
    try:
        config, level = parse_config(argv)
        configure_logging("edge", level)
        asyncio.run(serve(config))
    except (ModelFolderError, ValueError, OSError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
