"""Alembic environment: runs migrations on the connection that annotation.store.init_db hands over,
or on `sqlalchemy.url` when Alembic is called from its own command line."""

from alembic import context
from sqlalchemy import engine_from_config, pool

from annotation.store import Base

config = context.config
target_metadata = Base.metadata


def run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    engine = engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.connect() as conn:
        run(conn)
