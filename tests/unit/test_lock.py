"""The daemon lock's name on MySQL: per database, within MySQL's 64 characters."""

from __future__ import annotations

from segflowd.lock import MAX_LOCK_NAME, lock_name


def test_a_short_database_name_is_readable_in_the_lock_name() -> None:
    assert lock_name("segflow") == "segflowd:segflow"
    assert lock_name("segflow") != lock_name("segflow_staging")


def test_a_long_database_name_is_hashed_into_64_characters_without_collisions() -> None:
    a, b = "x" * 64, "x" * 63 + "y"
    assert len(lock_name(a)) <= MAX_LOCK_NAME
    assert lock_name(a) != lock_name(b)
    assert lock_name(a) == lock_name(a)
