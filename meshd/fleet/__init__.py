"""Fleet control: routes, splits and failover of services from config sources (Consul
config entries, the Kubernetes Gateway API), applied live.

``api`` is the contract plugin authors write against; ``registry`` finds and loads
plugins from the ``meshd.config`` entry-point group; ``meshd.control.fleet`` runs them in
the control process and the workers apply what they publish.
"""

from meshd.fleet.api import (
    API_VERSION,
    Clear,
    HeaderMatch,
    Match,
    PathMatch,
    QueryMatch,
    Refused,
    Resolver,
    Route,
    Routes,
    Set,
    Source,
    Split,
    Subset,
    Target,
    Update,
    WeightedTarget,
)

__all__ = ["API_VERSION", "Clear", "HeaderMatch", "Match", "PathMatch", "QueryMatch",
           "Refused", "Resolver", "Route", "Routes", "Set", "Source", "Split", "Subset",
           "Target", "Update", "WeightedTarget"]

from meshd.fleet.api import Authorization, AuthzRule

__all__ += ["Authorization", "AuthzRule"]
