"""Which transport a scheduler, worker or cluster uses: ``tcp``, ``tls``,
``ucx``, or ``auto`` (UCX where this process can use it, TCP otherwise).

UCX reads its own settings from the environment (``UCX_TLS``,
``UCX_NET_DEVICES``, ...); workers started by rdask inherit them.
"""

from __future__ import annotations

import logging

from . import _rdask

logger = logging.getLogger("rdask")

KNOWN = ("tcp", "tls", "ucx", "auto")


def resolve(protocol: str | None, security=None, report=None, follow: str | None = None) -> str:
    """The scheme to use (``tcp``, ``tls`` or ``ucx``) for what was asked;
    without a protocol, that of the address ``follow`` (a worker speaks its
    scheduler's) when it names one.

    Raises ValueError with one line saying why a choice cannot be used
    (UCX missing, TLS without certificates, an unknown name). What ``auto``
    chose goes to ``report`` (a callable taking one line; default: the
    ``rdask`` logger)."""
    report = report or logger.info
    if protocol is None and follow and "://" in follow:
        protocol = scheme_of(follow)
    p = (protocol or ("tls" if security else "tcp")).lower().replace("://", "")
    if p not in KNOWN:
        raise ValueError(f"protocol {p!r} is not supported: tcp, tls, ucx or auto (MPI jobs use rdask-mpi)")
    if p == "tls" and not security:
        raise ValueError("protocol tls needs certificates (--tls-ca-file, --tls-cert and --tls-key, or security=)")
    if p == "auto":
        if security:
            return "tls"
        ok, detail = _rdask.ucx_status()
        if ok:
            report(f"protocol auto: UCX {detail} is available; using ucx://")
            return "ucx"
        report(f"protocol auto: {detail}; using tcp://")
        return "tcp"
    if p == "ucx":
        if security:
            raise ValueError("protocol ucx does not encrypt; with TLS certificates use protocol tls")
        ok, detail = _rdask.ucx_status()
        if not ok:
            raise ValueError(detail)
    return p


def scheme_of(address: str) -> str:
    """The scheme of an address (``tcp`` for a bare host:port, as in Dask)."""
    return address.split("://", 1)[0] if "://" in address else "tcp"
