"""Revisions, one file each, applied in the order their `down_revision` chain says.

A package only so that a regular (non-editable) install carries the files; Alembic
loads them by path and skips this `__init__`.
"""
