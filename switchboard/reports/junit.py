"""JUnit XML reports, parsed into test cases, safely, from bytes nobody vouches for.

A report is whatever a job wrote, so it is parsed as hostile input:

- through defusedxml, which refuses any DTD: no entity can be declared, so none can
  expand (billion laughs, quadratic blowup) and none can reach outside (external entities,
  DTD fetches);
- after a size check: a report over `max_bytes` is refused before a byte of it is parsed;
- incrementally (iterparse), each element dropped from the tree once read, so memory
  follows the report's deepest path, not its length; nesting deeper than MAX_DEPTH (no
  real report comes close) is refused as it is read;
- into at most `max_cases` test cases, with names and messages clipped.

A refusal is a ReportRefused naming the cap or the fault; nothing else escapes.
The dialects read are those test runners write: a <testsuites> root or a bare <testsuite>,
suites nested in suites, <testcase classname= name= time=> holding <failure>, <error> or
<skipped> (their message= and text make the case's message). <system-out>, <system-err>,
<properties> and anything else are skipped. A case's suite is its innermost <testsuite>.

Parsing is CPU work (seconds for a report near the size cap): on the event loop, await
switchboard.reports.worker.parse_report, which runs it in a child process.
"""

from __future__ import annotations

import io
import math
from xml.etree.ElementTree import Element, ParseError

import msgspec
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import iterparse

from switchboard.models import TEST_RESULTS, TestCase, TestCounts, TestResult

#: Defaults of the caps (the switchboard's settings may pass others): a report larger than
#: this is refused unparsed ...
MAX_REPORT_BYTES = 32 * 1024 * 1024
#: ... one with more test cases is refused ...
MAX_TEST_CASES = 100_000
#: ... and a case's message is clipped to this many characters.
MAX_MESSAGE_CHARS = 4096
#: Suite, class and case names are clipped to this many characters.
MAX_NAME_CHARS = 1024
#: Elements nested deeper than this are refused (real reports nest a few levels).
MAX_DEPTH = 64

#: A case's result, from the elements it holds; holding several, the highest _RANK wins
#: (a test that failed and then erred in its teardown failed).
_RESULT_OF: dict[str, TestResult] = {"failure": "failed", "error": "error", "skipped": "skipped"}
_RANK: dict[TestResult, int] = {"passed": 0, "skipped": 1, "error": 2, "failed": 3}
_ROOTS = ("testsuites", "testsuite")


class ReportRefused(Exception):
    """A report not parsed: `kind` is a word for metrics (too_large, too_many_cases,
    too_deep, dtd, not_xml, not_junit), `reason` says what was wrong, for people."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


#: Every kind of refusal (metrics count each).
REFUSAL_KINDS = (
    "too_large",
    "too_many_cases",
    "too_deep",
    "dtd",
    "not_xml",
    "not_junit",
    "crashed",
)


class Report(msgspec.Struct, frozen=True):
    """A parsed report: its cases in report order, counted by result, and their total
    duration in seconds (of the cases that give one)."""

    cases: list[TestCase]
    counts: TestCounts
    duration_s: float


def clip(text: str, cap: int) -> str:
    """`text`, at most `cap` characters: a clipped one ends with "…"."""
    return text if len(text) <= cap else text[: max(cap - 1, 0)] + "…"


def _local(tag: object) -> str:
    """An element's name without its namespace."""
    return tag.rpartition("}")[2] if isinstance(tag, str) else ""


def _seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class _OpenCase:
    """A <testcase> being read: its result so far."""

    __slots__ = ("attrs", "depth", "message", "result")

    def __init__(self, attrs: dict[str, str], depth: int) -> None:
        self.attrs = attrs
        self.depth = depth
        self.result: TestResult = "passed"
        self.message: str | None = None


def _message(elem: Element, cap: int) -> str | None:
    """A <failure>/<error>/<skipped>'s message= and text, joined, clipped (None: neither)."""
    parts = [(elem.get("message") or "").strip(), (elem.text or "").strip()]
    if parts[0] and parts[0] == parts[1]:
        parts.pop()
    text = "\n\n".join(p for p in parts if p)
    return clip(text, cap) if text else None


def counts_of(cases: list[TestCase]) -> TestCounts:
    by = dict.fromkeys(TEST_RESULTS, 0)
    for case in cases:
        by[case.result] += 1
    return TestCounts(**by, total=len(cases))


def parse_junit(
    data: bytes,
    *,
    max_bytes: int = MAX_REPORT_BYTES,
    max_cases: int = MAX_TEST_CASES,
    max_message: int = MAX_MESSAGE_CHARS,
) -> Report:
    """Parse a JUnit XML report; raise ReportRefused if it is not one, or is over a cap.
    Blocking: see parse_report."""
    if len(data) > max_bytes:
        raise ReportRefused(
            "too_large",
            f"the report is {len(data)} bytes, over the cap of {max_bytes} bytes: not parsed",
        )
    if not data.strip():
        raise ReportRefused("not_xml", "the report is empty")
    try:
        return _parse(data, max_cases, max_message)
    except DefusedXmlException as exc:
        raise ReportRefused(
            "dtd",
            f"the report declares a DTD or entities ({type(exc).__name__}), which a report"
            " may not: refused unexpanded",
        ) from None
    except ParseError as exc:
        raise ReportRefused("not_xml", f"the report is not well-formed XML: {exc}") from None
    except (LookupError, ValueError) as exc:
        # An encoding declaration Python has no codec for, or one expat can't take
        # (multi-byte codecs).
        raise ReportRefused("not_xml", f"the report's encoding can't be read: {exc}") from None


def _parse(data: bytes, max_cases: int, max_message: int) -> Report:
    cases: list[TestCase] = []
    path: list[Element] = []  # the open elements, root first
    suites: list[str] = []  # the names of the open <testsuite>s
    case: _OpenCase | None = None
    duration = 0.0
    events = iterparse(io.BytesIO(data), events=("start", "end"), forbid_dtd=True)
    for event, elem in events:
        tag = _local(elem.tag)
        if event == "start":
            path.append(elem)
            depth = len(path)
            if depth == 1 and tag not in _ROOTS:
                raise ReportRefused(
                    "not_junit",
                    f"the report's root element is <{clip(tag, 64)}>, not <testsuites> or"
                    " <testsuite>: not a JUnit report",
                )
            if depth > MAX_DEPTH:
                raise ReportRefused(
                    "too_deep", f"the report nests elements deeper than {MAX_DEPTH} levels"
                )
            if tag == "testsuite" and case is None:
                suites.append(clip(elem.get("name") or "", MAX_NAME_CHARS))
            elif tag == "testcase" and case is None:
                if len(cases) >= max_cases:
                    raise ReportRefused(
                        "too_many_cases",
                        f"the report holds more than {max_cases} test cases, the most one"
                        " report may",
                    )
                case = _OpenCase(dict(elem.attrib), depth)
            continue
        # "end": the element is complete; read what counts, then drop it from the tree.
        depth = len(path)
        path.pop()
        if case is not None and depth == case.depth + 1 and tag in _RESULT_OF:
            result = _RESULT_OF[tag]
            if _RANK[result] > _RANK[case.result]:
                case.result = result
                case.message = _message(elem, max_message)
        elif case is not None and depth == case.depth:
            seconds = _seconds(case.attrs.get("time"))
            duration += seconds or 0.0
            cases.append(
                TestCase(
                    suite=suites[-1] if suites else "",
                    classname=clip(case.attrs.get("classname") or "", MAX_NAME_CHARS),
                    name=clip(case.attrs.get("name") or "", MAX_NAME_CHARS),
                    result=case.result,
                    duration_s=seconds,
                    message=case.message,
                )
            )
            case = None
        elif tag == "testsuite" and case is None and suites:
            suites.pop()
        if path:
            # The parser may have read past this element (siblings after it), but every
            # earlier sibling is gone: it is at the front, and removing it is cheap.
            path[-1].remove(elem)
    return Report(cases, counts_of(cases), duration)
