"""The CLI's error boundary: what a user can fix is one line; a bug keeps its traceback."""

from __future__ import annotations

import errno

import pytest
from pydantic import BaseModel, Field, ValidationError

from reflexarc.errors import INTERRUPTED, USER_ERROR, explain, report
from reflexarc.topics import TopicError


class Spec(BaseModel):
    cpus: int = Field(1, ge=1)


def test_validation_errors_name_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        Spec(cpus=-3)
    assert explain(info.value) == "invalid Spec: cpus: Input should be greater than or equal to 1"


def test_our_errors_keep_their_text_and_builtin_bugs_are_not_explained() -> None:
    assert explain(TopicError("invalid site 'bl 1'")) == "invalid site 'bl 1'"
    assert explain(KeyError("x")) is None
    assert explain(TypeError("bad")) is None


def test_os_errors() -> None:
    exists = FileExistsError(errno.EEXIST, "exists", "/tmp/k.key")
    assert (
        explain(exists) == "/tmp/k.key already exists: choose another path, or pass --force where the command offers it"
    )
    assert explain(FileNotFoundError(errno.ENOENT, "No such file", "a.yaml")) == "no such file or directory: a.yaml"
    assert explain(OSError("plain message")) == "plain message"


def test_report_exit_codes(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RX_DEBUG", raising=False)
    assert report(TopicError("invalid stream 'a b'")) == USER_ERROR
    assert capsys.readouterr().err == "error: invalid stream 'a b'\n"
    assert report(KeyboardInterrupt()) == INTERRUPTED
    try:
        1 / 0  # noqa: B018 - a bug, raised for real so it has a traceback
    except ZeroDivisionError as exc:
        assert report(exc) == 1
    assert "Traceback" in capsys.readouterr().err
