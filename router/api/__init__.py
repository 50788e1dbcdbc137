"""The HTTP front: the hot path (``endpoints``), the app with its other routes (``app``,
``admin``), request validation (``schemas``), client authentication (``auth``) and the HTTP
server that bounds what a client may send (``server``).

Imports ``replica`` (to serve), ``telemetry``, and the top-level modules; nothing imports it
but the ``router`` command (``router.cli``).
"""
