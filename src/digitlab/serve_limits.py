"""The service's time and connection limits: `digitlab serve`'s defaults, importable without FastAPI."""

TIME_BUDGET = 10.0
"""Seconds one request's images may take to decode and preprocess."""
CLIENT_TIMEOUT = 5.0
"""Seconds a client may take to send its request headers, or between parts of its body; idle keep-alive."""
SHUTDOWN_TIMEOUT = 3.0
"""Seconds requests in progress get to finish after SIGTERM or SIGINT before they are cancelled."""
MAX_CONNECTIONS = 256
"""Open connections and requests in progress beyond which a new one gets 503."""
