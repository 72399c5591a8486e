"""merge job run results

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 12:09:41.291850

What a run found, kept on the job: the retained energy of re-factoring/truncation and run warnings.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('merge_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('retained_energy', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('run_warnings', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), server_default='[]', nullable=False))



def downgrade() -> None:
    with op.batch_alter_table('merge_jobs', schema=None) as batch_op:
        batch_op.drop_column('run_warnings')
        batch_op.drop_column('retained_energy')

