"""Prefect flows that chain the stage tasks, and the local Prefect stack.

Importing this package turns Prefect's client analytics and its server's telemetry off,
unless the user set them: the pipeline runs offline, where the telemetry call fails with
an ERROR line on every run. A user's own PREFECT_SERVER_ANALYTICS_ENABLED or DO_NOT_TRACK wins.
"""

import os

QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
for _name, _value in QUIET_ENV.items():
    os.environ.setdefault(_name, _value)
