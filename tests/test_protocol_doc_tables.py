"""docs/protocol.md's field tables say exactly what the Structs say.

Every object on the wire (each message, `HeldRun`, `EventProblem`, `Parameter`, each backend)
has a table in docs/protocol.md §5 announced by an HTML comment, `<!-- fields: Name -->`,
with the columns | field | type | default | meaning |. This test renders the type and
default of every Struct field in the notation of §5 (caps included: lengths, item and entry
counts, numeric ranges) and compares them with the table's cells, and it checks that each
table lists every field and no other. So a field, a cap or a default cannot change in the
code without the contract changing with it. The `meaning` column is for people and is not
checked.
"""

from __future__ import annotations

import enum
import re
import typing
from pathlib import Path

import msgspec
import pytest
from msgspec import inspect as mi

from protocol import limits
from protocol.exceptions import JobErrorKind, ProblemCode
from protocol.messages import Event, FromSupervisor, FromSwitchboard
from protocol.spec import BackendSpec, ParameterName
from protocol.state import Phase

pytestmark = pytest.mark.unit

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
INT64 = (-(2**63), 2**63 - 1)
_PYTHON_END = "(?!\\n)"

#: Strings with a grammar get the name §3 defines them by: (pattern, min, max length).
NAMED_STRINGS = {
    (limits.ID_PATTERN, None, limits.ID_MAX_LEN): "id",
    (limits.LABEL_KEY_PATTERN, None, None): "label-key",
    (limits.DIGEST_PATTERN, None, None): "digest",
    (limits.INPUT_PATH_PATTERN, None, None): "input-path",
    (limits.OUTPUT_GLOB_PATTERN, None, 256): "output-glob",
    (limits.SHA256_HEX_PATTERN, None, None): "sha256-hex",
    (limits.STREAM_PATTERN, None, None): "stream",
    (mi.type_info(ParameterName).pattern, None, None): "param-name",  # type: ignore[attr-defined]
    (r"^[A-Z_]{1,32}$", None, None): "capability",
    (None, None, limits.MESSAGE_MAX_LEN): "text",
}
ENUMS: dict[type, str] = {Phase: "phase", JobErrorKind: "error kind", ProblemCode: "problem code"}
UNIONS = {frozenset(typing.get_args(BackendSpec)): "backend"}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _range(t: mi.IntType | mi.FloatType) -> str:
    """` N..M`, ` >N..M`, ` ≥ N`, ` > N`, ` ≤ M` or ``; int64's own bounds go unsaid."""
    low = t.ge if t.ge is not None and t.ge != INT64[0] else None
    high = t.le if t.le is not None and t.le != INT64[1] else None
    if isinstance(t, mi.FloatType):
        assert t.lt is None, "render `lt` when a field first has one"
    if t.gt is not None:
        return f" >{_number(t.gt)}..{_number(high)}" if high is not None else f" > {_number(t.gt)}"
    if low is not None and high is not None:
        return f" {_number(low)}..{_number(high)}"
    if low is not None:
        return f" ≥ {_number(low)}"
    if high is not None:
        return f" ≤ {_number(high)}"
    return ""


def _count(low: int | None, high: int | None, unit: str) -> str:
    if low and high is not None:
        return f", {low}..{high} {unit}"
    if high is not None:
        return f", ≤ {high} {unit}"
    assert not low, f"render a lone minimum of {unit} when a field first has one"
    return ""


def _length(low: int | None, high: int | None) -> str:
    if low and high is not None:
        return f" {low}..{high}"
    if high is not None:
        return f" ≤ {high}"
    assert not low, "render a lone minimum length when a field first has one"
    return ""


def render_type(t: mi.Type) -> str:
    """The type cell for `t`, in the notation of docs/protocol.md §5."""
    if isinstance(t, mi.Metadata):
        return render_type(t.type)
    if isinstance(t, mi.UnionType):
        members = [m for m in t.types if not isinstance(m, mi.NoneType)]
        nullable = " or null" if len(members) < len(t.types) else ""
        if len(members) == 1:
            return render_type(members[0]) + nullable
        classes = frozenset(m.cls for m in members if isinstance(m, mi.StructType))
        return UNIONS[classes] + nullable
    if isinstance(t, mi.StrType):
        key = (t.pattern, t.min_length, t.max_length)
        if key in NAMED_STRINGS:
            return NAMED_STRINGS[key]
        assert t.pattern is None, f"name the grammar {t.pattern} in §3 and NAMED_STRINGS"
        return "string" + _length(t.min_length, t.max_length)
    if isinstance(t, mi.BytesType):
        return "bytes" + _length(t.min_length, t.max_length)
    if isinstance(t, mi.IntType):
        return "int" + _range(t)
    if isinstance(t, mi.FloatType):
        return "float" + _range(t)
    if isinstance(t, mi.BoolType):
        return "bool"
    if isinstance(t, mi.LiteralType):
        return " | ".join(f'"{v}"' for v in t.values)
    if isinstance(t, mi.EnumType):
        return ENUMS[t.cls]
    if isinstance(t, mi.StructType):
        return t.cls.__name__
    if isinstance(t, mi.ListType):
        return f"[{render_type(t.item_type)}]" + _count(t.min_length, t.max_length, "items")
    if isinstance(t, mi.DictType):
        inner = f"{{{render_type(t.key_type)}: {render_type(t.value_type)}}}"
        return inner + _count(t.min_length, t.max_length, "entries")
    raise AssertionError(f"no notation for {t!r}")


def render_default(field: mi.Field) -> str:
    if field.required:
        return "required"
    value = field.default if field.default is not msgspec.NODEFAULT else field.default_factory()
    if isinstance(value, enum.Enum):
        value = value.value
    return f"`{msgspec.json.encode(value).decode()}`"


# --- reading the doc -------------------------------------------------------------------

_MARK = re.compile(r"^<!-- fields: ([A-Za-z ]+) -->$")


def _cells(line: str) -> list[str]:
    inner = line.strip()
    assert inner.startswith("|") and inner.endswith("|"), line
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner[1:-1])]


def doc_tables() -> dict[str, dict[str, tuple[str, str]]]:
    """Struct name -> {field: (type cell, default cell)} for every announced table."""
    lines = DOC.read_text().splitlines()
    tables: dict[str, dict[str, tuple[str, str]]] = {}
    for number, line in enumerate(lines):
        mark = _MARK.match(line)
        if not mark:
            continue
        rows = []
        for following in lines[number + 1 :]:
            if following.startswith("|"):
                rows.append(_cells(following))
            elif rows:
                break
        header, _separator, *body = rows
        assert header == ["field", "type", "default", "meaning"], (mark[0], header)
        table = {}
        for field, type_, default, _meaning in body:
            name = field.strip("`")
            assert name not in table, f"{mark[0]}: {name} listed twice"
            table[name] = (type_, default)
        for struct in mark[1].split():
            assert struct not in tables, f"two tables for {struct}"
            tables[struct] = table
    return tables


def wire_structs() -> dict[str, mi.StructType]:
    """Every Struct a message on the wire may hold, by name (the messages included)."""
    found: dict[str, mi.StructType] = {}

    def walk(t: mi.Type) -> None:
        if isinstance(t, mi.StructType):
            if t.cls.__name__ not in found:
                found[t.cls.__name__] = t
                for f in t.fields:
                    walk(f.type)
        elif isinstance(t, mi.UnionType):
            for m in t.types:
                walk(m)
        elif isinstance(t, mi.Metadata):
            walk(t.type)
        elif isinstance(t, mi.ListType):
            walk(t.item_type)
        elif isinstance(t, mi.DictType):
            walk(t.key_type)
            walk(t.value_type)

    for union in mi.multi_type_info([FromSupervisor, FromSwitchboard]):
        walk(union)
    return found


EVENT_FIELDS = {f.name for f in mi.type_info(Event).fields}  # type: ignore[attr-defined]


def expected_rows(info: mi.StructType) -> dict[str, tuple[str, str]]:
    rows = {f.encode_name: (render_type(f.type), render_default(f)) for f in info.fields}
    if issubclass(info.cls, Event):  # the common fields are a table of their own
        rows = {k: v for k, v in rows.items() if k not in EVENT_FIELDS}
        rows = {"(event fields)": ("", ""), **rows}
    return rows


# --- the checks ------------------------------------------------------------------------


def test_every_wire_object_has_a_table() -> None:
    tables = doc_tables()
    missing = sorted(set(wire_structs()) - set(tables))
    assert not missing, f"docs/protocol.md §5 has no `<!-- fields: NAME -->` table for {missing}"
    assert "Event" in tables
    unknown = sorted(set(tables) - set(wire_structs()) - {"Event"})
    assert not unknown, f"tables announce {unknown}, which no message holds"


@pytest.mark.parametrize("name", sorted(wire_structs()))
def test_table_matches_the_struct(name: str) -> None:
    table = doc_tables().get(name)
    if table is None:
        pytest.fail(f"no table for {name}")
    expected = expected_rows(wire_structs()[name])
    undocumented = [k for k in expected if k not in table]
    assert not undocumented, f"{name}: document {undocumented}: " + "; ".join(
        f"| `{k}` | {expected[k][0]} | {expected[k][1]} | ... |" for k in undocumented
    )
    stale = [k for k in table if k not in expected]
    assert not stale, f"{name}: the table lists {stale}, which the Struct has not"
    for field, (type_, default) in expected.items():
        assert table[field] == (type_, default), (
            f"{name}.{field}: the doc says {table[field]}, the code ({type_!r}, {default!r})"
        )


def test_common_event_fields_table() -> None:
    table = doc_tables()["Event"]
    info = mi.type_info(Event)
    assert isinstance(info, mi.StructType)
    assert table == {f.encode_name: (render_type(f.type), render_default(f)) for f in info.fields}


def test_named_grammars_are_spelled_out_in_section_3() -> None:
    text = DOC.read_text()
    section = text[text.index("## 3. ") : text.index("## 4. ")]
    for (pattern, _, _), name in NAMED_STRINGS.items():
        if pattern is None:
            continue
        assert f"`{pattern.removesuffix(_PYTHON_END)}`" in section, f"§3: the regex of {name}"
        assert f"`{name}`" in section, f"§3 does not define `{name}`"


def test_the_renderer_sees_caps() -> None:
    # The checks above are only as good as this: a cap changed in code changes the cell.
    class Probe(msgspec.Struct):
        a: typing.Annotated[str, msgspec.Meta(max_length=7)]
        b: typing.Annotated[list[int], msgspec.Meta(min_length=1, max_length=3)] = []
        c: typing.Annotated[float, msgspec.Meta(gt=0, le=9)] | None = None

    fields = {f.name: f for f in mi.type_info(Probe).fields}  # type: ignore[attr-defined]
    assert render_type(fields["a"].type) == "string ≤ 7"
    assert render_type(fields["b"].type) == "[int], 1..3 items"
    assert render_type(fields["c"].type) == "float >0..9 or null"
    assert [render_default(f) for f in fields.values()] == ["required", "`[]`", "`null`"]
