"""OpenAPI schema generation details Litestar leaves out.

Litestar has no public hook for this, so the plugin builds on its own Struct plugin from a
private module; if a Litestar release moves that, the server still starts and the document
merely lacks `additionalProperties: false` (tests/test_openapi_fuzz.py would then say so)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

try:
    from litestar._openapi.schema_generation.plugins.struct import StructSchemaPlugin
except ImportError:  # pragma: no cover - only with a Litestar that moved it
    StructSchemaPlugin = None  # type: ignore[assignment,misc]

# Type-only names, not a cycle: at run time these private Litestar modules are not needed,
# and importing them would make a Litestar that moved them fail to start (see above).
if TYPE_CHECKING:
    from litestar._openapi.schema_generation import SchemaCreator
    from litestar.openapi.spec import Schema
    from litestar.typing import FieldDefinition


class StrictStructSchemaPlugin(StructSchemaPlugin or object):  # type: ignore[misc]
    """A Struct that forbids unknown fields (every spec Struct: a typo is an error) says so
    with `additionalProperties: false`, so the document doesn't invite fields the API
    refuses."""

    def to_openapi_schema(
        self, field_definition: FieldDefinition, schema_creator: SchemaCreator
    ) -> Schema:
        schema = super().to_openapi_schema(field_definition, schema_creator)
        info = msgspec.inspect.type_info(field_definition.type_)
        if isinstance(info, msgspec.inspect.StructType) and info.forbid_unknown_fields:
            schema.additional_properties = False
        return schema


def schema_plugins() -> list[object]:
    """The plugins to register: none if Litestar's Struct plugin could not be imported."""
    return [StrictStructSchemaPlugin()] if StructSchemaPlugin is not None else []
