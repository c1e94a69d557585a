"""An asyncio MQTT client on paho-mqtt: awaited PUBACKs, a bounded in-flight window, manual acks.

paho's protocol engine runs on the asyncio event loop itself, with no network
thread: the socket is watched with ``loop.add_reader``, and paho's
``loop_read``/``loop_write``/``loop_misc`` are called from there and from a
one-second timer. Every paho callback therefore runs on the event-loop
thread and completes futures directly (no ``call_soon_threadsafe`` hop, no
GIL ping-pong between two threads), which is what makes one client keep up
with the broker.

* ``await publish(...)`` returns when the broker acknowledged (QoS 1/2), and
  at most ``max_inflight`` publishes are unacknowledged at once (paho cannot
  track more than 65,535).
* ``manual_ack=True`` leaves the PUBACK of received messages to the caller
  (:meth:`MqttClient.ack`), so a message is acknowledged only after the next
  hop took it. With MQTT 5, Receive Maximum tells the broker to stop sending
  when that many are unacknowledged: backpressure without unbounded buffers.
* Persistent sessions (``clean_start=False`` + session expiry) keep
  subscriptions and queued QoS 1 messages across disconnects; unacknowledged
  publishes are sent again after a reconnect.
* After the first successful connect, a lost connection is re-established in
  the background with exponential backoff plus random jitter (so a fleet
  whose broker restarts does not reconnect in lock-step).

The blocking parts of a connection (name lookup, TCP connect, TLS handshake)
run in a worker thread; the connected socket is then handed to paho on the
loop. The socket paho sees buffers reads (paho reads a packet a few bytes at
a time) and gathers writes into one ``send`` per loop pass, and MQTT 5
PUBLISH properties are packed directly (:func:`pack_publish_properties`)
instead of through paho's generic encoder.

Modules: :mod:`~reflexarc.mqtt.wire` (the codec), :mod:`~reflexarc.mqtt._paho` (paho's
client on the event loop), :mod:`~reflexarc.mqtt.client` (:class:`MqttClient`).
"""

from reflexarc.mqtt.client import MqttClient, MqttError, Will
from reflexarc.mqtt.wire import MqttMessage, PackedProperties, pack_publish_properties

__all__ = ["MqttClient", "MqttError", "MqttMessage", "PackedProperties", "Will", "pack_publish_properties"]
