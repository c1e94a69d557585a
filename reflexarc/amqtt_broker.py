"""A pure-Python MQTT 3.1.1 broker (amqtt) for machines without Mosquitto.

Run as ``python -m reflexarc.amqtt_broker --port PORT``; the embedded-broker
manager starts it as a child process so that it is stopped by PID like any
other broker. Clients must speak MQTT 3.1.1 (amqtt refuses v5 CONNECT), so
reflexarc falls back to structured CloudEvents on it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from amqtt.broker import Broker


def broker_config(port: int) -> dict[str, object]:
    """amqtt configuration for one loopback listener.

    ``allow_anonymous: false`` with any username accepted: with anonymous
    sessions amqtt never queues messages for offline persistent sessions,
    which would lose commands to a reconnecting device. reflexarc clients
    always send a username.
    """
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": False}},
    }


async def serve(port: int) -> None:
    """Run the broker until SIGTERM or SIGINT."""
    broker = Broker(broker_config(port))
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
