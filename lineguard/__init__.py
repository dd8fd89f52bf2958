"""Lineguard: edge inspection for production-line cameras.

The code lives in the top-level folders `agent/`, `trainer/` and `deploy/`, installed as
`lineguard.agent`, `lineguard.trainer` and `lineguard.deploy`.
"""

__version__ = "0.1.0"
