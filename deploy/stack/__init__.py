"""The compose stack's topology without Docker (`make stack`, `python -m deploy.stack`).

It lives next to the compose stack's other deployment files rather than in bench/: it is a
way to run the deployment, used by people and by tests/e2e/test_stack.py, not a benchmark.
"""

from deploy.stack.launcher import GatewayPorts, Ports, Stack, StackError, gateway_env

__all__ = ["GatewayPorts", "Ports", "Stack", "StackError", "gateway_env"]
