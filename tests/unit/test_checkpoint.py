"""Which LSN may be confirmed to PostgreSQL: only what Kafka acknowledged, in commit order."""

from cdc.connector.confirm import AckTracker


def test_confirms_a_transaction_only_when_all_its_events_are_acknowledged():
    tracker = AckTracker(100)
    txn = tracker.begin()
    tracker.sent(txn)
    tracker.sent(txn)
    tracker.commit(txn, 200)
    assert tracker.confirmed_lsn == 100
    tracker.acked(txn)
    assert tracker.confirmed_lsn == 100
    tracker.acked(txn)
    assert tracker.confirmed_lsn == 200


def test_a_later_transaction_acknowledged_first_waits_for_the_earlier_one():
    tracker = AckTracker(0)
    first, second = tracker.begin(), None
    tracker.sent(first)
    tracker.commit(first, 10)
    second = tracker.begin()
    tracker.sent(second)
    tracker.commit(second, 20)
    tracker.acked(second)
    assert tracker.confirmed_lsn == 0
    tracker.acked(first)
    assert tracker.confirmed_lsn == 20


def test_acks_before_commit_do_not_confirm_an_open_transaction():
    tracker = AckTracker(0)
    txn = tracker.begin()
    tracker.sent(txn)
    tracker.acked(txn)
    assert tracker.confirmed_lsn == 0
    tracker.commit(txn, 50)
    assert tracker.confirmed_lsn == 50


def test_transactions_without_events_confirm_at_commit():
    tracker = AckTracker(0)
    tracker.commit(tracker.begin(), 70)
    assert tracker.confirmed_lsn == 70


def test_a_failed_delivery_stops_all_further_confirmation():
    tracker = AckTracker(0)
    txn = tracker.begin()
    tracker.sent(txn)
    tracker.sent(txn)
    tracker.commit(txn, 30)
    tracker.acked(txn, RuntimeError("broker down"))
    tracker.acked(txn)
    assert tracker.confirmed_lsn == 0
    assert isinstance(tracker.error, RuntimeError)
    tracker.idle(1000)
    later = tracker.begin()
    tracker.commit(later, 40)
    assert tracker.confirmed_lsn == 0


def test_idle_keepalive_advances_only_with_nothing_in_flight():
    tracker = AckTracker(0)
    tracker.idle(500)
    assert tracker.confirmed_lsn == 500
    txn = tracker.begin()
    tracker.sent(txn)
    tracker.commit(txn, 600)
    tracker.idle(700)  # an unacknowledged transaction below 700: must not skip past it
    assert tracker.confirmed_lsn == 500
    tracker.acked(txn)
    assert tracker.confirmed_lsn == 600
    tracker.idle(400)  # never backwards
    assert tracker.confirmed_lsn == 600


def test_transactions_with_nothing_in_flight_fold_into_the_one_before():
    tracker = AckTracker(0)
    first = tracker.begin()
    tracker.sent(first)
    tracker.commit(first, 10)
    for end in range(20, 1000, 10):  # a broker stall while unpublished transactions stream by
        tracker.commit(tracker.begin(), end)
    assert len(tracker._open) == 1 and tracker.confirmed_lsn == 0
    tracker.acked(first)
    assert tracker.confirmed_lsn == 990
