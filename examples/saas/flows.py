"""The example app: a small SaaS with signups, logins and purchases.

segflow.toml at the repository root points at this file (``[daemon] app``).
"""

from __future__ import annotations

from sqlalchemy import func, select

from segflowd import Segflow, ago
from segflowd.schema import events, users

app = Segflow(templates="templates")


@app.segment("new-users", refresh="1h")
def new_users():
    """Signed up in the last 7 days."""
    return select(users.c.id).where(users.c.created_at >= ago(days=7))


@app.segment("big-spenders")
def big_spenders():
    """Spent more than 1000 in total."""
    amount = events.c.attributes["amount"].as_float()
    return (
        select(users.c.id)
        .join(events, events.c.user_id == users.c.id)
        .where(events.c.name == "purchase")
        .group_by(users.c.id)
        .having(func.sum(amount) > 1000)
    )


app.segment(
    "inactive-users",
    refresh="15m",
    sql="SELECT user_id AS id FROM events WHERE name = 'login' AND user_id IS NOT NULL "
        "GROUP BY user_id HAVING MAX(created_at) < :cutoff",
    params={"cutoff": ago(days=30)},
)


@app.campaign("onboarding", segments=["new-users"], behavior="static")
def onboarding(ctx, rt):
    yield rt.send_email("welcome")
    yield rt.wait(days=1)
    if not ctx.user.get("profile_completed"):
        yield rt.send_email("complete-profile-reminder")
        yield rt.wait(days=3)
    yield rt.send_email("feature-highlights")


@app.campaign("winback", segments=["inactive-users"], exclude=["big-spenders"],
              behavior="dynamic")
def winback(ctx, rt):
    for days in (1, 2, 4):
        yield rt.send_email("we-miss-you", attempt=days)
        yield rt.wait(days=days)


app.template("welcome", subject="Welcome {{ user.name }}!", html="welcome.html")
app.template("complete-profile-reminder", subject="Finish setting up your profile",
             html="complete-profile.html")
app.template("feature-highlights", subject="Three things to try this week",
             html="feature-highlights.html")
app.template("we-miss-you", subject="We miss you, {{ user.name }}", html="we-miss-you.html")
app.template("password-reset", subject="Reset your password", html="password-reset.html")

app.transaction("password-reset", event="reset_password_requested", template="password-reset")
