"""[retention]: durations with a unit, "forever" as the one way to keep forever, defaults,
environment overrides, and errors that name file, key and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from segflowd.config import DAY, RetentionConfig, load_config
from segflowd.errors import ConfigError

MINIMAL = '[daemon]\napp = "app.py:app"\n'


def write(tmp_path: Path, retention: str) -> Path:
    path = tmp_path / "segflow.toml"
    path.write_text(MINIMAL + "[retention]\n" + retention, encoding="utf-8")
    return path


def error_of(path: Path, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ or {})
    return info.value


def test_defaults_keep_events_forever_and_the_rest_for_a_while(tmp_path: Path) -> None:
    r = load_config(write(tmp_path, ""), {}).retention
    assert r == RetentionConfig()
    assert (r.finished_instances, r.segment_changes, r.messages, r.events) == (
        90 * DAY, 90 * DAY, 365 * DAY, None)
    assert (r.interval, r.batch_size) == (3600.0, 1000)


def test_no_retention_table_gets_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "segflow.toml"
    path.write_text(MINIMAL, encoding="utf-8")
    assert load_config(path, {}).retention == RetentionConfig()


@pytest.mark.parametrize(("text", "seconds"), [
    ("1d", DAY), ("36h", 1.5 * DAY), ("90d", 90 * DAY), ("2w", 14 * DAY),
    ("1.5d", 1.5 * DAY), (" 7 d ", 7 * DAY), ("86400s", DAY), ("1440m", DAY),
])
def test_durations_take_a_unit(tmp_path: Path, text: str, seconds: float) -> None:
    r = load_config(write(tmp_path, f'events = "{text}"\ninterval = "15m"\n'), {}).retention
    assert (r.events, r.interval) == (seconds, 900.0)


def test_forever_keeps_forever(tmp_path: Path) -> None:
    r = load_config(write(tmp_path, 'events = "forever"\nmessages = "forever"\n'
                                    'finished_instances = "forever"\n'
                                    'segment_changes = "forever"\n'), {}).retention
    assert (r.finished_instances, r.segment_changes, r.messages, r.events) == (
        None, None, None, None)


def test_environment_overrides_retention_keys(tmp_path: Path) -> None:
    r = load_config(write(tmp_path, 'events = "forever"\n'),
                    {"SEGFLOW_RETENTION_EVENTS": "400d",
                     "SEGFLOW_RETENTION_MESSAGES": "forever",
                     "SEGFLOW_RETENTION_BATCH_SIZE": "500"}).retention
    assert (r.events, r.messages, r.batch_size) == (400 * DAY, None, 500)


@pytest.mark.parametrize(("line", "key", "says"), [
    ("events = 0", "retention.events", 'not an integer'),
    ("events = 90", "retention.events", 'like "90d"'),
    ('events = "never"', "retention.events", '"forever" to keep forever'),
    ('events = "0"', "retention.events", "is not a duration"),
    ('messages = "0d"', "retention.messages", "longer than 0"),
    ('messages = "-5d"', "retention.messages", "is not a duration"),
    ('segment_changes = "12h"', "retention.segment_changes", "at least 1d"),
    ('finished_instances = "90 days"', "retention.finished_instances", "is not a duration"),
    ('finished_instances = true', "retention.finished_instances", "not a boolean"),
    ('interval = "forever"', "retention.interval", "is not a duration"),
    ('interval = "30s"', "retention.interval", "at least 1m"),
    ("batch_size = 0", "retention.batch_size", "between 1 and 10000"),
    ("batch_size = 100000", "retention.batch_size", "between 1 and 10000"),
    ('keep = "1d"', "retention.keep", "unknown key"),
])
def test_bad_values_name_file_key_and_line(tmp_path: Path, line: str, key: str,
                                           says: str) -> None:
    path = write(tmp_path, f"# how long finished data is kept\n{line}\n")
    err = error_of(path)
    assert err.key == key
    assert err.file == str(path)
    assert err.line == 5  # [daemon], app, [retention], the comment, then the line
    assert says in str(err)
    assert str(path) in str(err)


def test_a_bad_environment_override_is_refused_too(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, ""), {"SEGFLOW_RETENTION_EVENTS": "never"})
    assert err.key == "retention.events"
    assert '"forever"' in str(err)
