"""Propagation jobs ("refine with names") of finished runs.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 22:10:00.000000
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('refinements',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('stage', sa.String(length=32), nullable=True),
    sa.Column('progress', sa.Float(), nullable=False),
    sa.Column('mapping_version', sa.Integer(), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('owner', sa.String(length=200), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_refinements_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_refinements'))
    )
    with op.batch_alter_table('refinements', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_refinements_run_id'), ['run_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_refinements_status'), ['status'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('refinements', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_refinements_status'))
        batch_op.drop_index(batch_op.f('ix_refinements_run_id'))
    op.drop_table('refinements')
