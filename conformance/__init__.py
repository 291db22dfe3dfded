"""The conformance kit: checks an implementation of the supervisor protocol
(docs/protocol.md) against the document, from the outside.

Two halves, one command (`switchboard-conformance`):

- `supervisor`: a scripted switchboard starts the supervisor under test and drives it
  through the documented scenarios (conformance.check_supervisor);
- `switchboard`: a scripted supervisor connects to a running switchboard and checks how
  it answers (conformance.check_switchboard).

It speaks the wire format through `protocol` (and raw frames where a scenario must send
what the reference encoder never would); it imports nothing of either implementation.
"""
