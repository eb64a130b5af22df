"""Prefect flows: one thin flow per pipeline stage plus `ul`, the whole pipeline (docs/design.md §2).

Importing this package sets the closed-network defaults every service needs (before Prefect, Ray or MLflow
are imported); a value already in the environment wins.
"""

import os

for _name, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # else a telemetry heartbeat hits "database is locked"
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # default 20 s is too short on a busy 2-core box
    "RAY_AUTH_MODE": "disabled",  # no ~/.ray/auth_token
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray listens on 127.0.0.1 only
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "true",
}.items():
    os.environ.setdefault(_name, _value)
