"""The JUnit report parser (switchboard/reports/junit.py): the reports real test runners
write, read right; hostile ones (entity bombs, external entities, huge or deep documents,
garbage) refused with a reason, fast, in bounded memory."""

from __future__ import annotations

import os
import time
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchboard.models import TestCounts
from switchboard.reports import junit
from switchboard.reports.junit import ReportRefused, parse_junit
from tests.hostile_xml import BILLION_LAUGHS

pytestmark = pytest.mark.unit

MiB = 1024 * 1024

# What `pytest --junitxml` writes (pytest 8, the default xunit2 family).
PYTEST = b"""<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite \
name="pytest" errors="1" failures="1" skipped="1" tests="5" time="0.081" \
timestamp="2026-12-07T12:00:00.000000+00:00" hostname="ci-7"><testcase \
classname="tests.test_math" name="test_add" time="0.001" /><testcase \
classname="tests.test_math" name="test_div" time="0.002"><failure \
message="assert 0.5 == 2">def test_div():
&gt;       assert 1 / 2 == 2
E       assert 0.5 == 2

tests/test_math.py:9: AssertionError</failure></testcase><testcase \
classname="tests.test_math" name="test_skip" time="0.000"><skipped type="pytest&#46;skip" \
message="needs a board">/src/tests/test_math.py:12: needs a board</skipped></testcase>\
<testcase classname="tests.test_math" name="test_fixture" time="0.003"><error \
message="failed on setup with &quot;OSError: no device&quot;">@pytest.fixture
    def device():
&gt;       raise OSError("no device")
E       OSError: no device</error></testcase><testcase classname="tests.test_math" \
name="test_unicode[\xc3\xa9]" time="0.010"><system-out>printed \xe2\x9c\x93</system-out>\
</testcase></testsuite></testsuites>"""

# What Maven Surefire writes for a JUnit 5 class: a bare <testsuite>, with properties.
SUREFIRE = b"""<?xml version="1.0" encoding="UTF-8"?>
<testsuite xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" \
xsi:noNamespaceSchemaLocation="https://maven.apache.org/surefire/maven-surefire-plugin/\
xsd/surefire-test-report-3.0.xsd" version="3.0" name="com.example.CalculatorTest" \
time="0.042" tests="3" errors="0" skipped="1" failures="1">
  <properties>
    <property name="java.version" value="21.0.2"/>
    <property name="os.name" value="Linux"/>
  </properties>
  <testcase name="adds" classname="com.example.CalculatorTest" time="0.012"/>
  <testcase name="divides" classname="com.example.CalculatorTest" time="0.020">
    <failure message="expected: &lt;2&gt; but was: &lt;0&gt;" \
type="org.opentest4j.AssertionFailedError"><![CDATA[org.opentest4j.AssertionFailedError: \
expected: <2> but was: <0>
	at com.example.CalculatorTest.divides(CalculatorTest.java:21)
]]></failure>
    <system-out><![CDATA[dividing 1 by 2
]]></system-out>
  </testcase>
  <testcase name="later" classname="com.example.CalculatorTest" time="0">
    <skipped message="not yet"/>
  </testcase>
</testsuite>
"""

# What go-junit-report (v2) writes from `go test -v`.
GO = b"""<?xml version="1.0" encoding="UTF-8"?>
<testsuites tests="3" failures="1">
	<testsuite name="example.com/fw/flash" tests="3" failures="1" errors="0" id="0" \
hostname="ci-7" time="0.015" timestamp="2026-12-07T12:00:00Z">
		<properties>
			<property name="go.version" value="go1.22.1 linux/amd64"></property>
		</properties>
		<testcase name="TestErase" classname="example.com/fw/flash" time="0.001"></testcase>
		<testcase name="TestWrite/page_0" classname="example.com/fw/flash" time="0.010">
			<failure message="Failed"><![CDATA[    flash_test.go:42: wrote 0x00, \
read 0xff]]></failure>
		</testcase>
		<testcase name="TestVerify" classname="example.com/fw/flash" time="0.000">
			<skipped message="Skipped"><![CDATA[    flash_test.go:60: no board attached]]></skipped>
		</testcase>
	</testsuite>
</testsuites>
"""

# What `ctest --output-junit` writes (CMake 3.21+).
CTEST = b"""<?xml version="1.0" encoding="UTF-8"?>
<testsuite name="Linux-c++"
	tests="3"
	failures="1"
	disabled="1"
	skipped="0"
	hostname=""
	time="0"
	timestamp="2026-12-07T12:00:00"
	>
	<testcase name="unit_crc" classname="unit_crc" time="0.00412" status="run">
		<system-out>crc ok</system-out>
	</testcase>
	<testcase name="unit_uart" classname="unit_uart" time="0.1301" status="fail">
		<failure message="Failed"/>
		<system-out>uart: timeout after 100 ms</system-out>
	</testcase>
	<testcase name="hw_adc" classname="hw_adc" time="0" status="disabled">
		<skipped message="Disabled"/>
	</testcase>
</testsuite>
"""


def _results(data: bytes) -> list[tuple[str, str, str]]:
    return [(c.suite, c.name, c.result) for c in parse_junit(data).cases]


def test_pytest_report():
    report = parse_junit(PYTEST)
    assert [(c.classname, c.name, c.result) for c in report.cases] == [
        ("tests.test_math", "test_add", "passed"),
        ("tests.test_math", "test_div", "failed"),
        ("tests.test_math", "test_skip", "skipped"),
        ("tests.test_math", "test_fixture", "error"),
        ("tests.test_math", "test_unicode[é]", "passed"),
    ]
    assert {c.suite for c in report.cases} == {"pytest"}
    div = report.cases[1]
    assert div.duration_s == 0.002
    assert div.message is not None
    assert div.message.startswith("assert 0.5 == 2\n\ndef test_div():\n>       assert 1 / 2 == 2")
    assert report.cases[2].message == "needs a board\n\n/src/tests/test_math.py:12: needs a board"
    assert report.cases[3].message.startswith('failed on setup with "OSError: no device"')
    assert report.cases[0].message is None
    assert report.counts == TestCounts(passed=2, failed=1, error=1, skipped=1, total=5)
    assert report.duration_s == pytest.approx(0.016)


def test_surefire_report():
    report = parse_junit(SUREFIRE)
    assert _results(SUREFIRE) == [
        ("com.example.CalculatorTest", "adds", "passed"),
        ("com.example.CalculatorTest", "divides", "failed"),
        ("com.example.CalculatorTest", "later", "skipped"),
    ]
    message = report.cases[1].message
    assert message is not None
    assert message.startswith("expected: <2> but was: <0>\n\norg.opentest4j.AssertionFailedError")
    assert "CalculatorTest.java:21" in message
    assert report.cases[2].message == "not yet"


def test_go_junit_report():
    report = parse_junit(GO)
    assert _results(GO) == [
        ("example.com/fw/flash", "TestErase", "passed"),
        ("example.com/fw/flash", "TestWrite/page_0", "failed"),
        ("example.com/fw/flash", "TestVerify", "skipped"),
    ]
    assert report.cases[1].message == "Failed\n\nflash_test.go:42: wrote 0x00, read 0xff"
    assert report.counts.total == 3


def test_ctest_report():
    report = parse_junit(CTEST)
    assert _results(CTEST) == [
        ("Linux-c++", "unit_crc", "passed"),
        ("Linux-c++", "unit_uart", "failed"),
        ("Linux-c++", "hw_adc", "skipped"),
    ]
    assert report.cases[1].message == "Failed"
    assert report.cases[1].duration_s == pytest.approx(0.1301)


def test_nested_suites_namespaces_and_odd_values():
    data = b"""<testsuites xmlns="urn:x-test"><testsuite name="outer">
      <testsuite name="inner"><testcase name="a" time="abc"/></testsuite>
      <testcase name="b" time="-1"><failure>f</failure><error message="teardown"/></testcase>
      <testsuite><testcase name="c" time="1e400"/></testsuite>
      <testcase name="d"><rerunFailure message="flaky"/></testcase>
    </testsuite><testcase name="top"/></testsuites>"""
    cases = parse_junit(data).cases
    assert [(c.suite, c.name, c.result) for c in cases] == [
        ("inner", "a", "passed"),
        ("outer", "b", "failed"),  # failed, then erred in teardown: it failed
        ("", "c", "passed"),
        ("outer", "d", "passed"),  # a rerun that passed
        ("", "top", "passed"),
    ]
    assert [c.duration_s for c in cases] == [None, None, None, None, None]
    assert cases[1].message == "f"


def test_messages_and_names_are_clipped():
    long = "x" * 10_000
    data = (
        f'<testsuite name="{"s" * 5000}"><testcase name="{"n" * 5000}">'
        f'<failure message="{long}">{long}</failure></testcase></testsuite>'
    ).encode()
    (case,) = parse_junit(data, max_message=100).cases
    assert case.message is not None and len(case.message) == 100 and case.message.endswith("…")
    assert len(case.name) == len(case.suite) == junit.MAX_NAME_CHARS
    (case,) = parse_junit(data).cases
    assert len(case.message or "") == junit.MAX_MESSAGE_CHARS


def _refused(data: bytes, kind: str, **caps: int) -> str:
    with pytest.raises(ReportRefused) as caught:
        parse_junit(data, **caps)
    assert caught.value.kind == kind, caught.value.reason
    assert caught.value.kind in junit.REFUSAL_KINDS
    return caught.value.reason


def _bounded(data: bytes, kind: str, max_seconds: float, max_bytes: int) -> str:
    """Refused as `kind`, within `max_seconds`, allocating at most `max_bytes` meanwhile."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        reason = _refused(data, kind)
        took = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert took < max_seconds, took
    assert peak < max_bytes, peak
    return reason


def test_billion_laughs_is_refused_fast_in_bounded_memory():
    reason = _bounded(BILLION_LAUGHS, "dtd", max_seconds=1.0, max_bytes=2 * MiB)
    assert "DTD" in reason


def test_external_entities_and_dtds_are_refused_unfetched(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read me")
    xxe = (
        f'<?xml version="1.0"?><!DOCTYPE testsuite [<!ENTITY xxe SYSTEM "file://{secret}">]>'
        '<testsuite name="&xxe;"><testcase name="&xxe;"/></testsuite>'
    ).encode()
    reason = _refused(xxe, "dtd")
    assert "do not read me" not in reason
    # An external DTD (never fetched: the address would refuse a connection anyway).
    _refused(b'<!DOCTYPE testsuite SYSTEM "http://127.0.0.1:9/x.dtd"><testsuite/>', "dtd")
    # A DTD with no entity at all is refused too: a report has no use for one.
    _refused(b"<!DOCTYPE testsuite><testsuite/>", "dtd")


def test_a_100_mib_report_is_refused_by_size_before_parsing():
    case = b'<testcase classname="big" name="t" time="0.001"><system-out>' + b"o" * 900
    case += b"</system-out></testcase>\n"
    chunk = case * (MiB // len(case))
    # Joined once: the list holds the same 1 MiB chunk a hundred times, not 100 MiB.
    data = b"".join([b'<testsuite name="big">', *[chunk] * 100, b"</testsuite>"])
    assert len(data) > 99 * MiB
    reason = _bounded(data, "too_large", max_seconds=0.1, max_bytes=64 * 1024)
    assert f"{len(data)} bytes" in reason and str(junit.MAX_REPORT_BYTES) in reason


def test_a_deep_nesting_bomb_is_refused_as_it_is_read():
    data = b"<testsuites>" + b"<testsuite>" * 1_000_000  # 11 MB, never closed
    reason = _bounded(data, "too_deep", max_seconds=1.0, max_bytes=2 * MiB)
    assert str(junit.MAX_DEPTH) in reason


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"   \n",
        b"PASS: 3 tests\n",
        b"\x00\xff\xfe garbage \x89PNG\r\n",
        os.urandom(4096),
        b"<testsuite><testcase name='a'>",  # cut short
        b'<?xml version="1.0" encoding="no-such-encoding"?><testsuite/>',
    ],
    ids=["empty", "blank", "text", "binary", "random", "truncated", "encoding"],
)
def test_not_xml_is_refused(data):
    assert _refused(data, "not_xml")


def test_xml_that_is_not_junit_is_refused():
    reason = _refused(b"<html><body>tests passed</body></html>", "not_junit")
    assert "<html>" in reason


def test_more_cases_than_the_cap_are_refused():
    data = b"<testsuite>" + b"<testcase name='t'/>" * 4 + b"</testsuite>"
    assert len(parse_junit(data, max_cases=4).cases) == 4
    assert "more than 3 test cases" in _refused(data, "too_many_cases", max_cases=3)


def test_a_big_valid_report_is_read_in_bounded_memory():
    """8 MB of console output inside 800 cases: each element is dropped once read, so the
    parse never holds the document, only the cases it keeps."""
    case = b'<testcase classname="c" name="t"><system-out>' + b"o" * 10_000
    case += b"</system-out></testcase>"
    data = b"<testsuites><testsuite name='s'>" + case * 800 + b"</testsuite></testsuites>"
    tracemalloc.start()
    try:
        report = parse_junit(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.counts.total == 800
    assert peak < 1 * MiB, peak


@pytest.mark.parametrize("encoding", ["shift_jis", "utf-7", "latin-1", "utf-16"])
def test_declared_encodings_are_read_or_refused(encoding):
    data = f'<?xml version="1.0" encoding="{encoding}"?><testsuite><testcase name="é"/>'
    data += "</testsuite>"
    try:
        raw = data.encode(encoding)
    except UnicodeEncodeError:
        raw = data.encode("utf-8")
    try:
        cases = parse_junit(raw).cases
    except ReportRefused as exc:
        assert exc.kind == "not_xml"
    else:
        assert [c.name for c in cases] == ["é"]


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_damaged_reports_parse_or_are_refused_never_crash(data):
    """Any report with bytes cut out, replaced or inserted parses, or is a ReportRefused."""
    raw = bytearray(data.draw(st.sampled_from([PYTEST, SUREFIRE, GO, CTEST])))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw)))
        junk = data.draw(st.binary(max_size=8))
        raw[at : at + data.draw(st.integers(0, 8))] = junk
    try:
        parse_junit(bytes(raw))
    except ReportRefused as exc:
        assert exc.kind in junit.REFUSAL_KINDS and exc.reason
