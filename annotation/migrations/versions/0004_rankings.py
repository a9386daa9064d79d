"""rankings: items with 3 to 6 responses, annotations that rank them

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-10 10:00:00

- `items.responses` (JSON, NULL for a pair): [{"text", "source"}, ...] of a ranking item. Pairs
  keep response_a/response_b exactly as before; a ranking item stores "" there (those columns
  are NOT NULL, and making them nullable would mean recreating `items` on SQLite, whose implicit
  DELETE under foreign keys would cascade to every annotation).
- `annotations.ranking` (JSON): each response's rank in stored order; `annotations.shown_order`
  (JSON): the stored indices in the order the annotator saw them; `annotations.choice` becomes
  nullable (a ranking has no choice).
- `assignments.shown_order`: the order a lease shows, copied into the annotation on submit.

Making `choice` nullable recreates `annotations` on SQLite (a batch migration), which drops its
triggers: the annotation-count triggers of 0002 are dropped (if still there) and created again
here, on both databases, so that the count stays kept (test_rankings.py checks it after an
upgrade of a database holding data). Nothing references `annotations`, so recreating it
cascades nowhere. The downgrade deletes ranking items and their annotations first: 0003 has no
place for them.
"""

import importlib.util
from pathlib import Path

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def _queue_migration():
    """Migration 0002's module, for its trigger definitions (kept in one place)."""
    path = Path(__file__).with_name("0002_assignment_queue.py")
    spec = importlib.util.spec_from_file_location("_rlhf_migration_0002", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _recreate_count_triggers() -> None:
    queue = _queue_migration()
    queue.drop_count_triggers()
    queue.create_count_triggers()


def upgrade() -> None:
    with op.batch_alter_table('items', schema=None) as batch_op:
        batch_op.add_column(sa.Column('responses', sa.JSON(), nullable=True))

    with op.batch_alter_table('assignments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('shown_order', sa.JSON(), nullable=True))

    with op.batch_alter_table('annotations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('ranking', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('shown_order', sa.JSON(), nullable=True))
        batch_op.alter_column('choice', existing_type=sa.String(length=16), nullable=True)

    _recreate_count_triggers()


def downgrade() -> None:
    # Deleting fires the count triggers, so the counts stay right for what is left.
    op.execute("DELETE FROM annotations WHERE choice IS NULL")
    op.execute("DELETE FROM items WHERE responses IS NOT NULL")
    with op.batch_alter_table('annotations', schema=None) as batch_op:
        batch_op.alter_column('choice', existing_type=sa.String(length=16), nullable=False)
        batch_op.drop_column('shown_order')
        batch_op.drop_column('ranking')

    # Plain ALTER TABLE (SQLite 3.35+ has DROP COLUMN): a batch migration would recreate `items`,
    # and dropping the old table under foreign keys would cascade to every annotation.
    op.execute("ALTER TABLE assignments DROP COLUMN shown_order")
    op.execute("ALTER TABLE items DROP COLUMN responses")
    _recreate_count_triggers()
