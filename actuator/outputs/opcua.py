"""opcua: hand each result to the PLC's OPC UA server and read its echo: written to result nodes (handshake
last), or as one method call when opcua.method_node is set (a PLC that wants the result in one atomic request).

Node types the PLC must declare: handshake and echo UInt16, result, reason and state Int16, part id UInt32;
a method takes (result Int16, reason Int16, part id UInt32, handshake UInt16).
asyncua is imported here only, when this back end is built. A lost server is retried every second (state
output-fault meanwhile); results whose due point passes meanwhile are reported late, never written late.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable
from typing import Any

from ..config import ActuatorConfig
from .base import OutputFault, OutputUnavailable
from .handshake import HandshakeOutput, Result

log = logging.getLogger(__name__)


class OpcUaOutput(HandshakeOutput):
    kind = "opcua"

    def __init__(self, config: ActuatorConfig) -> None:
        super().__init__(config)
        try:
            from asyncua import ua
            from asyncua.sync import Client
            from asyncua.ua.uaerrors import UaError
        except ImportError as error:
            msg = "output.kind opcua: asyncua is not installed; pip install 'lineguard[actuator]'"
            raise OutputUnavailable(msg) from error
        self.ua, self.config = ua, config.opcua
        self._errors = (UaError, OSError, concurrent.futures.TimeoutError)
        self._client_type = Client
        self._client: Any = None
        self._nodes: dict[str, Any] = {}
        self._method: Any = None  # with opcua.method_node: the method node, and the object it is called on
        self._method_parent: Any = None

    def _connected(self) -> Any:
        if self._client is None:
            client = self._client_type(self.config.endpoint, timeout=self.config.timeout_s)
            try:
                client.connect()
            except self._errors as error:
                msg = f"{self.config.endpoint}: cannot connect: {error}"
                raise OutputFault(msg) from error
            self._client = client
            names = ("handshake", "result", "reason", "part", "echo", "state")
            self._nodes = {name: client.get_node(getattr(self.config, f"{name}_node")) for name in names}
            if self.config.method_node:
                method = client.get_node(self.config.method_node)
                try:
                    self._method, self._method_parent = method, method.get_parent()
                except self._errors as error:
                    self._drop()
                    msg = f"{self.config.endpoint}: method {self.config.method_node} has no parent object: {error}"
                    raise OutputFault(msg) from error
        return self._client

    def _variant(self, value: int, kind: str) -> Any:
        return self.ua.Variant(value, getattr(self.ua.VariantType, kind))

    def _request(self, what: str, request: Callable[[], Any]) -> Any:
        """Run one request on the connected server; a failure drops the connection and is an OutputFault."""
        self._connected()
        try:
            return request()
        except self._errors as error:
            self._drop()
            msg = f"{self.config.endpoint}: {what} failed: {error}"
            raise OutputFault(msg) from error

    def _write(self, what: str, names: tuple[str, ...], values: list[Any]) -> None:
        data = [self.ua.DataValue(value) for value in values]
        self._request(f"write {what}", lambda: self._client.write_values([self._nodes[n] for n in names], data))

    def _write_result(self, result: Result) -> None:
        values = [
            self._variant(result.result, "Int16"),
            self._variant(result.reason, "Int16"),
            self._variant(result.part_id, "UInt32"),
            self._variant(result.handshake, "UInt16"),  # last: the PLC acts on a new handshake
        ]
        if self.config.method_node:  # one call with the same values, in the same order
            self._request(f"call {self.config.method_node}", lambda: self._method_call(values))
        else:
            self._write("result", ("result", "reason", "part", "handshake"), values)

    def _method_call(self, arguments: list[Any]) -> Any:
        return self._method_parent.call_method(self._method, *arguments)  # resolved by _connected()

    def _read_echo(self) -> int:
        return int(self._request(f"read {self.config.echo_node}", lambda: self._nodes["echo"].read_value()))

    def _write_state(self, code: int) -> None:
        self._write("state", ("state",), [self._variant(code, "Int16")])

    def _drop(self) -> None:
        client, self._client, self._method, self._method_parent = self._client, None, None, None
        if client is not None:
            try:
                client.disconnect()
            except self._errors as error:
                log.debug("opcua: disconnect after a failure: %s", error)

    def close(self) -> None:
        if self._client is not None:
            try:
                self._write_state(0)
            except OutputFault as error:
                log.warning("opcua: could not write state 0 at close (the PLC's own watchdog must cover it): %s", error)
        self._drop()
