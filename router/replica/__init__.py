"""One replica's moving parts: the gateway that holds them (``gateway``), one request from
acquire to release (``dispatch``), its leases (``leases``), shared or degraded mode
(``degraded``) and its local decisions (``local``), the health view (``healthview``), the
heartbeat (``heartbeat``) and the state poller (``poller``).

Imports ``state`` for shared state, ``upstream`` for providers, ``telemetry``, and the
top-level modules; never ``redis`` itself.
"""
