"""A seeded customer database (DirectFlow's example schema) for the data source tests."""

from __future__ import annotations

import sqlalchemy as sa

from segflowd.config import NamedTable
from segflowd.sources.pools import Source, open_source

SCHEMA = [
    """CREATE TABLE communities (id integer PRIMARY KEY, community_name text NOT NULL,
       user_count integer NOT NULL, plan_type text NOT NULL, active boolean NOT NULL)""",
    """CREATE TABLE users (id text PRIMARY KEY, email text, phone text, first_name text,
       last_name text, plan_type text NOT NULL, subscription_plan text,
       created_at timestamp NOT NULL, last_login timestamp, metadata jsonb NOT NULL)""",
    """CREATE TABLE memberships (user_id text NOT NULL REFERENCES users(id),
       community_id integer NOT NULL REFERENCES communities(id))""",
    """CREATE TABLE user_profiles (user_id text PRIMARY KEY REFERENCES users(id),
       plan_name text, last_login_at timestamp, total_purchases integer,
       preferred_language text)""",
]

INJECTION = "x' OR '1'='1"  # a profile id that is also a classic injection payload

SEED = [
    """INSERT INTO communities VALUES (1, 'Gardeners', 3, 'pro', true),
       (2, 'Cyclists', 1, 'free', true), (3, 'Archived', 0, 'free', false)""",
    # ada: premium, logged in recently, JSON with preferences; bob: free, long ago;
    # cy has no email (left out of audiences); the injection-id user is plain data.
    """INSERT INTO users VALUES
       ('u-ada', 'ada@example.com', '+100', 'Ada', 'L', 'pro', 'premium',
        now() - interval '400 days', now() - interval '10 days',
        '{"preferred_language": "fr", "settings": {"notifications": "true"},
          "preferences": {"digest": "weekly"}}'),
       ('u-bob', 'bob@example.com', NULL, 'Bob', 'B', 'pro', 'basic',
        now() - interval '300 days', now() - interval '200 days',
        '{"preferred_language": "en", "settings": {"notifications": "false"}}'),
       ('u-cy', NULL, '+300', 'Cy', 'C', 'free', 'premium',
        now() - interval '100 days', now() - interval '1 day', '{}'),
       ('x'' OR ''1''=''1', 'mallory@example.com', NULL, 'Mal', 'M', 'free', 'premium',
        now() - interval '50 days', now() - interval '5 days',
        '{"preferences": {}}')""",
    """INSERT INTO memberships VALUES ('u-ada', 1), ('u-bob', 1), ('u-cy', 1),
       ('x'' OR ''1''=''1', 2)""",
    """INSERT INTO user_profiles VALUES
       ('u-ada', 'Pro yearly', now() - interval '10 days', 12, 'fr'),
       ('u-bob', 'Pro monthly', now() - interval '200 days', 3, 'en'),
       ('x'' OR ''1''=''1', 'Free', NULL, 0, 'de')""",
]

# The example queries of directflow-docs.txt, as written there.
DISCOVERY = """SELECT
id,
community_name,
user_count,
plan_type
FROM communities
WHERE active = true
ORDER BY user_count DESC"""

AUDIENCE = """SELECT
u.id AS profile_id,
u.email,
u.phone,
u.first_name,
u.last_name
FROM users u
JOIN memberships m ON u.id = m.user_id
WHERE m.community_id = '<%= community_id %>'
AND u.email IS NOT NULL"""

PRELOAD = """SELECT
plan_name,
last_login_at,
total_purchases,
preferred_language
FROM user_profiles
WHERE user_id = '<%= profile_id %>'"""

PREMIUM = """SELECT
CASE
WHEN subscription_plan = 'premium' THEN true
ELSE false
END AS result
FROM users
WHERE id = '<%= profile_id %>'
LIMIT 1"""

WINDOW = """SELECT
u.id AS profile_id,
u.email,
ROW_NUMBER() OVER (PARTITION BY u.plan_type ORDER BY u.created_at) as user_rank
FROM users u
WHERE user_rank <= 100"""

WINDOW_WRAPPED = """SELECT * FROM (SELECT
u.id AS profile_id,
u.email,
ROW_NUMBER() OVER (PARTITION BY u.plan_type ORDER BY u.created_at) as user_rank
FROM users u) ranked
WHERE user_rank <= 100"""

JSON_OPS = """SELECT
u.id AS profile_id,
u.email,
u.metadata->>'preferred_language' as language,
(u.metadata->'settings'->>'notifications')::boolean as notifications_enabled
FROM users u
WHERE u.metadata ? 'preferences'"""

DATES = """SELECT
u.id AS profile_id,
u.email,
DATE_TRUNC('month', u.last_login) as login_month
FROM users u
WHERE u.last_login > NOW() - INTERVAL '3 months'"""


def seed_postgres(url: str) -> None:
    """Create and fill the customer schema in the (fresh) database at ``url``."""
    engine = sa.create_engine(sa.engine.make_url(url).set(drivername="postgresql+psycopg2"),
                              poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        for stmt in (*SCHEMA, *SEED):
            conn.exec_driver_sql(stmt.replace("%", "%%"))
    engine.dispose()


def source_for(name: str, url: str, **options: object) -> Source:
    return open_source(NamedTable(name, {"url": url, **options}))
