"""What a supervisor presents on each connection attempt, row by row of the rules in
connector/credentials.py, with real files (the switchboard's answers are the inputs; the
end-to-end runs are in test_enrolment.py)."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from connector.credentials import Attempt, HostCredentials, NoCredential, Presented
from protocol.tokens import TOKEN_PREFIX

pytestmark = pytest.mark.unit

REGISTRATION = TOKEN_PREFIX + "registration"


def _credentials(tmp_path, configured: str | None = REGISTRATION) -> HostCredentials:
    return HostCredentials("host-1", configured, tmp_path / "credentials")


def _pending(credentials: HostCredentials) -> str:
    assert credentials.pending_path is not None
    return credentials.pending_path.read_text().strip()


def test_a_fresh_host_enrols_with_a_credential_written_first(tmp_path):
    credentials = _credentials(tmp_path)
    first = credentials.next_attempt()
    assert first.presented is Presented.CONFIGURED and first.token == REGISTRATION
    made = _pending(credentials)  # on disk before the switchboard hears of it
    assert made.startswith(TOKEN_PREFIX) and made != REGISTRATION
    assert first.credential_sha256 == hashlib.sha256(made.encode()).hexdigest()
    assert stat.S_IMODE(credentials.pending_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "credentials").stat().st_mode) == 0o700

    credentials.welcomed(first, enrolled=True)
    assert not credentials.pending_path.exists()
    assert credentials.kept() == made and credentials.current == made
    again = credentials.next_attempt()
    assert again == Attempt(Presented.CREDENTIAL, made)
    # A restart reads it back.
    assert _credentials(tmp_path).next_attempt() == Attempt(Presented.CREDENTIAL, made)


def test_a_lost_welcome_is_followed_by_the_credential_itself(tmp_path):
    credentials = _credentials(tmp_path)
    first = credentials.next_attempt()  # stored by the switchboard, the Welcome is lost
    retry = credentials.next_attempt()
    assert retry.presented is Presented.PENDING and retry.token == _pending(credentials)
    assert retry.credential_sha256 is None
    credentials.welcomed(retry, enrolled=False)
    assert credentials.kept() == retry.token
    assert first.credential_sha256 == hashlib.sha256(retry.token.encode()).hexdigest()


def test_an_enrolment_stored_late_is_found_by_presenting_the_credential_again(tmp_path):
    credentials = _credentials(tmp_path)
    credentials.next_attempt()  # cut; the switchboard stores it a moment later
    pending = credentials.next_attempt()
    assert credentials.refused(pending, at_upgrade=True)  # not stored yet
    enrol = credentials.next_attempt()
    assert enrol.presented is Presented.CONFIGURED and enrol.credential_sha256
    assert credentials.refused(enrol, at_upgrade=False)  # "enrolled": stored by now
    retry = credentials.next_attempt()
    assert retry == Attempt(Presented.PENDING, pending.token)
    credentials.welcomed(retry, enrolled=False)
    assert credentials.kept() == pending.token


def test_an_id_enrolled_by_someone_else_is_given_up_after_a_second_refusal(tmp_path):
    credentials = _credentials(tmp_path)
    attempts = []
    while True:
        attempt = credentials.next_attempt()
        attempts.append(attempt.presented)
        # The switchboard: the registration token is valid, the id is enrolled already.
        at_upgrade = attempt.presented is not Presented.CONFIGURED
        if not credentials.refused(attempt, at_upgrade=at_upgrade):
            break
        assert len(attempts) < 10, attempts
    assert attempts == [
        Presented.CONFIGURED,
        Presented.PENDING,
        Presented.CONFIGURED,
    ]


def test_a_revoked_credential_is_dropped_and_the_host_enrols_again(tmp_path):
    credentials = _credentials(tmp_path)
    credentials.welcomed(credentials.next_attempt(), enrolled=True)
    old = credentials.kept()
    presented = credentials.next_attempt()
    assert credentials.refused(presented, at_upgrade=True)  # unenrolled: 401
    assert credentials.kept() is None
    enrol = credentials.next_attempt()
    assert enrol.presented is Presented.CONFIGURED
    credentials.welcomed(enrol, enrolled=True)
    assert credentials.kept() not in (None, old)


def test_without_a_token_to_enrol_with_a_refused_credential_is_kept(tmp_path):
    _credentials(tmp_path).welcomed(_credentials(tmp_path).next_attempt(), enrolled=True)
    alone = _credentials(tmp_path, configured=None)
    attempt = alone.next_attempt()
    assert attempt.presented is Presented.CREDENTIAL
    assert not alone.refused(attempt, at_upgrade=True)  # nothing else to present
    assert alone.kept() == attempt.token  # left for an operator to look at


def test_a_configured_host_credential_is_presented_alone(tmp_path):
    credentials = _credentials(tmp_path, configured=TOKEN_PREFIX + "bound-to-host-1")
    first = credentials.next_attempt()
    assert first.credential_sha256 is not None
    credentials.welcomed(first, enrolled=False)  # a bound token: the digest meant nothing
    assert not credentials.pending_path.exists() and credentials.kept() is None
    later = credentials.next_attempt()
    assert later == Attempt(Presented.CONFIGURED, TOKEN_PREFIX + "bound-to-host-1")
    assert not credentials.refused(later, at_upgrade=True)  # revoked: nothing else to try


def test_an_invalid_configured_token_is_final(tmp_path):
    credentials = _credentials(tmp_path)
    assert not credentials.refused(credentials.next_attempt(), at_upgrade=True)


def test_without_a_directory_the_token_is_presented_as_is(tmp_path):
    credentials = HostCredentials("host-1", REGISTRATION, None)
    assert credentials.next_attempt() == Attempt(Presented.CONFIGURED, REGISTRATION)
    assert list(tmp_path.iterdir()) == []


def test_nothing_to_present_says_so(tmp_path):
    with pytest.raises(NoCredential, match="no token to enrol with"):
        _credentials(tmp_path, configured=None).next_attempt()


def test_a_credential_file_others_may_read_is_refused(tmp_path):
    credentials = _credentials(tmp_path)
    credentials.welcomed(credentials.next_attempt(), enrolled=True)
    assert credentials.credential_path is not None
    credentials.credential_path.chmod(0o640)
    with pytest.raises(NoCredential, match="chmod 600"):
        credentials.next_attempt()
    credentials.credential_path.chmod(0o600)
    (tmp_path / "credentials").chmod(0o755)
    with pytest.raises(NoCredential, match="chmod 700"):
        credentials.next_attempt()


def test_a_write_cut_short_by_a_crash_does_not_block_the_next(tmp_path):
    # A crash between creating the temporary file and renaming it leaves the file behind;
    # in a container the restarted supervisor often has the same pid again.
    credentials = _credentials(tmp_path)
    assert credentials.pending_path is not None
    directory = credentials.pending_path.parent
    directory.mkdir(mode=0o700)
    (directory / f".{credentials.pending_path.name}.{os.getpid()}.tmp").write_bytes(b"sbt_")
    first = credentials.next_attempt()
    assert first.credential_sha256 == hashlib.sha256(_pending(credentials).encode()).hexdigest()
    assert stat.S_IMODE(credentials.pending_path.stat().st_mode) == 0o600
