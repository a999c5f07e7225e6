"""Prefect flows that chain the stage tasks, and the local Prefect stack.

Importing this package sets defaults for Prefect that a user's own settings override:
- analytics and the server's telemetry off: the pipeline runs offline, where the telemetry
  call fails with an ERROR line on every run;
- 120 s, not 20, for a temporary server to start: the first run on a machine creates and
  migrates Prefect's database, which can take longer than 20 s on a small machine.
"""

import os

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}
for _name, _value in PREFECT_DEFAULTS.items():
    os.environ.setdefault(_name, _value)
