"""JSON schemas of essd's published contracts, and the ``essd schema`` subcommand.

``essd schema mqtt`` prints one JSON object mapping every MQTT payload (by topic, relative to
``<base_topic>/<site_id>/``) to its JSON schema, generated from the pydantic models that build
and parse those payloads, so the schemas cannot drift from the code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any


def mqtt_schemas() -> dict[str, Any]:
    """Topic (relative to the site base) -> JSON schema of its payload."""
    # Imported here so `essd --help` does not load the MQTT client library.
    from essd.commands import COMMANDS, CommandResult  # noqa: PLC0415
    from essd.mqtt import (  # noqa: PLC0415
        SCHEMA_VERSION,
        DeviceStatePayload,
        PlanPayload,
        StatePayload,
    )

    out: dict[str, Any] = {
        "status": {
            "title": "Status",
            "description": "Plain text, retained; also the last will",
            "type": "string",
            "enum": ["online", "offline"],
        },
        "state": StatePayload.model_json_schema(by_alias=True),
        "plan": PlanPayload.model_json_schema(by_alias=True),
        "device/{device_id}/state": DeviceStatePayload.model_json_schema(by_alias=True),
    }
    for name, model in COMMANDS.items():
        out[f"cmd/{name}"] = model.model_json_schema()
        out[f"cmd/{name}/result"] = CommandResult.model_json_schema()
    return {"schema_version": SCHEMA_VERSION, "topics": out}


#: ``essd schema <name>`` -> a function returning the schema document.
SCHEMAS: dict[str, Callable[[], dict[str, Any]]] = {"mqtt": mqtt_schemas}


def _cmd_schema(args: argparse.Namespace) -> int:
    """Print the JSON schema document named on the command line."""
    doc = SCHEMAS[args.contract]()
    if args.topic is not None:
        topics: dict[str, Any] = doc.get("topics", {})
        if args.topic not in topics:
            print(f"topic: unknown {args.topic!r} (one of {', '.join(topics)})", file=sys.stderr)  # noqa: T201
            return 2
        doc = topics[args.topic]
    print(json.dumps(doc, indent=2, sort_keys=False))  # noqa: T201
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``essd schema <contract> [--topic T]`` to the CLI."""
    p = sub.add_parser("schema", help="print the JSON schemas of a published contract")
    p.add_argument("contract", choices=sorted(SCHEMAS), help="which contract")
    p.add_argument("--topic", help="print only this topic's schema (e.g. state, cmd/mode)")
    p.set_defaults(func=_cmd_schema)
