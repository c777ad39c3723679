"""Discovery: where endpoints come from.

``api`` is the contract plugin authors write against; ``registry`` finds and loads
plugins from the ``meshd.discovery`` entry-point group; the control process runs them.
"""

from meshd.discovery.api import (
    API_VERSION,
    Add,
    Backend,
    Endpoint,
    NoSuchService,
    Remove,
    Reset,
    Update,
)

__all__ = ["API_VERSION", "Add", "Backend", "Endpoint", "NoSuchService", "Remove", "Reset", "Update"]
