"""The epics actuator handler against a real Channel Access IOC (caproto's server in a child process, loopback only).

Each refused command must name its reason, and where nothing may be written
the PV must be unchanged (read back from the IOC by an independent client).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from reflexarc.edge.epics_actuator import EpicsActuator, EpicsCommandError, EpicsHandler, EpicsPutSettings
from reflexarc.scenarios.epics.ioc import IocProcess, caget, caput


@pytest.fixture(scope="module")
def ioc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IocProcess]:
    """One IOC for the module, on its own CA port; the CA settings in os.environ meanwhile."""
    with pytest.MonkeyPatch.context() as mp:
        proc = IocProcess(tmp_path_factory.mktemp("ioc"), prefix="UA:")
        for k, v in proc.env.items():
            mp.setenv(k, v)
        with proc:
            yield proc


@pytest.fixture
async def motor(ioc: IocProcess) -> AsyncIterator[EpicsActuator]:
    """The motor setpoint with its readback, 1 mm/... tolerance 0.001, short timeouts."""
    act = EpicsActuator(
        EpicsPutSettings(
            pv=ioc.pv("mtr"),
            arg="position",
            readback_pv=ioc.pv("mtr.RBV"),
            tolerance=0.001,
            readback_timeout_s=1.0,
            connect_timeout_s=1.0,
            put_timeout_s=10,
        )
    )
    yield act
    await act.close()


def test_handler_settings_are_validated() -> None:
    h = EpicsHandler.model_validate({"epics": {"pv": "A:m", "readback_pv": "A:m.RBV", "tolerance": 0.01}})
    assert h.epics.arg == "value" and h.epics.wait is True
    with pytest.raises(ValidationError):
        EpicsHandler.model_validate({"epics": {"pv": "A:m", "tolerance": -1}})
    with pytest.raises(ValidationError, match="low must be"):
        EpicsHandler.model_validate({"epics": {"pv": "A:m", "low": 2, "high": 1}})
    with pytest.raises(ValidationError):
        EpicsHandler.model_validate({"epics": {"pv": "A:m", "speed": 3}})


async def test_a_move_completes_and_the_ack_carries_the_readback(ioc: IocProcess, motor: EpicsActuator) -> None:
    result = await motor.run({"position": 2.5})
    assert result["readback"] == pytest.approx(2.5, abs=0.001) and result["readback_pv"] == ioc.pv("mtr.RBV")
    assert result["units"] == "mm" and result["value"] == 2.5
    assert abs(result["readback_time"] - time.time()) < 10
    assert await caget(ioc.pv("mtr.RBV")) == pytest.approx(2.5)
    # Put-completion: the put returned only once the motor had arrived.
    result = await motor.run({"position": -3})
    assert result["put_s"] >= 0.1 and result["readback"] == pytest.approx(-3.0, abs=0.001)


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ({"position": 30.0}, "out of limits: 30.0 is outside UA:mtr's control limits [-10, 10]"),
        ({"position": -10.5}, "out of limits"),
        ({"position": "far"}, "wrong type: PV UA:mtr holds DOUBLE; got 'far' (str), want a number"),
        ({"position": True}, "wrong type"),
        ({"position": [1.0, 2.0]}, "wrong type: PV UA:mtr holds DOUBLE (one value); got a list"),
        ({"position": float("nan")}, "wrong type"),
        ({"speed": 1}, "wrong type: the command has no arg 'position'"),
    ],
)
async def test_bad_commands_are_refused_before_anything_is_written(
    ioc: IocProcess, motor: EpicsActuator, args: dict[str, Any], reason: str
) -> None:
    await motor.run({"position": 1.0})
    with pytest.raises(EpicsCommandError) as info:
        await motor.run(args)
    assert str(info.value).startswith(reason), str(info.value)
    assert await caget(ioc.pv("mtr")) == 1.0 and await caget(ioc.pv("mtr.RBV")) == pytest.approx(1.0)


async def test_the_handlers_own_limits_apply_too(ioc: IocProcess) -> None:
    act = EpicsActuator(EpicsPutSettings(pv=ioc.pv("mtr"), low=-2, high=2, connect_timeout_s=1))
    try:
        before = await caget(ioc.pv("mtr"))
        with pytest.raises(EpicsCommandError, match=r"out of limits: 3 is outside the actuator's limits \[-2.0, 2.0\]"):
            await act.run({"value": 3})
        assert await caget(ioc.pv("mtr")) == before
    finally:
        await act.close()


async def test_a_readback_that_does_not_arrive_is_a_timeout(ioc: IocProcess, motor: EpicsActuator) -> None:
    await caput(ioc.pv("mtr.OFF"), 0.5)  # the encoder disagrees by 0.5 mm
    try:
        started = time.monotonic()
        with pytest.raises(EpicsCommandError) as info:
            await motor.run({"position": 2.0})
        assert str(info.value).startswith("readback timeout: UA:mtr.RBV reads 2.5, not 2.0 ± 0.001 after 1s")
        assert 1.0 <= time.monotonic() - started < 5
    finally:
        await caput(ioc.pv("mtr.OFF"), 0.0)


async def test_enum_integer_and_string_pvs_are_type_checked(ioc: IocProcess) -> None:
    shutter = EpicsActuator(EpicsPutSettings(pv=ioc.pv("shutter"), readback_pv=ioc.pv("shutter"), connect_timeout_s=1))
    count = EpicsActuator(EpicsPutSettings(pv=ioc.pv("ramp:go"), connect_timeout_s=1))
    label = EpicsActuator(EpicsPutSettings(pv=ioc.pv("label"), readback_pv=ioc.pv("label"), connect_timeout_s=1))
    try:
        assert (await shutter.run({"value": "Open"}))["readback"] == 1
        assert (await shutter.run({"value": 0}))["readback"] == 0
        with pytest.raises(
            EpicsCommandError, match=r"wrong type: PV UA:shutter holds ENUM with choices \['Closed', 'Open'\]"
        ):
            await shutter.run({"value": "Ajar"})
        with pytest.raises(EpicsCommandError, match="want an integer"):
            await count.run({"value": 2.5})
        assert (await label.run({"value": "sample B"}))["readback"] == "sample B"
        with pytest.raises(EpicsCommandError, match="at most 39 bytes"):
            await label.run({"value": "x" * 60})
        assert await caget(ioc.pv("label")) == "sample B"
    finally:
        for a in (shutter, count, label):
            await a.close()


async def test_an_unreachable_ioc_is_a_clear_nack_and_the_next_command_works_again(
    ioc: IocProcess, motor: EpicsActuator
) -> None:
    await motor.run({"position": 0.5})
    ioc.stop()
    try:
        started = time.monotonic()
        with pytest.raises(EpicsCommandError, match=r"^IOC unreachable: .*UA:mtr.*nothing was written"):
            await motor.run({"position": 1.5})
        assert time.monotonic() - started < 4
    finally:
        ioc.start()
    result = await motor.run({"position": 1.5})
    assert result["readback"] == pytest.approx(1.5, abs=0.001)
    # A PV that no IOC serves is the same nack.
    ghost = EpicsActuator(EpicsPutSettings(pv=ioc.pv("nothing"), connect_timeout_s=0.5))
    try:
        with pytest.raises(EpicsCommandError, match=r"^IOC unreachable: PV UA:nothing did not connect within 0.5s"):
            await ghost.run({"value": 1})
    finally:
        await ghost.close()
