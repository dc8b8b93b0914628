"""The operator's kopf entry point (`kopf run -m routenlp.operator.handlers`, `routenlp operator`): importing it
registers every handler.

One module per kind holds its handlers and the objects it becomes: modeltier, routingpolicy, campaign (over the pure
state machine in campaign_flow); owned repairs drift in the objects they own; webhook injects the router sidecar;
runtime holds the process-wide settings, login and the I/O helpers they share. Each kind has one idempotent
`reconcile_*` (read -> build -> apply -> status), run on create/update/resume, on a resync timer, and when an owned
object changes. A bad spec becomes `Ready=False, reason=InvalidSpec` plus a Warning Event, and the change handler
raises kopf.PermanentError so kopf does not retry a spec that cannot succeed.
"""

from . import campaign, modeltier, owned, routingpolicy, runtime, webhook

__all__ = ["campaign", "modeltier", "owned", "routingpolicy", "runtime", "webhook"]
