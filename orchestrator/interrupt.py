"""Ctrl-C, noted: ``labpilot run``'s SIGINT handler raises KeyboardInterrupt as always and also
sets :data:`INTERRUPT`. Python drops an exception raised inside a destructor ('Exception ignored
in ... __del__'), so a Ctrl-C landing in one was lost and the campaign ran on (seen in a loaded
test run); the campaign loop looks at the note between steps and raises it again. A module of
its own so that the command line notes it before it imports Prefect."""

from __future__ import annotations

import threading

INTERRUPT = threading.Event()
