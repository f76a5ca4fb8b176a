"""``python -m tests.fault_server``: the server of ``python -m chatsave.server.run`` (same
flags, same ``serve()``) with the fault hooks of tests/faults.py and their ``/_faults/*``
control endpoints, for tests that need a fault inside a real server process (a request held
while the process is killed). The installed server has no way to turn faults on."""

from __future__ import annotations

import sys

from chatsave.server.run import main
from tests.faults import Faults

if __name__ == "__main__":
    sys.exit(main(hooks=Faults(http_control=True).hooks()))
