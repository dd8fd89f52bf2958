"""GigE Vision cameras through Aravis 0.8 (PyGObject), imported when a gige source opens.

read_into(out): Aravis fills a private pool of pre-allocated buffers and each frame is copied once (one memcpy)
into `out` (a ring slot); the buffer goes straight back to the stream. (Letting the camera write straight into
ring slots works with Aravis, see ENVIRONMENT.md, but needs a ring rule that a slot queued to the camera is never
reclaimed; the capture loop does not do that, so this source does not offer it.)

Verified on Aravis 0.8.26 with arv-fake-gv-camera-0.8: the same Python buffer object comes back from the stream;
the 16-bit frame id wraps from 65535 to 1 (0 is reserved); a broken buffer keeps a stale frame id, so it is
reported with -1 and counted against the next frame-id gap. A camera that disappears is noticed late by Aravis
(control-lost after ~5.5 s, a register read fails after 2.5 s): a register read runs off-thread after 0.5 s
without frames and the source gives up on it after 1.2 s, so read_* raises CameraUnavailable within ~2 s.
Releasing a lost camera waits on GVCP timeouts (~7.5 s), so close() hands that to a background thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import CHANNELS, CameraError, CameraUnavailable, FrameInfo, check_out

if TYPE_CHECKING:
    from ..config import CameraConfig

log = logging.getLogger(__name__)

_PIXEL_FORMATS = {"mono8": "Mono8", "rgb8": "RGB8", "bgr8": "BGR8"}
_GVCP_CCP_REGISTER = 0x0A00  # Control Channel Privilege, a bootstrap register of every GigE Vision device
_PACKET_SIZE_BYTES = 8192  # the default 1400 costs CPU on loopback; real links need jumbo frames for this
_PRIVATE_BUFFERS = 8
_PROBE_AFTER_IDLE_S = 0.5
_COMMAND_DEADLINE_S = 1.2  # Aravis retries a lost GVCP packet after 500 ms: two lost packets still pass
_POP_SLICE_S = 0.1
_TRIGGER_RETRY_S = 1.0
_FREE_RUN_SILENCE_S = 5.0  # or three frame periods, if longer
_FRAME_ID_RANGE = 0x10000


def frame_id_gap(previous: int, current: int) -> int:
    """Frame ids missing between two delivered frames of a GigE Vision frame counter.

    GigE Vision 1.x block ids are 16-bit, run 1..65535 and wrap to 1 (0 is reserved); a camera that wraps to 0
    is handled too. A step back, or forward by half the range or more, reads as a counter reset: 0 missing.
    """
    if previous >= _FRAME_ID_RANGE or current >= _FRAME_ID_RANGE:  # 64-bit ids (GigE Vision 2 extended ids)
        return max(0, current - previous - 1)
    step = (current - previous) % _FRAME_ID_RANGE
    if current < previous:
        step -= 1  # the wrap skipped the reserved 0
    gap = step - 1
    return gap if 0 <= gap < _FRAME_ID_RANGE // 2 else 0


class FrameIdTracker:
    """Counts the frames lost before each good frame: its frame-id gap less the broken buffers seen meanwhile."""

    def __init__(self) -> None:
        self._last_good_id: int | None = None
        self._broken_since = 0

    def good(self, frame_id: int) -> int:
        """A complete frame arrived; returns how many frames went missing right before it."""
        missed = 0
        if self._last_good_id is not None:
            missed = max(0, frame_id_gap(self._last_good_id, frame_id) - self._broken_since)
        self._last_good_id = frame_id
        self._broken_since = 0
        return missed

    def broken(self) -> None:
        """A broken buffer arrived; its frame id is not trustworthy, but it accounts for one id of the gap."""
        self._broken_since += 1


def _import_aravis() -> tuple[Any, Any]:
    """(Aravis, GLib) modules, or CameraError naming what to install."""
    try:
        import gi
    except ImportError as error:
        msg = "gige cameras need PyGObject: pip install 'lineguard[gige]' (builds against the Debian packages libgirepository1.0-dev libcairo2-dev pkg-config)"
        raise CameraError(msg) from error
    try:
        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis, GLib
    except (ValueError, ImportError) as error:
        msg = f"gige cameras need Aravis 0.8: apt-get install gir1.2-aravis-0.8 (and aravis-tools-cli for arv-tool-0.8) ({error})"
        raise CameraError(msg) from error
    return Aravis, GLib


class _Liveness:
    """Notices within ~2 s a camera that stopped answering, by running GVCP commands off-thread with a deadline."""

    def __init__(self, device: Any, camera_name: str, *, silence_limit_s: float | None) -> None:
        self._device = device
        self._camera_name = camera_name
        self._silence_limit_s = silence_limit_s  # free-run: longest wait for a frame from a camera that answers
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"gvcp-{camera_name}")
        lost = threading.Event()  # set from Aravis's heartbeat thread
        self._lost = lost
        self._handler_id = device.connect("control-lost", lambda _device: lost.set())
        self._pending: list[tuple[str, float, Future[Any]]] = []
        self._alive_at = self._frame_at = time.monotonic()
        self.gone = False

    def saw_frame(self) -> None:
        """A buffer arrived (or acquisition just started)."""
        self._alive_at = self._frame_at = time.monotonic()

    def submit(self, what: str, command: Callable[[], Any]) -> None:
        """Run a GVCP command (register read, software trigger) off-thread; check() enforces its deadline."""
        self._pending.append((what, time.monotonic(), self._executor.submit(command)))

    def check(self) -> None:
        """Raise CameraUnavailable if the camera is lost; start a register read after a silence."""
        try:
            self._check()
        except CameraUnavailable:
            self.gone = True
            raise

    def _check(self) -> None:
        name = self._camera_name
        if self._lost.is_set():
            msg = f"camera {name}: Aravis lost control of the camera (heartbeat unanswered); check power and cable"
            raise CameraUnavailable(msg)
        now = time.monotonic()
        self._check_commands(now)
        if self._silence_limit_s is not None and now - self._frame_at > self._silence_limit_s:
            msg = f"camera {name}: answers but sent no frame for {now - self._frame_at:.1f} s while free-running; UDP stream blocked by a firewall, or packets larger than the link MTU (jumbo frames off)?"
            raise CameraUnavailable(msg)
        if not self._pending and now - self._alive_at > _PROBE_AFTER_IDLE_S:
            self.submit("register read", lambda: self._device.read_register(_GVCP_CCP_REGISTER))

    def _check_commands(self, now: float) -> None:
        """Raise for a command past its deadline or failed; a completed one counts as a sign of life."""
        name = self._camera_name
        for what, started, future in list(self._pending):
            if not future.done():
                if now - started > _COMMAND_DEADLINE_S:
                    msg = f"camera {name}: {what} unanswered for {now - started:.1f} s; camera off, unplugged or its IP changed?"
                    raise CameraUnavailable(msg)
                continue
            self._pending.remove((what, started, future))
            error = future.exception()
            if error is not None:
                msg = f"camera {name}: {what} failed ({error}); camera off or unplugged?"
                raise CameraUnavailable(msg) from error
            if what == "register read" and not future.result() & 0x3:
                msg = f"camera {name}: the camera no longer grants us control (heartbeat expired or another program took it)"
                raise CameraUnavailable(msg)
            self._alive_at = max(self._alive_at, started)

    def close(self) -> None:
        """Stop watching; drops the device reference so that the camera's owner decides where it finalises."""
        self._device.disconnect(self._handler_id)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._device = None


class AravisSource:
    """A GigE Vision camera: opened by id or IP (empty = first found), configured from CameraConfig."""

    def __init__(
        self,
        config: CameraConfig,
        *,
        n_buffers: int = _PRIVATE_BUFFERS,
        packet_size_bytes: int = _PACKET_SIZE_BYTES,
    ) -> None:
        if n_buffers < 2:
            msg = f"n_buffers must be >= 2, got {n_buffers}"
            raise ValueError(msg)
        self._aravis, self._glib = _import_aravis()
        self._name = config.name
        self._trigger = config.trigger
        self._n_buffers = n_buffers
        self._camera = self._open(config.address)
        try:
            self._configure(config, packet_size_bytes)
            self._stream = self._camera.create_stream(None, None)
        except self._glib.Error as error:
            self._camera = None
            if error.matches(self._aravis.device_error_quark(), self._aravis.DeviceError.TIMEOUT):
                msg = f"camera {self._name}: camera stopped answering while being configured ({error.message})"
                raise CameraUnavailable(msg) from error
            msg = f"camera {self._name}: cannot configure the camera ({error.message}); check the values in the config against arv-tool-0.8 features"
            raise CameraError(msg) from error
        self._liveness = _Liveness(self._camera.get_device(), self._name, silence_limit_s=self._silence_limit_s)
        self._ids = FrameIdTracker()
        self._images: list[np.ndarray] = []  # memory Aravis writes into, as (height, width, channels) views
        self._buffers: list[Any] = []
        self._index_of: dict[Any, int] = {}
        self._started = False
        self._trigger_sent_at: float | None = None  # software trigger awaiting its frame

    def _open(self, address: str) -> Any:
        try:
            return self._aravis.Camera.new(address or None)
        except self._glib.Error as error:
            where = address or "any address (first camera found)"
            msg = f"camera {self._name}: no GigE Vision camera answers at {where} ({error.message}); check power, cable and IP (arv-tool-0.8 lists cameras) and that no other program controls it"
            raise CameraUnavailable(msg) from error

    def _configure(self, config: CameraConfig, packet_size_bytes: int) -> None:
        camera = self._camera
        if not camera.is_gv_device():
            msg = f"camera {self._name}: {camera.get_model_name()} is not a GigE Vision camera (USB3 Vision?); the gige source drives GigE Vision only"
            raise CameraError(msg)
        camera.gv_set_packet_size(packet_size_bytes)
        self._set_pixel_format(config.pixel_format)
        region = camera.get_region()
        if config.width_px or config.height_px:  # offsets go to 0: the config has none, leftovers would shift the frame
            camera.set_region(0, 0, config.width_px or region.width, config.height_px or region.height)
            region = camera.get_region()
        self.width, self.height = region.width, region.height
        self.channels = CHANNELS[config.pixel_format]
        if (config.width_px or self.width, config.height_px or self.height) != (self.width, self.height):
            log.warning(
                "camera %s: asked for %dx%d, camera set %dx%d",
                self._name,
                config.width_px,
                config.height_px,
                self.width,
                self.height,
            )
        self._set_exposure_and_gain(config)
        self._set_trigger(config.trigger)
        self._silence_limit_s: float | None = None
        if config.trigger == "free-run":
            self._set_frame_rate(config.acquisition_fps)
            frame_rate = camera.get_frame_rate() if camera.is_frame_rate_available() else 0.0
            self._silence_limit_s = max(_FREE_RUN_SILENCE_S, 3 / frame_rate if frame_rate > 0 else 0.0)
        self._payload = camera.get_payload()
        if self._payload < self.width * self.height * self.channels:
            msg = f"camera {self._name}: payload {self._payload} bytes is smaller than a {self.width}x{self.height} {config.pixel_format} frame"
            raise CameraError(msg)

    def _set_pixel_format(self, pixel_format: str) -> None:
        wanted = _PIXEL_FORMATS[pixel_format]
        available = self._camera.dup_available_pixel_formats_as_strings()
        if wanted not in available:
            msg = f"camera {self._name}: pixel format {wanted} not offered (camera has {', '.join(available)}); choose mono8 or rgb8"
            raise CameraError(msg)
        self._camera.set_pixel_format_from_string(wanted)

    def _set_exposure_and_gain(self, config: CameraConfig) -> None:
        """Set what the config gives, auto mode off first; Aravis does not range-check, so this does."""
        camera = self._camera
        controls = (
            ("exposure_us", config.exposure_us, camera.is_exposure_time_available, camera.get_exposure_time_bounds,
             camera.set_exposure_time, camera.is_exposure_auto_available, camera.set_exposure_time_auto),
            ("gain_db", config.gain_db, camera.is_gain_available, camera.get_gain_bounds,
             camera.set_gain, camera.is_gain_auto_available, camera.set_gain_auto),
        )  # fmt: skip
        for key, value, available, bounds, setter, auto_available, set_auto in controls:
            if value is None:
                continue
            if not available():
                msg = f"camera {self._name}: camera has no {key.split('_')[0]} control; leave {key} unset"
                raise CameraError(msg)
            if auto_available():
                set_auto(self._aravis.Auto.OFF)
            low, high = bounds()
            if not low <= value <= high:
                msg = f"camera {self._name}: {key} = {value} is outside the camera's range {low}..{high}"
                raise CameraError(msg)
            setter(value)

    def _set_frame_rate(self, fps: float | None) -> None:
        """Set a free-running camera's acquisition frame rate (None: leave it); range-checked, as Aravis does not."""
        if fps is None:
            return
        camera = self._camera
        if not camera.is_frame_rate_available():
            msg = f"camera {self._name}: camera has no frame rate control; leave acquisition_fps unset"
            raise CameraError(msg)
        low, high = camera.get_frame_rate_bounds()
        if not low <= fps <= high:
            msg = f"camera {self._name}: acquisition_fps = {fps} is outside the camera's range {low}..{high}"
            raise CameraError(msg)
        camera.set_frame_rate(fps)

    def _set_trigger(self, trigger: str) -> None:
        camera = self._camera
        camera.set_acquisition_mode(self._aravis.AcquisitionMode.CONTINUOUS)
        if trigger == "free-run":
            camera.clear_triggers()
        elif trigger == "software":
            if not camera.is_software_trigger_supported():
                msg = f"camera {self._name}: camera has no software trigger; use trigger = free-run or hardware"
                raise CameraError(msg)
            camera.set_trigger("Software")
        else:
            lines = [source for source in camera.dup_available_trigger_sources() if source != "Software"]
            if not lines:
                msg = f"camera {self._name}: camera offers no hardware trigger input"
                raise CameraError(msg)
            camera.set_trigger(lines[0])
            log.info("camera %s: hardware trigger on %s (rising edge), of %s", self._name, lines[0], ", ".join(lines))

    def read_into(self, out: np.ndarray, *, timeout_s: float) -> FrameInfo | None:
        """Copy the next frame into `out` (one memcpy from a private Aravis buffer); None on timeout."""
        check_out(out, self)
        if not self._buffers:
            self._add_buffers([np.empty(self._payload, np.uint8) for _ in range(self._n_buffers)])
        buffer = self._next_buffer(timeout_s)
        if buffer is None:
            return None
        try:
            info = self._frame_info(buffer)
            if info.ok:
                np.copyto(out, self._images[self._index_of[buffer]])
        finally:
            self._stream.push_buffer(buffer)
        return info

    def _add_buffers(self, memories: list[np.ndarray]) -> None:
        """Hand the stream these memories as its buffers (Aravis writes into them) and queue them all."""
        shape = (self.height, self.width, self.channels)
        for index, memory in enumerate(memories):
            buffer = self._aravis.Buffer.new(self._payload, memory.ctypes.data)
            self._buffers.append(buffer)  # kept alive: the stream hands back these very objects
            self._index_of[buffer] = index
            self._images.append(memory.reshape(-1)[: self.height * self.width * self.channels].reshape(shape))
            self._stream.push_buffer(buffer)

    def _next_buffer(self, timeout_s: float) -> Any:
        """Pop the next filled buffer, firing the software trigger if needed; None on timeout."""
        if self._camera is None:
            msg = f"camera {self._name}: source is closed"
            raise RuntimeError(msg)
        if not self._started:
            self._start()
        if self._trigger == "software":
            self._fire_trigger()
        deadline = time.monotonic() + timeout_s
        while True:
            self._liveness.check()  # before popping, so a raise never drops a filled buffer
            remaining = deadline - time.monotonic()
            buffer = self._stream.timeout_pop_buffer(int(min(max(remaining, 0.0), _POP_SLICE_S) * 1e6))
            if buffer is not None:
                self._liveness.saw_frame()
                self._trigger_sent_at = None
                return buffer
            if remaining <= 0:
                return None

    def _start(self) -> None:
        try:
            self._camera.start_acquisition()
        except self._glib.Error as error:
            self._liveness.gone = True
            msg = f"camera {self._name}: cannot start acquisition ({error.message}); camera off or unplugged?"
            raise CameraUnavailable(msg) from error
        self._started = True
        self._liveness.saw_frame()  # the silence clock starts now, not at open
        log.info("camera %s: acquisition started (%s)", self._name, self._trigger)

    def _fire_trigger(self) -> None:
        """One trigger per frame read; re-fire only if the last one produced nothing for _TRIGGER_RETRY_S."""
        now = time.monotonic()
        if self._trigger_sent_at is not None and now - self._trigger_sent_at < _TRIGGER_RETRY_S:
            return
        if self._trigger_sent_at is not None:
            log.warning(
                "camera %s: no frame %.1f s after a software trigger; triggering again",
                self._name,
                now - self._trigger_sent_at,
            )
        self._trigger_sent_at = now
        self._liveness.submit("software trigger", self._camera.software_trigger)

    def _frame_info(self, buffer: Any) -> FrameInfo:
        t_capture_ns = _monotonic_from_system_ns(buffer.get_system_timestamp())
        status = buffer.get_status()
        if status != self._aravis.BufferStatus.SUCCESS:
            self._ids.broken()
            reason = f"incomplete GigE Vision buffer ({status.value_nick})"
            return FrameInfo(ok=False, t_capture_ns=t_capture_ns, camera_frame_id=-1, reason=reason)
        frame_id = buffer.get_frame_id()
        missed = self._ids.good(frame_id)
        camera_ns = buffer.get_timestamp() or -1  # ns on the camera's clock; 0: the camera sent none
        size = (buffer.get_image_width(), buffer.get_image_height())
        wrong_size = size != (self.width, self.height)
        return FrameInfo(
            ok=not wrong_size,
            t_capture_ns=t_capture_ns,
            camera_frame_id=frame_id,
            reason=f"frame is {size[0]}x{size[1]}, expected {self.width}x{self.height}" if wrong_size else "",
            missed_before=missed,
            camera_timestamp_ns=camera_ns,
        )

    def close(self) -> None:
        """Stop acquisition and release the camera; a lost camera is released in the background."""
        camera, stream = self._camera, self._stream
        if camera is None:
            return
        self._camera = self._stream = None
        self._liveness.close()
        if not self._liveness.gone:
            try:
                camera.stop_acquisition()
            except self._glib.Error as error:
                log.warning("camera %s: stop acquisition failed (%s)", self._name, error.message)
            return  # the stream finalises on return, joining its thread: no write lands in our memory after it
        keep = [camera, stream, self._buffers, self._images]
        del camera, stream  # the thread must hold the last references, or they finalise here, blocking
        release = threading.Thread(target=keep.clear, name=f"aravis-release-{self._name}", daemon=True)
        release.start()
        log.info("camera %s: releasing the lost camera in the background (GVCP timeouts take ~7 s)", self._name)


def _monotonic_from_system_ns(system_ns: int) -> int:
    """Map Aravis's host receive time (CLOCK_REALTIME ns) onto time.monotonic_ns(); now if implausible."""
    monotonic_now, age_ns = time.monotonic_ns(), time.time_ns() - system_ns
    return monotonic_now - age_ns if 0 <= age_ns < 1_000_000_000 else monotonic_now
