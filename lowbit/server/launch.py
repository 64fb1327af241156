"""Run the app under uvicorn, with a graceful drain: the first SIGTERM (or Ctrl-C) stops taking new
requests (503) and lets the running ones finish, up to `drain_timeout` seconds; then the server exits.
A second signal exits at once."""
from __future__ import annotations

import logging
import signal
import time

import uvicorn

from lowbit.server.app import ServerState

log = logging.getLogger("lowbit.server")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal starts a drain instead of closing the sockets at once (which
    would refuse new clients with a connection error instead of a 503 they can act on)."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float = 30.0):
        super().__init__(config)
        self.state, self.drain_timeout = state, drain_timeout
        self._deadline: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self._deadline is None:
            self.state.draining = True
            self._deadline = time.monotonic() + self.drain_timeout
            log.warning("%s: draining %d request(s), up to %.0f s; new requests get 503",
                        signal.Signals(sig).name, self.state.aengine.num_in_flight, self.drain_timeout)
            return
        self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._deadline is not None and not self.should_exit:
            left = self.state.aengine.num_in_flight
            if left == 0 or time.monotonic() > self._deadline:
                if left:
                    log.warning("drain timeout: %d request(s) still running are cut off", left)
                self.should_exit = True
        return await super().on_tick(counter)


def run(app, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 30.0,
        log_level: str = "info") -> None:
    """Serve `app` (from `create_app`) until a signal drains and stops it."""
    config = uvicorn.Config(app, host=host, port=port, http="h11", loop="asyncio", log_level=log_level,
                            timeout_graceful_shutdown=5, access_log=False)
    DrainingServer(config, app.state.lowbit, drain_timeout).run()
