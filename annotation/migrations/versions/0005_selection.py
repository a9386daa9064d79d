"""choosing what to label next: a queue order the reward model sets, and its suggestions

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 03:30:00

- `projects.selection` ('random' or 'uncertainty'), `projects.random_share` (the share of items an
  uncertainty queue hands out at random, for calibration) and `projects.suggestions` (show the
  reward model's preference to annotators; off by default).
- `items.queue_key`: the item's place within its completion level of the queue (0 until a model
  scores it; scored items get negative keys, the least sure most negative). The queue index
  `ix_items_queue` becomes (project_id, annotation_count, queue_key, id), so the next-item query
  is still one ordered range scan whichever selection a project uses.
- `item_scores`: what the scoring job found for each item: the model, P(A preferred), the
  uncertainty, whether the item was drawn at random for calibration, and the key it was given
  (copied into items.queue_key by one UPDATE ... FROM).
- `assignments.suggestion` and `annotations.suggestion`: the model's suggestion shown with a lease
  ('a' or 'b', or for a ranking the stored index of the response the model ranks first), copied
  into the annotation on submit; NULL when none was shown.

Columns are added with plain ALTER TABLE (no batch recreation of `items` or `annotations` on
SQLite: that would drop the annotation-count triggers and, under foreign keys, cascade).
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('projects', sa.Column('selection', sa.String(length=16), nullable=False, server_default='random'))
    op.add_column('projects', sa.Column('random_share', sa.Float(), nullable=False, server_default='0.2'))
    op.add_column('projects', sa.Column('suggestions', sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column('items', sa.Column('queue_key', sa.Float(), nullable=False, server_default='0'))
    op.add_column('annotations', sa.Column('suggestion', sa.String(length=16), nullable=True))
    op.add_column('assignments', sa.Column('suggestion', sa.String(length=16), nullable=True))
    op.drop_index('ix_items_queue', table_name='items')
    op.create_index('ix_items_queue', 'items', ['project_id', 'annotation_count', 'queue_key', 'id'])
    op.create_table(
        'item_scores',
        sa.Column('item_id', sa.Integer(), sa.ForeignKey('items.id', ondelete='CASCADE'), primary_key=True),
        sa.Column('model_id', sa.Integer(), sa.ForeignKey('models.id', ondelete='SET NULL'), nullable=True),
        sa.Column('p_a', sa.Float(), nullable=True),
        sa.Column('top', sa.Integer(), nullable=True),
        sa.Column('uncertainty', sa.Float(), nullable=False),
        sa.Column('measure', sa.String(length=16), nullable=False),
        sa.Column('calibration', sa.Boolean(), nullable=False),
        sa.Column('queue_key', sa.Float(), nullable=True),
        sa.Column('scored_at', sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table('item_scores')
    op.drop_index('ix_items_queue', table_name='items')
    op.create_index('ix_items_queue', 'items', ['project_id', 'annotation_count', 'id'])
    op.execute("ALTER TABLE assignments DROP COLUMN suggestion")
    op.execute("ALTER TABLE annotations DROP COLUMN suggestion")
    op.execute("ALTER TABLE items DROP COLUMN queue_key")
    op.execute("ALTER TABLE projects DROP COLUMN suggestions")
    op.execute("ALTER TABLE projects DROP COLUMN random_share")
    op.execute("ALTER TABLE projects DROP COLUMN selection")
