"""What a Service's kept objects tell meshd: the updates of one fleet part (routes, authz)
since the last call, shared by ``routes.ServiceRoutes`` and ``authz.ServiceAuthz``.

meshd keeps one refusal per part, which a ``Set`` clears: a refusal is said again after
every Set, and the first call always says something."""

from __future__ import annotations

from meshd.fleet.api import Clear, Part, PartKind, Refused, Set, Update


class PartReporter:
    def __init__(self, kind: PartKind, noun: str) -> None:
        self.kind = kind
        self.noun = noun    # "routes", "policies": in "(and 2 more refused routes)"
        self._sent: tuple[Part | None, tuple[str, str] | None] | None = None

    def updates(self, part: Part | None, refused: list[tuple[str, str]]) -> list[Update]:
        summary = None
        if refused:
            entry, why = refused[0]
            more = (f" (and {len(refused) - 1} more refused {self.noun})"
                    if len(refused) > 1 else "")
            summary = (entry, why + more)
        sent = self._sent
        out: list[Update] = []
        if sent is None or sent[0] != part or (sent[1] is not None and summary is None):
            out.append(Set(part) if part is not None else Clear(self.kind))
            if summary is not None:
                out.append(Refused(self.kind, *summary))
        elif summary != sent[1] and summary is not None:
            out.append(Refused(self.kind, *summary))
        self._sent = (part, summary)
        return out
