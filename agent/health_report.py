"""`lineguard-agent status`: the agent's health at a glance for the person at the line, from this machine.

Reads the status decision writes into run_dir every few seconds (the same record as the retained status
topic), so it works while the broker is away. Exit code: 0 ok, 1 degraded, 2 failing, 3 no fresh status.
"""

from __future__ import annotations

import time
from typing import TextIO

from .config import AgentConfig
from .contract import AgentStatus, ContractError, decode
from .decision.process import STATUS_FILE

STALE_AFTER_S = 10.0
EXIT_CODES = {"ok": 0, "degraded": 1, "failing": 2}
EXIT_NO_STATUS = 3


def report(config: AgentConfig, out: TextIO) -> int:
    path = config.run_dir / STATUS_FILE
    try:
        status = decode(AgentStatus, path.read_bytes())
    except FileNotFoundError:
        print(f"{config.agent_id}: no status in {path}: is `lineguard-agent run` running with this config?", file=out)
        return EXIT_NO_STATUS
    except (OSError, ContractError) as error:
        print(f"{config.agent_id}: cannot read {path}: {error}", file=out)
        return EXIT_NO_STATUS
    age_s = time.time() - status.ts
    if age_s > STALE_AFTER_S or not status.online or status.health is None:
        state = "stopped" if not status.online else f"no news for {age_s:.0f} s (decision hung or stopped?)"
        print(f"{status.agent_id} on {status.line}: NOT RUNNING: {state}", file=out)
        return EXIT_NO_STATUS
    print(f"{status.agent_id} on {status.line}: {status.health.state.upper()}", file=out)
    for reason in status.health.reasons:
        print(f"  ! {reason}", file=out)
    backend = status.backend.name if status.backend else "no engine report yet"
    models = {camera.model for camera in status.cameras.values() if camera.model}
    model = status.model or (", ".join(sorted(models)) if models else "—")
    print(
        f"model {model} on {backend}; {status.queue_depth} frames pending; "
        f"{status.mqtt_queued} messages wait for the broker",
        file=out,
    )
    for name, camera in sorted(status.cameras.items()):
        expected = f"/{camera.expected_fps:g}" if camera.expected_fps else ""
        causes = ", ".join(f"{cause} {count}" for cause, count in sorted(camera.failsafes.items()))
        line = f"  {name:<12} {camera.fps:g}{expected} fps  failsafe {100 * camera.failsafe_share:.1f} %"
        if status.model is None and camera.model:
            line += f"  {camera.model}"
        print(f"{line}  {causes}".rstrip(), file=out)
    return EXIT_CODES[status.health.state]
