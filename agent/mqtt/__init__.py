"""MQTT transport: one client factory (client.py) and the agent's never-blocking publisher (publisher.py).

What travels on which topic is the contract's business (agent/contract); this package only moves bytes.
"""

from .client import MqttError, Subscription, Will, make_client, start, stop, tls_enabled
from .publisher import MqttPublisher

__all__ = ["MqttError", "MqttPublisher", "Subscription", "Will", "make_client", "start", "stop", "tls_enabled"]
