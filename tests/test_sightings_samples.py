"""The users and Call-IDs of a sighting, kept packed in one string, read back exactly as the
tuples ``sampled`` builds: same values, same order, same bound, whatever the values hold."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from hepsub_apiban.apiban.lookups import LookupService
from hepsub_apiban.apiban.mirror import Mirror
from hepsub_apiban.core.addresses import Addr, NetworkSet
from hepsub_apiban.formats.sip import SipInfo
from hepsub_apiban.ingest.sightings import (
    CALL_ID_SAMPLE,
    CALLS,
    USER_SAMPLE,
    USERS,
    Sighting,
    Sightings,
    sampled,
)

SENDER, RECEIVER = "80.4.4.4", "80.2.2.2"

# Short values from a small alphabet so that values repeat, contain each other and hold the
# separators; a few long ones that ``sampled`` cuts.
values = st.one_of(
    st.none(),
    st.text(alphabet=["a", "b", "1", USERS, CALLS, "\x00", "\n", "é", "\U0001f4a3"], max_size=6),
    st.text(alphabet=["a", USERS, "é"], min_size=120, max_size=140),
)


def store() -> Sightings:
    mirror = Mirror()
    mirror.last_full_sync = 1.0
    return Sightings(LookupService(None, NetworkSet(), mirror=mirror), capacity=10)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(values, values, st.booleans()), max_size=40))
# A value holding its separator would be found enclosed where two kept values stand side by side.
@example([("a", "a", False), ("b", "b", False), (f"a{USERS}b", f"a{CALLS}b", False)])
def test_packed_samples_read_as_the_tuples_sampled_builds(
    packets: list[tuple[str | None, str | None, bool]],
) -> None:
    sightings = store()
    users: tuple[str, ...] = ()
    sender_calls: tuple[str, ...] = ()
    receiver_calls: tuple[str, ...] = ()
    for user, call_id, response in packets:
        info = SipInfo(method="REGISTER", status=200 if response else None, call_id=call_id, from_user=user)
        sightings.record(SENDER, RECEIVER, info, 1.0)
        if not response:  # a response's From user is not the sender's
            users = sampled(users, user, USER_SAMPLE)
        sender_calls = sampled(sender_calls, call_id, CALL_ID_SAMPLE)
        receiver_calls = sampled(receiver_calls, call_id, CALL_ID_SAMPLE)
    if not packets:
        return
    sender, receiver = sightings.get(SENDER), sightings.get(RECEIVER)
    assert sender is not None
    assert receiver is not None
    assert (sender.users, sender.call_ids) == (users, sender_calls)
    assert (receiver.users, receiver.call_ids) == ((), receiver_calls)
    # What a HEP worker sends back (Sightings.add) samples the same way.
    merged = store()
    merged.add(SENDER, 1.0, 1.0, 1, {}, (), sender.users, sender.call_ids)
    copy = merged.get(SENDER)
    assert copy is not None
    assert (copy.users, copy.call_ids) == (users, sender_calls)


@given(st.lists(st.text(max_size=5), max_size=4), st.lists(st.text(max_size=5), max_size=4))
def test_a_sighting_built_or_set_from_tuples_reads_them_back(users: list[str], call_ids: list[str]) -> None:
    clean = str.maketrans({USERS: "\ufffd", CALLS: "\ufffd"})  # the separators cannot be kept
    expected_users = tuple(value.translate(clean) for value in users)
    expected_calls = tuple(value.translate(clean) for value in call_ids)
    built = Sighting("5.6.7.8", Addr("5.6.7.8", 4, 0), 1.0, 2.0, users=tuple(users), call_ids=tuple(call_ids))
    assert (built.users, built.call_ids) == (expected_users, expected_calls)
    set_later = Sighting("5.6.7.8", Addr("5.6.7.8", 4, 0), 1.0, 2.0)
    set_later.call_ids = tuple(call_ids)
    set_later.users = tuple(users)
    assert (set_later.users, set_later.call_ids) == (expected_users, expected_calls)
    assert built.to_json()["users"] == expected_users


def test_the_flags_are_independent() -> None:
    sighting = Sighting("5.6.7.8", Addr("5.6.7.8", 4, 0), 1.0, 2.0)
    assert (sighting.checked, sighting.flagged, sighting.protected) == (False, False, False)
    sighting.flagged = True
    assert (sighting.checked, sighting.flagged, sighting.protected) == (False, True, True)
    sighting.checked = True
    sighting.flagged = False
    assert (sighting.checked, sighting.flagged, sighting.protected) == (True, False, False)


def test_a_full_sample_set_from_tuples_takes_no_more_until_it_is_set_smaller() -> None:
    sightings = store()
    sightings.record(SENDER, RECEIVER, SipInfo(method="OPTIONS", call_id="first"), 1.0)
    sender = sightings.get(SENDER)
    assert sender is not None
    ten = tuple(f"c{n}" for n in range(CALL_ID_SAMPLE))
    sender.call_ids = ten
    sightings.record(SENDER, RECEIVER, SipInfo(method="OPTIONS", call_id="eleventh", from_user="u"), 2.0)
    assert (sender.call_ids, sender.users) == (ten, ("u",))
    sender.call_ids = ten[:-1]
    sightings.record(SENDER, RECEIVER, SipInfo(method="OPTIONS", call_id="tenth"), 3.0)
    assert sender.call_ids == (*ten[:-1], "tenth")
    sightings.record(SENDER, RECEIVER, SipInfo(method="OPTIONS", call_id="eleventh"), 4.0)
    assert sender.call_ids == (*ten[:-1], "tenth")
