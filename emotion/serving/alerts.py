"""Escalation alerts to a supervisor's endpoint, sent in the background.

A slow or dead receiver must never delay a caller's turn: alerts wait in a bounded queue
and one task posts them, each with a timeout and a bounded number of retries. When the
queue is full, the alert is dropped and counted, never the turn.
"""

from __future__ import annotations

import asyncio
import logging

import httpx

log = logging.getLogger(__name__)


class AlertSender:
    def __init__(self, url: str, *, timeout_s: float = 2.0, retries: int = 2, max_queue: int = 100,
                 backoff_s: float = 0.2, on_outcome=None) -> None:
        self.url = url
        self.retries = retries
        self.backoff_s = backoff_s
        self._queue: asyncio.Queue[dict] = asyncio.Queue(maxsize=max_queue)
        self._task: asyncio.Task | None = None
        # Built now, at startup: building it loads the CA bundle (50-100 ms), which at the
        # first escalation would hold every conversation's event loop.
        self._client = httpx.AsyncClient(timeout=timeout_s, trust_env=False)
        self._on_outcome = on_outcome or (lambda outcome: None)  # metrics: sent, failed, dropped

    def send(self, payload: dict) -> None:
        """Queue an alert and return at once."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="emotion-alerts")
        try:
            self._queue.put_nowait(payload)
        except asyncio.QueueFull:
            log.warning("alert queue full (%d): alert for conversation=%s dropped", self._queue.maxsize,
                        payload.get("conversation_id"))
            self._on_outcome("dropped")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._client.aclose()

    async def _loop(self) -> None:
        while True:
            payload = await self._queue.get()
            self._on_outcome("sent" if await self._post(payload) else "failed")

    async def _post(self, payload: dict) -> bool:
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = await self._client.post(self.url, json=payload)
                if response.status_code < 300:
                    return True
                problem = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                problem = type(exc).__name__
        log.warning("alert for conversation=%s not delivered after %d tries: %s", payload.get("conversation_id"),
                    self.retries + 1, problem)
        return False
