"""Corrected masks imported from an annotation tool (stego_app.corrections).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 03:20:00.000000
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('corrections',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('label_id', sa.Integer(), nullable=False),
    sa.Column('rle', sa.JSON(), nullable=False),
    sa.Column('area', sa.Integer(), nullable=False),
    sa.Column('source', sa.String(length=1000), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_corrections_image_id_images'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['label_id'], ['labels.id'], name=op.f('fk_corrections_label_id_labels'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_corrections_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_corrections')),
    sa.UniqueConstraint('run_id', 'image_id', 'label_id', name='uq_corrections_run_image_label')
    )
    with op.batch_alter_table('corrections', schema=None) as batch_op:
        batch_op.create_index('ix_corrections_run_image', ['run_id', 'image_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_corrections_image_id'), ['image_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_corrections_label_id'), ['label_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('corrections', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_corrections_label_id'))
        batch_op.drop_index(batch_op.f('ix_corrections_image_id'))
        batch_op.drop_index('ix_corrections_run_image')
    op.drop_table('corrections')
