"""assignment queue: per-item annotation count kept by triggers, queue and lease indexes

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 16:50:00

`annotation.assign.next_item` must pick "the item closest to completion, then the lowest id" among
100k items in about a millisecond. Counting annotations per item on every request is O(items), so
each item carries `annotation_count`, and the index (project_id, annotation_count, id) turns the
choice into a short ordered index range scan per count level.

The count is kept by database triggers on `annotations`, not by Python code, so that every writer
(the assignment API, `annotation.io` imports, deletes cascading from items, a person in a
SQL shell) keeps it right. Caution for later migrations: on SQLite, a batch migration that
recreates the `annotations` table drops its triggers; such a migration must call
`create_count_triggers` again (test_annotation_count_is_kept_by_the_database_for_every_writer in
tests/test_assign.py fails if the triggers are missing).
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


SQLITE_TRIGGERS = (
    """CREATE TRIGGER trg_annotations_count_insert AFTER INSERT ON annotations
    BEGIN UPDATE items SET annotation_count = annotation_count + 1 WHERE id = NEW.item_id; END""",
    """CREATE TRIGGER trg_annotations_count_delete AFTER DELETE ON annotations
    BEGIN UPDATE items SET annotation_count = annotation_count - 1 WHERE id = OLD.item_id; END""",
    """CREATE TRIGGER trg_annotations_count_move AFTER UPDATE OF item_id ON annotations
    WHEN NEW.item_id IS NOT OLD.item_id
    BEGIN
      UPDATE items SET annotation_count = annotation_count - 1 WHERE id = OLD.item_id;
      UPDATE items SET annotation_count = annotation_count + 1 WHERE id = NEW.item_id;
    END""",
)

POSTGRES_TRIGGERS = (
    """CREATE OR REPLACE FUNCTION items_annotation_count() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF TG_OP = 'UPDATE' AND NEW.item_id IS NOT DISTINCT FROM OLD.item_id THEN
        RETURN NULL;
      END IF;
      IF TG_OP IN ('DELETE', 'UPDATE') THEN
        UPDATE items SET annotation_count = annotation_count - 1 WHERE id = OLD.item_id;
      END IF;
      IF TG_OP IN ('INSERT', 'UPDATE') THEN
        UPDATE items SET annotation_count = annotation_count + 1 WHERE id = NEW.item_id;
      END IF;
      RETURN NULL;
    END $$""",
    """CREATE TRIGGER trg_annotations_count AFTER INSERT OR DELETE OR UPDATE OF item_id ON annotations
    FOR EACH ROW EXECUTE FUNCTION items_annotation_count()""",
)


def create_count_triggers() -> None:
    for statement in POSTGRES_TRIGGERS if op.get_bind().dialect.name == "postgresql" else SQLITE_TRIGGERS:
        op.execute(statement)


def drop_count_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS trg_annotations_count ON annotations")
        op.execute("DROP FUNCTION IF EXISTS items_annotation_count()")
    else:
        for name in ("insert", "delete", "move"):
            op.execute(f"DROP TRIGGER IF EXISTS trg_annotations_count_{name}")


def upgrade() -> None:
    with op.batch_alter_table('items', schema=None) as batch_op:
        batch_op.add_column(sa.Column('annotation_count', sa.Integer(), server_default='0', nullable=False))
        batch_op.create_index('ix_items_queue', ['project_id', 'annotation_count', 'id'], unique=False)

    with op.batch_alter_table('assignments', schema=None) as batch_op:
        batch_op.create_index('ix_assignments_annotator_leased', ['annotator_id', 'leased_until'], unique=False)

    # Items annotated before this migration (imports) start with their true count.
    op.execute(
        "UPDATE items SET annotation_count = "
        "(SELECT count(*) FROM annotations WHERE annotations.item_id = items.id)"
    )
    create_count_triggers()


def downgrade() -> None:
    drop_count_triggers()
    with op.batch_alter_table('assignments', schema=None) as batch_op:
        batch_op.drop_index('ix_assignments_annotator_leased')

    with op.batch_alter_table('items', schema=None) as batch_op:
        batch_op.drop_index('ix_items_queue')
        batch_op.drop_column('annotation_count')
