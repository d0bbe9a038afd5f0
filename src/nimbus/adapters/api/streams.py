"""Event streams open per tenant in this process, capped (``NIMBUS_TENANT_MAX_STREAMS``).

A stream costs the server a connection, a subscriber queue and a write per event for as long
as it lasts: a thousand joins of one run made another tenant's requests sixty times slower.
Each tenant may hold a bounded number at once; one more is refused with 429.
"""

from __future__ import annotations

from nimbus.adapters.api.errors import APIError


class TenantStreams:
    """How many event streams each tenant holds open here, at most ``cap`` each."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._open: dict[str, int] = {}

    def take(self, tenant_id: str) -> None:
        """Count one more stream of ``tenant_id``; 429 when it holds ``cap`` already."""
        held = self._open.get(tenant_id, 0)
        if held >= self.cap:
            raise APIError(
                429,
                f"this tenant has {held} event streams open, as many as it may "
                "(NIMBUS_TENANT_MAX_STREAMS); close one or retry later",
                {"Retry-After": "1"},
            )
        self._open[tenant_id] = held + 1

    def give_back(self, tenant_id: str) -> None:
        """One stream of ``tenant_id`` ended."""
        held = self._open.get(tenant_id, 0) - 1
        if held > 0:
            self._open[tenant_id] = held
        else:
            self._open.pop(tenant_id, None)

    def held(self, tenant_id: str) -> int:
        """Streams ``tenant_id`` holds open now."""
        return self._open.get(tenant_id, 0)
