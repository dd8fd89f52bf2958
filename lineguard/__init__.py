"""Lineguard: edge inspection for production-line cameras.

The code lives in the top-level folders `agent/`, `trainer/`, `deploy/` and `actuator/`, installed as
`lineguard.agent`, `lineguard.trainer`, `lineguard.deploy` and `lineguard.actuator`.
"""

__version__ = "0.1.0"
