"""The ``epics`` actuator handler: a command writes a PV over Channel Access, and the readback confirms it.

In ``agent.yaml``::

    actuators:
      - name: motor
        schema:
          type: object
          properties: {position: {type: number, minimum: -10, maximum: 10}}
          required: [position]
          additionalProperties: false
        handler:
          epics:
            pv: BL1:mtr              # the setpoint
            arg: position            # the command arg that holds the value (default: value)
            readback_pv: BL1:mtr.RBV # optional: confirm the move on this PV
            tolerance: 0.005         # |readback - value| that counts as arrived
            readback_timeout_s: 10
            put_timeout_s: 30        # put-completion (the IOC says the move is done)

A command is checked before anything is written: the value must suit the
PV's native type (number, integer, enum choice, string, array no longer than
the PV) and lie within the PV's control limits (``DBR_CTRL``; EPICS leaves a
PV unlimited when both are equal) and the handler's ``low``/``high``; the
actuator's JSON Schema has been applied already by the command processor.
Then the value is written with put-completion (``wait: true``: the IOC answers
when the record has finished processing, e.g. the motor stopped) and, with a
``readback_pv``, the readback is polled until it is within ``tolerance`` or
``readback_timeout_s`` passes. The result (the ack's ``result``) carries the
readback value and its IOC timestamp.

Every failure raises :class:`EpicsCommandError` whose text is the nack reason
and starts with its kind: ``wrong type:``, ``out of limits:``,
``IOC unreachable:``, ``put failed:``, ``put timeout:``, ``readback timeout:``.
For the first three nothing was written.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from pydantic import Field, model_validator

from reflexarc.config import StrictModel

# Seconds between the UNIX epoch and the EPICS epoch (1990-01-01 UTC).
_EPICS_EPOCH_OFFSET = 631_152_000
_MAX_STRING = 40  # bytes in a DBR_STRING


class EpicsPutSettings(StrictModel):
    """What the ``epics`` handler writes and how it confirms the write."""

    pv: str = Field(min_length=1, max_length=200, description="the PV to write (a setpoint)")
    arg: str = Field("value", min_length=1, description="the command arg whose value is written")
    readback_pv: str | None = Field(None, description="confirm on this PV (e.g. the motor's .RBV)")
    tolerance: float = Field(0.0, ge=0, description="|readback - value| accepted as arrived (numbers)")
    readback_timeout_s: float = Field(10.0, gt=0, description="how long the readback may take after the put")
    put_timeout_s: float = Field(30.0, gt=0, description="how long the put-completion may take")
    connect_timeout_s: float = Field(3.0, gt=0, description="an unconnected PV after this: IOC unreachable")
    wait: bool = Field(True, description="put with completion (ca_put_callback); false: fire and forget")
    low: float | None = Field(None, description="lowest value accepted, on top of the PV's control limits")
    high: float | None = Field(None, description="highest value accepted, on top of the PV's control limits")
    poll_s: float = Field(0.05, gt=0, le=5, description="readback polling interval")

    @model_validator(mode="after")
    def _order(self) -> EpicsPutSettings:
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError("low must be <= high")
        return self


class EpicsHandler(StrictModel):
    """``handler: {epics: {...}}`` in an actuator entry."""

    epics: EpicsPutSettings


class EpicsCommandError(RuntimeError):
    """The command was not carried out (or not confirmed); the text is the nack reason."""


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _unix(stamp: Any) -> float:
    return (int(stamp.secondsSinceEpoch) + _EPICS_EPOCH_OFFSET) + int(stamp.nanoSeconds) / 1e9


def _plain(data: Any) -> Any:
    items = data.tolist() if hasattr(data, "tolist") else list(data)
    items = [b.decode("utf-8", "replace") if isinstance(b, bytes) else b for b in items]
    return items[0] if len(items) == 1 else items


class EpicsActuator:
    """Runs ``epics`` commands for one actuator; one Channel Access context, PVs kept connected."""

    def __init__(self, settings: EpicsPutSettings) -> None:
        self.settings = settings
        self._context: Any = None
        self._pvs: dict[str, Any] = {}

    async def _pv(self, name: str) -> Any:
        from caproto.asyncio.client import Context

        if self._context is None:
            # Created on first use: it belongs to the event loop the agent runs commands on.
            self._context = Context(timeout=self.settings.connect_timeout_s)
        pv = self._pvs.get(name)
        if pv is None:
            (pv,) = await self._context.get_pvs(name)
            self._pvs[name] = pv
        return pv

    async def _connected(self, name: str) -> Any:
        pv = await self._pv(name)
        try:
            await pv.wait_for_connection(timeout=self.settings.connect_timeout_s)
        except Exception:
            raise EpicsCommandError(
                f"IOC unreachable: PV {name} did not connect within {self.settings.connect_timeout_s:g}s; "
                "nothing was written"
            ) from None
        return pv

    async def run(self, args: dict[str, Any]) -> dict[str, Any]:
        """Check, write, confirm; the result of the ack (raises :class:`EpicsCommandError`)."""
        from caproto import ChannelType, native_type

        s = self.settings
        if s.arg not in args:
            raise EpicsCommandError(f"wrong type: the command has no arg {s.arg!r} to write to {s.pv}")
        value = args[s.arg]
        pv = await self._connected(s.pv)
        try:
            ctrl = await pv.read(data_type="control", timeout=s.connect_timeout_s)
        except Exception as exc:
            raise EpicsCommandError(
                f"IOC unreachable: PV {s.pv} did not answer within {s.connect_timeout_s:g}s ({type(exc).__name__}); "
                "nothing was written"
            ) from None
        native = native_type(ChannelType(ctrl.data_type))
        count = int(getattr(pv.channel, "native_data_count", 1) or 1)
        payload = self._check(value, native, count, ctrl.metadata)
        started = time.monotonic()
        try:
            response = await pv.write(payload, wait=s.wait, timeout=s.put_timeout_s)
        except Exception as exc:
            if not pv.connected:
                raise EpicsCommandError(
                    f"IOC unreachable: the connection to {s.pv} was lost during the put ({exc})"
                ) from None
            raise EpicsCommandError(
                f"put timeout: {s.pv} did not complete the put of {value!r} within {s.put_timeout_s:g}s"
            ) from None
        status = getattr(response, "status", None)  # a CAStatusCode on a put with completion
        if status is not None and status.name != "ECA_NORMAL":
            raise EpicsCommandError(f"put failed: the IOC answered {status.name} ({status.description}) for {s.pv}")
        put_s = time.monotonic() - started
        readback_pv = s.readback_pv or s.pv
        # Compare what was written (an enum choice as its index) with what is read back.
        target = payload[0] if len(payload) == 1 else payload
        readback, stamp = await self._confirm(readback_pv, target, confirm=s.readback_pv is not None)
        result: dict[str, Any] = {
            "pv": s.pv,
            "value": value,
            "readback_pv": readback_pv,
            "readback": readback,
            "readback_time": stamp,
            "put_s": round(put_s, 4),
            "settle_s": round(time.monotonic() - started - put_s, 4),
        }
        units = getattr(ctrl.metadata, "units", b"")
        if units:
            result["units"] = units.decode("utf-8", "replace") if isinstance(units, bytes) else units
        return result

    def _check(self, value: Any, native: Any, count: int, md: Any) -> Any:
        """The value to put; raise ``wrong type``/``out of limits`` before anything is written."""
        from caproto import ChannelType

        s = self.settings
        name = ChannelType(native).name
        where = f"PV {s.pv} holds {name}" + (f"[{count}]" if count > 1 else "")
        if native == ChannelType.STRING:
            if not isinstance(value, str):
                raise EpicsCommandError(f"wrong type: {where}; got {value!r} ({type(value).__name__})")
            if len(value.encode()) >= _MAX_STRING:
                raise EpicsCommandError(f"wrong type: {where}; a string of at most {_MAX_STRING - 1} bytes fits")
            return [value]
        if native == ChannelType.ENUM:
            choices = [c.decode() if isinstance(c, bytes) else c for c in getattr(md, "enum_strings", [])]
            if isinstance(value, str) and value in choices:
                return [choices.index(value)]
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
                return [value]
            raise EpicsCommandError(f"wrong type: {where} with choices {choices}; got {value!r}")
        integral = native in (ChannelType.LONG, ChannelType.INT, ChannelType.CHAR)
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and count == 1:
            raise EpicsCommandError(f"wrong type: {where} (one value); got a list")
        if len(values) > count:
            raise EpicsCommandError(f"wrong type: {where}; got {len(values)} values")
        for v in values:
            if not _is_number(v) or (isinstance(v, float) and not math.isfinite(v)):
                raise EpicsCommandError(f"wrong type: {where}; got {v!r} ({type(v).__name__}), want a number")
            if integral and not float(v).is_integer():
                raise EpicsCommandError(f"wrong type: {where}; got {v!r}, want an integer")
        lo = getattr(md, "lower_ctrl_limit", 0)
        hi = getattr(md, "upper_ctrl_limit", 0)
        for v in values:
            if lo != hi and not lo <= v <= hi:
                raise EpicsCommandError(
                    f"out of limits: {v!r} is outside {s.pv}'s control limits [{lo:g}, {hi:g}]; nothing was written"
                )
            if (s.low is not None and v < s.low) or (s.high is not None and v > s.high):
                raise EpicsCommandError(
                    f"out of limits: {v!r} is outside the actuator's limits [{s.low}, {s.high}]; nothing was written"
                )
        return [int(v) for v in values] if integral else [float(v) for v in values]

    async def _confirm(self, name: str, target: Any, confirm: bool) -> tuple[Any, float | None]:
        """Read ``name`` until it matches ``target`` (if ``confirm``), else once; (value, IOC time)."""
        s = self.settings
        deadline = time.monotonic() + s.readback_timeout_s
        last: Any = None
        while True:
            try:
                pv = await self._connected(name)
                response = await pv.read(data_type="time", timeout=max(0.1, deadline - time.monotonic()))
            except EpicsCommandError:
                if time.monotonic() >= deadline:
                    raise
            except Exception:
                if time.monotonic() >= deadline:
                    raise EpicsCommandError(
                        f"readback timeout: {name} could not be read within {s.readback_timeout_s:g}s"
                    ) from None
            else:
                last = _plain(response.data)
                stamp = _unix(response.metadata.stamp)
                if not confirm or self._matches(last, target):
                    return last, stamp
            if time.monotonic() >= deadline:
                raise EpicsCommandError(
                    f"readback timeout: {name} reads {last!r}, not {target!r} ± {s.tolerance:g} after "
                    f"{s.readback_timeout_s:g}s (the put completed)"
                )
            await asyncio.sleep(s.poll_s)

    def _matches(self, readback: Any, target: Any) -> bool:
        tol = self.settings.tolerance
        if isinstance(target, list):
            got = readback if isinstance(readback, list) else [readback]
            return len(got) >= len(target) and all(
                abs(float(a) - float(b)) <= tol for a, b in zip(got, target, strict=False)
            )
        if _is_number(target) and _is_number(readback):
            return abs(float(readback) - float(target)) <= tol
        return bool(readback == target)

    async def close(self) -> None:
        """Disconnect from the IOCs (at agent shutdown)."""
        if self._context is not None:
            ctx, self._context = self._context, None
            self._pvs.clear()
            await ctx.disconnect()
