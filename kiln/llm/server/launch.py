"""Running the app under uvicorn: in the foreground (``kiln serve``) or in a background thread (tests, notebooks)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn

from kiln.llm.engine import LLMEngine

from .app import ServerConfig, build_app


def make_server(engine: LLMEngine, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
                log_level: str = "warning", graceful_shutdown_s: float = 5.0) -> uvicorn.Server:
    app = build_app(engine, config)
    ucfg = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", http="h11",
                          timeout_graceful_shutdown=graceful_shutdown_s, access_log=False)
    return uvicorn.Server(ucfg)


class ServerThread:
    """``with ServerThread(engine, config) as srv: srv.url`` — uvicorn on 127.0.0.1 and a free port, in a thread.

    The socket is bound before the thread starts (no port race); exiting the block shuts uvicorn down cleanly
    (lifespan shutdown stops the engine thread) and joins the thread.
    """

    def __init__(self, engine: LLMEngine, config: ServerConfig, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning"):
        self.server = make_server(engine, config, host, port, log_level)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="kiln-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def app(self):
        return self.server.config.app

    @property
    def state(self):
        return self.app.state.kiln

    @property
    def loop(self):
        """The event loop uvicorn runs on (for inspecting its tasks from a test)."""
        return self._loop

    def loop_tasks(self) -> list[str]:
        """Names of the coroutines of every task on the server's loop (this probe excluded)."""
        async def probe():
            me = asyncio.current_task()
            return sorted(t.get_coro().__qualname__ for t in asyncio.all_tasks() if t is not me)

        return asyncio.run_coroutine_threadsafe(probe(), self._loop).result(10)

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        self._loop = self.state.loop
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError("uvicorn did not stop")
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
