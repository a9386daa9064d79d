"""login sessions and failed-login records

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 01:00:00

`login_sessions`: one row per browser login, so that a login survives a reload (the browser keeps
a random token in a cookie; only its SHA-256 is stored here) and can be revoked on the server:
logging out revokes it, and a password reset, a role change or a deactivation invalidates it
(the row's `stamp` no longer matches the user's). Several app processes share them through the
database, so a sticky load balancer is not even needed for the login.

`login_failures`: failed password checks by username and by client address, counted over a
window to throttle guessing (annotation.sessions), again shared by every app process.
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "login_sessions",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("stamp", sa.String(64), nullable=False),
        sa.Column("client", sa.String(64)),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
        sa.Column("revoked_at", sa.DateTime),
    )
    op.create_index("ix_login_sessions_user", "login_sessions", ["user_id"])
    op.create_table(
        "login_failures",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("username", sa.String(128), nullable=False),
        sa.Column("client", sa.String(64), nullable=False),
        sa.Column("at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_login_failures_username_at", "login_failures", ["username", "at"])
    op.create_index("ix_login_failures_client_at", "login_failures", ["client", "at"])


def downgrade() -> None:
    op.drop_table("login_failures")
    op.drop_table("login_sessions")
