"""Alembic migrations of the registration database, shipped inside the package as
`xmpp_push.schema` (pyproject maps this directory there), so an installed xmpp-push
can upgrade its database without a source checkout: `xmpp-push db upgrade`.

`xmpp_push.storage.migrate` is the way in; `env.py` expects the connection it hands
over. See README.md beside this file for how to add a revision.
"""
