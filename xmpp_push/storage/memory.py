"""A `RegistrationStore` in memory: for tests, and for trying direct mode without a
database. Nothing survives the process.

It follows the protocol's docstrings (xmpp_push.core.registrations) to the letter, so
that the contract suite the SQL store passes also passes here. Each method runs
without awaiting anything, so it is as atomic as the one transaction the protocol asks
for: no other task sees a half-done enable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from xmpp_push.core.model import Priority
from xmpp_push.core.registrations import (
    EnableOutcome,
    Registration,
    RegistrationRequest,
    RegistrationStore,
    Target,
)

__all__ = ["MemoryStore"]


class MemoryStore:
    """Registrations in a dict keyed by id; ids start at 1 and are never reused."""

    def __init__(self) -> None:
        self._rows: dict[int, Registration] = {}
        self._last_id = 0

    async def enable(
        self, request: RegistrationRequest, *, max_per_owner: int, now: float
    ) -> EnableOutcome:
        existing = self._find(request.owner, request.push_jid, request.node)
        if existing is None:
            self._last_id += 1
            row = Registration(
                id=self._last_id,
                owner=request.owner,
                push_jid=request.push_jid,
                node=request.node,
                target=request.target,
                token=request.token,
                topic=request.topic,
                mode=request.mode,
                client_priority=request.priority,
                operator_priority=None,
                client_silent=request.silent,
                operator_silent=None,
                voip_token=request.voip_token,
                resource=request.resource,
                secret=request.secret,
                options=dict(request.options),
                created_at=now,
                updated_at=now,
            )
        else:
            row = replace(
                existing,
                target=request.target,
                token=request.token,
                topic=request.topic,
                mode=request.mode,
                client_priority=request.priority,
                client_silent=request.silent,
                voip_token=request.voip_token,
                resource=request.resource,
                secret=request.secret,
                options=dict(request.options),
                updated_at=now,
            )
            if (existing.target, existing.token) != (request.target, request.token):
                # Failures and a quarantine judged the old token, not this one. The
                # timestamps stay: they are history an operator may want to see.
                row = replace(row, failure_count=0, quarantined_until=None)
        self._rows[row.id] = row

        replaced = [
            other
            for other in self._owned_by(request.owner)
            if other.id != row.id
            and other.token is not None
            and (other.target, other.token) == (row.target, row.token)
        ]
        for other in replaced:
            del self._rows[other.id]

        # The row just written is never evicted, whatever the limit says.
        others = sorted(
            (other for other in self._owned_by(request.owner) if other.id != row.id),
            key=lambda other: (other.updated_at, other.id),
        )
        evicted = others[: max(0, len(others) + 1 - max_per_owner)]
        for other in evicted:
            del self._rows[other.id]
        return EnableOutcome(registration=row, replaced=replaced, evicted=evicted)

    async def disable(self, owner: str, push_jid: str, node: str | None) -> Sequence[Registration]:
        removed = [
            row
            for row in self._owned_by(owner)
            if row.push_jid == push_jid and (node is None or row.node == node)
        ]
        for row in removed:
            del self._rows[row.id]
        return removed

    async def for_owner(self, owner: str) -> Sequence[Registration]:
        return self._owned_by(owner)

    async def get(self, registration_id: int) -> Registration | None:
        return self._rows.get(registration_id)

    async def list(self, owner: str | None = None) -> Sequence[Registration]:
        if owner is not None:
            return self._owned_by(owner)
        return [self._rows[key] for key in sorted(self._rows)]

    async def delete(self, registration_id: int) -> Registration | None:
        return self._rows.pop(registration_id, None)

    async def delete_token(self, target: Target, token: str) -> int:
        doomed = [
            row.id for row in self._rows.values() if row.target == target and row.token == token
        ]
        for key in doomed:
            del self._rows[key]
        return len(doomed)

    async def set_operator_priority(
        self, registration_id: int, priority: Priority | None
    ) -> Registration | None:
        return self._update(registration_id, operator_priority=priority)

    async def set_operator_silent(
        self, registration_id: int, silent: bool | None
    ) -> Registration | None:
        return self._update(registration_id, operator_silent=silent)

    async def record_success(self, registration_id: int, now: float) -> None:
        self._update(registration_id, last_success_at=now, failure_count=0, quarantined_until=None)

    async def record_successes(self, successes: Mapping[int, float]) -> None:
        for registration_id, now in successes.items():
            await self.record_success(registration_id, now)

    async def record_failure(
        self,
        registration_id: int,
        now: float,
        reason: str,
        *,
        quarantine_until: float | None = None,
    ) -> None:
        row = self._rows.get(registration_id)
        if row is None:
            return
        self._rows[registration_id] = replace(
            row,
            last_error_at=now,
            last_error=reason,
            failure_count=row.failure_count + 1,
            quarantined_until=(
                row.quarantined_until if quarantine_until is None else quarantine_until
            ),
        )

    async def release_quarantine(self, registration_id: int) -> Registration | None:
        return self._update(registration_id, quarantined_until=None)

    async def count(self) -> int:
        return len(self._rows)

    async def close(self) -> None:
        """Nothing to release; the rows stay readable."""

    # -- helpers ----------------------------------------------------------------------

    def _find(self, owner: str, push_jid: str, node: str) -> Registration | None:
        for row in self._rows.values():
            if (row.owner, row.push_jid, row.node) == (owner, push_jid, node):
                return row
        return None

    def _owned_by(self, owner: str) -> Sequence[Registration]:
        return [self._rows[key] for key in sorted(self._rows) if self._rows[key].owner == owner]

    def _update(self, registration_id: int, **changes: object) -> Registration | None:
        row = self._rows.get(registration_id)
        if row is None:
            return None
        updated = replace(row, **changes)  # type: ignore[arg-type]
        self._rows[registration_id] = updated
        return updated


_CONFORMS: type[RegistrationStore] = MemoryStore
"""mypy --strict checks here that MemoryStore keeps to the protocol."""
