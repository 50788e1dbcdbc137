"""What a replica shows of itself: OpenTelemetry traces (``tracing``), metrics (``metrics``)
and the JSON logs with the decision and access logs (``logs``).

Imports only the top-level modules.
"""
