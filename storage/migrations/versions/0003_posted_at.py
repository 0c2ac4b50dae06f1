"""When a job's outcome was posted to the chat, so the gateway posts answers from every worker
once (added on 2026-12-02). Jobs finished before this revision count as posted.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNPOSTED = "posted_at IS NULL AND status IN ('done', 'failed', 'cancelled', 'timed_out')"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("posted_at", sa.DateTime(timezone=True), nullable=True))
    # Their outcomes were posted (or never will be) by the code before this one: do not post
    # them again on the gateway's first poll.
    op.execute("UPDATE jobs SET posted_at = COALESCE(finished_at, created_at) "
               "WHERE status IN ('done', 'failed', 'cancelled', 'timed_out')")
    op.create_index("ix_jobs_unposted", "jobs", ["platform"], unique=False,
                    sqlite_where=sa.text(UNPOSTED), postgresql_where=sa.text(UNPOSTED))


def downgrade() -> None:
    op.drop_index("ix_jobs_unposted", table_name="jobs")
    op.drop_column("jobs", "posted_at")
