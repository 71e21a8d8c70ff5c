"""Signal gates: an asset waits, durably and holding nothing, for an external decision.

    @app.asset(deps=[summary], gate=ms.Gate(timeout=86_400))
    async def approved(ctx, summary):
        notify(ctx.gate.url)                  # a signed callback URL
        return await ctx.gate.wait()          # the payload it is signalled with

The first `wait()` suspends the materialization: its run parks (state
waiting, no lease, no task) until `app.gates.signal(token, payload)` or
`POST /gates/{token}` (`mainspring serve`) resolves the gate, or its timeout
fires (a deadline on the run, so any node's timer loop fires it, even when the
node that opened the gate is gone). The asset function then runs again from
the top and `wait()` returns the payload at once: code before `wait()` runs
once per suspension and once on resume, so keep it idempotent (a
notification keyed by `ctx.gate.id`).

Tokens are `<run id>.<round>.<expiry unix seconds>.<HMAC-SHA256>` signed
with $MAINSPRING_SECRET; signature and expiry are checked in constant time,
and the gate goes from waiting to signaled in the same transaction as the
signal enters the run's inbox, so a gate resumes its asset exactly once. A
signal that arrives before the asset has parked (it handed out its URL a
moment earlier) is kept in the inbox, and the park sees it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from mainspring import payload
from mainspring.backoff import Backoff
from mainspring.errors import ConfigError, EncodeError, MainspringError
from mainspring.ids import uuid7
from mainspring.store.base import GateRow

if TYPE_CHECKING:
    from mainspring.app import App
    from mainspring.signals import Signals

SIGNAL = "gate"
_SWEEPER = "mainspring.assets.sweep_gates"
_NAMESPACE = uuid.UUID("6d61696e-7370-7269-6e67-000000000006")


@dataclass(frozen=True, slots=True)
class Gate:
    """An asset's gate: wait up to `timeout` seconds for a signal.

    `on_timeout="fail"` fails the materialization; a `Backoff` re-runs the
    asset (a fresh token: notify again) and waits `backoff.delay(n)` seconds
    in round n, at most `max_timeouts` times, then fails.
    """

    timeout: float = 86_400.0
    on_timeout: Literal["fail"] | Backoff = "fail"
    max_timeouts: int = 3

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ConfigError(f"Gate: timeout must be > 0 seconds, got {self.timeout}")
        if self.on_timeout != "fail" and not isinstance(self.on_timeout, Backoff):
            raise ConfigError("Gate: on_timeout is 'fail' or an ms.Backoff")
        if self.max_timeouts < 0:
            raise ConfigError("Gate: max_timeouts must be >= 0")

    def wait_for(self, round: int) -> float:
        """How long round `round` waits (round 0 is the first)."""
        if round == 0 or not isinstance(self.on_timeout, Backoff):
            return self.timeout
        return self.on_timeout.delay(round)


class GateError(MainspringError):
    """A gate signal was refused; `status` is the HTTP status the endpoint answers."""

    status = 400


class InvalidToken(GateError):
    """The token is malformed or its signature does not match: forged or corrupted."""

    status = 403


class GateExpired(GateError):
    """The token's expiry has passed (or its gate timed out)."""

    status = 410


class GateNotFound(GateError):
    """No gate has this token's id."""

    status = 404


class GateClosed(GateError):
    """The gate was already signaled (a replay) or cancelled: nothing changed."""

    status = 409


class GateSuspended(BaseException):
    """Raised by `ctx.gate.wait()` to park the materialization (caught by the engine)."""

    def __init__(self, gate: GateHandle) -> None:
        super().__init__("gate wait")
        self.gate = gate


def gate_id(run_id: str, round: int) -> str:
    """The id of a materialization's gate in a round: the same on every re-execution."""
    return str(uuid.uuid5(_NAMESPACE, f"{run_id}:{round}"))


def secret() -> bytes:
    value = os.environ.get("MAINSPRING_SECRET")
    if not value:
        raise ConfigError(
            "signal gates need a secret: set MAINSPRING_SECRET (the same value on every "
            "worker and on `mainspring serve`) to sign and check gate tokens"
        )
    return value.encode()


def _signature(key: bytes, body: str) -> str:
    digest = hmac.new(key, body.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class Ticket:
    """What a verified token says: the run waiting, the gate's round and its expiry."""

    run_id: str
    round: int
    expires_at: float

    @property
    def gate_id(self) -> str:
        return gate_id(self.run_id, self.round)


def sign(run_id: str, round: int, expires_at: float) -> str:
    """A token for a run's gate in a round: `<run id>.<round>.<expiry>.<signature>`."""
    body = f"{run_id}.{round}.{int(expires_at)}"
    return f"{body}.{_signature(secret(), body)}"


def verify(token: str, now: float | None = None) -> Ticket:
    """What a well-signed, unexpired token says; InvalidToken or GateExpired otherwise."""
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 4 or not parts[1].isdigit() or not parts[2].isdigit():
        raise InvalidToken("malformed gate token: expected <run id>.<round>.<expiry>.<signature>")
    run_id, round, expiry, signature = parts
    expected = _signature(secret(), f"{run_id}.{round}.{expiry}")
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise InvalidToken("invalid gate token: its signature does not match")
    if (now if now is not None else time.time()) >= int(expiry):
        raise GateExpired(f"gate token expired at {datetime.fromtimestamp(int(expiry), UTC)}")
    return Ticket(run_id, int(round), float(expiry))


class GateHandle:
    """What an asset with a gate sees as `ctx.gate`."""

    def __init__(self, run_id: str, round: int, expires_at: float, inbox: Signals) -> None:
        self.run_id = run_id
        self.id = gate_id(run_id, round)
        self.round = round
        self.expires_at = expires_at
        self._inbox = inbox

    @property
    def token(self) -> str:
        """The signed token to hand to whoever decides (valid until the gate's expiry)."""
        return sign(self.run_id, self.round, self.expires_at)

    @property
    def url(self) -> str:
        """The callback URL: $MAINSPRING_GATE_URL (default http://127.0.0.1:8080)/gates/<token>."""
        base = os.environ.get("MAINSPRING_GATE_URL", "http://127.0.0.1:8080").rstrip("/")
        return f"{base}/gates/{self.token}"

    @property
    def resumed(self) -> bool:
        """True when the signal has arrived (wait() returns at once)."""
        return self._inbox.get(SIGNAL) is not None

    async def wait(self) -> Any:
        """The signal's payload; the first call suspends the materialization until it comes."""
        signal = self._inbox.get(SIGNAL)
        if signal is None:
            raise GateSuspended(self)
        return signal.payload


@dataclass(frozen=True, slots=True)
class GateSignal:
    """A gate resolved by `app.gates.signal`: the gate and the run it resumes."""

    gate_id: str
    run_id: str
    asset: str
    partition: str


class Gates:
    """The app's gates: resolve them by token, list and inspect them (`app.gates`)."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def signal_async(self, token: str, payload_value: Any = None) -> GateSignal:
        """Resolve the gate of `token` with a payload and resume its asset, exactly once.

        Raises InvalidToken (forged, 403), GateExpired (410), GateNotFound (404)
        or GateClosed (already signaled or cancelled, 409); nothing changes then.
        """
        try:
            ticket = verify(token)
        except GateError as exc:
            self.app.telemetry.emit("gate.signal", gate_id=None, accepted=False, reason=str(exc))
            raise
        gate = ticket.gate_id
        try:
            data = payload.dumps(payload_value)
        except EncodeError as exc:
            raise EncodeError(f"a gate payload must be JSON encodable: {exc}") from None
        store = await self.app.store()
        expires = datetime.fromtimestamp(ticket.expires_at, UTC)
        # The token proves the gate was issued: a signal that beats the gate's row (the
        # asset handed out its URL and has not parked yet) opens the gate and is kept.
        issued = GateRow(gate, ticket.run_id, "", "", "waiting", expires, ticket.round)
        result, row = await store.signal_gate(issued, uuid7(), data)
        self.app.telemetry.emit("gate.signal", gate_id=gate, accepted=result == "resumed",
                                reason=result)  # fmt: skip
        if result == "resumed" and row is not None:
            return GateSignal(gate, row.run_id, row.asset, row.partition)
        if result == "not_found":
            raise GateNotFound(f"no gate {gate} (its materialization may have been deleted)")
        if result in ("expired", "timeout"):
            raise GateExpired(f"gate {gate} timed out: it no longer accepts a signal")
        if result == "cancelled":
            self.app.telemetry.emit("gate.cancel", gate_id=gate)
            raise GateClosed(f"gate {gate} was cancelled: its materialization has ended")
        raise GateClosed(f"gate {gate} was already signaled: a token resumes its asset once")

    def signal(self, token: str, payload_value: Any = None) -> GateSignal:
        """Resolve a gate (sync client); see `signal_async`."""
        return self.app._sync(self.signal_async(token, payload_value))

    async def sweep_async(self, grace: float = 60.0) -> list[GateRow]:
        """Close gates a run can no longer use: its run finished or is gone (cancelled), or
        it is `grace` seconds past its expiry (timeout). Runs every minute on the workers of
        an app with gated assets; the run's own await deadline fires the asset's timeout."""
        closed = await (await self.app.store()).sweep_gates(grace)
        for gate in closed:
            event = "gate.cancel" if gate.status == "cancelled" else "gate.timeout"
            self.app.telemetry.emit(event, gate_id=gate.id, asset=gate.asset,
                                    partition=gate.partition, swept=True)  # fmt: skip
        return closed

    def sweep(self, grace: float = 60.0) -> list[GateRow]:
        return self.app._sync(self.sweep_async(grace))

    def install_sweeper(self) -> None:
        """Register the periodic sweep (once), on the catalog's queue."""
        if _SWEEPER in self.app.tasks:
            return

        async def sweep_gates() -> int:
            return len(await self.sweep_async())

        self.app.periodic(cron="* * * * *", name=_SWEEPER, queue=self.app.assets.queue)(sweep_gates)

    async def get_async(self, id: str) -> GateRow | None:
        return await (await self.app.store()).get_gate(id)

    def get(self, id: str) -> GateRow | None:
        """A gate by id (status, expiry, payload once signaled)."""
        return self.app._sync(self.get_async(id))

    async def list_async(self, status: str | None = "waiting", limit: int = 100) -> list[GateRow]:
        return await (await self.app.store()).list_gates(status, limit)

    def list(self, status: str | None = "waiting", limit: int = 100) -> list[GateRow]:
        """Gates in a status ("waiting" by default; None for all), oldest first."""
        return self.app._sync(self.list_async(status, limit))
