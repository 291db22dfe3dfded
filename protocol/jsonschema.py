"""JSON Schema (draft 2020-12) of every wire message, generated from the Structs.

    python -m protocol.jsonschema > docs/protocol.schema.json

The document is published as docs/protocol.schema.json (a test checks it is up to date).
`$defs/FromSupervisor` is the tagged union of what a supervisor sends, `$defs/FromSwitchboard`
of what the switchboard sends; the root accepts either. Two adjustments to msgspec's output
make the schema say what the wire accepts rather than what the Structs are:

- no object forbids additional properties: within major version 1 a receiver ignores fields
  it does not know (docs/protocol.md §2), the backend objects of `start_job` included;
- a Docker backend names an `image` or an `image_artifact` (a check in code, not a type);
- patterns lose the `(?!\\n)` that keeps Python's `$` from matching before a final newline:
  a JSON Schema pattern is an ECMA-262 regex, whose `$` never does.

The output is deterministic (sorted keys, ASCII, a final newline).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import msgspec

from . import limits
from .messages import FromSupervisor, FromSwitchboard

DIALECT = "https://json-schema.org/draft/2020-12/schema"
_PYTHON_END = "(?!\\n)"


def _for_the_wire(node: Any) -> Any:
    """A copy of `node` with patterns in ECMA-262 form and every object open."""
    if isinstance(node, list):
        return [_for_the_wire(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "additionalProperties" and value is False:
            continue  # a spec Struct: strict in the REST API, lenient on the wire
        if key == "pattern" and isinstance(value, str):
            value = value.removesuffix(_PYTHON_END)
        out[key] = _for_the_wire(value)
    return out


def schema() -> dict[str, Any]:
    """The schema document, as a JSON-ready dict."""
    (from_supervisor, from_switchboard), defs = msgspec.json.schema_components(
        [FromSupervisor, FromSwitchboard], ref_template="#/$defs/{name}"
    )
    # DockerBackend.__post_init__: one of the two must be a string.
    defs["DockerBackend"]["anyOf"] = [
        {"required": [name], "properties": {name: {"type": "string"}}}
        for name in ("image", "image_artifact")
    ]
    defs["FromSupervisor"] = {
        "title": "FromSupervisor",
        "description": "A message a supervisor sends to the switchboard, tagged by `type`.",
        **from_supervisor,
    }
    defs["FromSwitchboard"] = {
        "title": "FromSwitchboard",
        "description": "A message the switchboard sends to a supervisor, tagged by `type`.",
        **from_switchboard,
    }
    version = f"{limits.PROTOCOL_MAJOR}.{limits.PROTOCOL_MINOR}"
    document: dict[str, Any] = _for_the_wire(
        {
            "$schema": DIALECT,
            "title": f"Switchboard supervisor protocol {version}: wire messages",
            "description": (
                "One JSON object per WebSocket text message (docs/protocol.md). Validate a "
                "received message against $defs/FromSupervisor or $defs/FromSwitchboard "
                "for its direction. Generated from protocol/messages.py by `python -m "
                "protocol.jsonschema`."
            ),
            "anyOf": [
                {"$ref": "#/$defs/FromSupervisor"},
                {"$ref": "#/$defs/FromSwitchboard"},
            ],
            "$defs": defs,
        }
    )
    return document


def render() -> str:
    """The schema document as published: sorted keys, two-space indent, final newline."""
    return json.dumps(schema(), indent=2, sort_keys=True, ensure_ascii=True) + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
