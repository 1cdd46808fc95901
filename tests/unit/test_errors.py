"""One error tree: each error's exit code (README's table) and transience come from its kind alone."""

import pytest

from cdc import errors
from cdc.errors import CdcError, exit_code, is_transient

# README, exit codes: 1 runtime, 2 bad input, 3 source connection lost, 4 would lose data, 5 already running
EXIT_CODES = {
    "CdcError": 1, "ConfigError": 2, "SourceError": 2, "SourceLostError": 3, "WouldLoseDataError": 4,
    "AlreadyRunningError": 5, "PublishError": 1, "KafkaLoginError": 2, "EventRefusedError": 1, "DecodeError": 1,
    "SinkError": 1, "TargetError": 1, "TargetLoginError": 2, "SinkConflictError": 5, "SourceHistoryError": 4,
    "KafkaDataMissingError": 4, "RowRejectedError": 1,
}


def _error(name: str) -> CdcError:
    cls = getattr(errors, name)
    return cls(["problem"]) if cls is errors.ConfigError else cls("problem")


@pytest.mark.parametrize("name", sorted(EXIT_CODES))
def test_every_error_exits_with_the_code_of_its_kind(name):
    error = _error(name)
    assert exit_code(error) == error.exit_code == EXIT_CODES[name]
    assert is_transient(error) is (name == "SourceLostError")


def test_an_error_of_no_kind_of_ours_exits_1():
    assert exit_code(RuntimeError("boom")) == 1


def test_no_error_class_inherits_from_two():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, CdcError)]
    assert {c.__name__ for c in classes} == set(EXIT_CODES)
    assert all(len(c.__bases__) == 1 for c in classes)
