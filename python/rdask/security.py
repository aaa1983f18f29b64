"""TLS for rdask, with the names of `distributed.Security`.

    sec = rdask.Security(tls_ca_file="ca.pem", tls_client_cert="cert.pem",
                         tls_client_key="key.pem", require_encryption=True)
    client = rdask.Client("tls://scheduler:8786", security=sec)

Both ends of every connection present a certificate the cluster's CA signed
(mutual authentication); a peer without one, or with one from another CA, is
refused. A process has one TLS identity (rustls, process-wide): the one its
role needs (client, scheduler or worker certificate) is applied when the
client connects or the cluster starts.
"""

from __future__ import annotations

import os
import tempfile

from . import _rdask


class Security:
    def __init__(self, require_encryption: bool | None = None, tls_ca_file: str | None = None,
                 tls_client_cert: str | None = None, tls_client_key: str | None = None,
                 tls_scheduler_cert: str | None = None, tls_scheduler_key: str | None = None,
                 tls_worker_cert: str | None = None, tls_worker_key: str | None = None,
                 tls_ciphers: str | None = None, tls_min_version=None, tls_max_version=None,
                 extra_conn_args: dict | None = None):
        if tls_ciphers or tls_min_version or tls_max_version:
            raise ValueError("tls_ciphers and TLS version bounds are not supported: rustls negotiates TLS 1.2/1.3 "
                             "with its safe default cipher suites")
        self.require_encryption = bool(require_encryption)
        self.tls_ca_file = tls_ca_file
        self.tls_client_cert, self.tls_client_key = tls_client_cert, tls_client_key
        self.tls_scheduler_cert, self.tls_scheduler_key = tls_scheduler_cert, tls_scheduler_key
        self.tls_worker_cert, self.tls_worker_key = tls_worker_cert, tls_worker_key
        self.extra_conn_args = extra_conn_args or {}

    @classmethod
    def temporary(cls, directory: str | None = None) -> "Security":
        """A new CA and one certificate for every role, in a private folder
        (as distributed's `Security.temporary()`): for a local cluster."""
        d = directory or tempfile.mkdtemp(prefix="rdask-tls-")
        ca, cert, key = _rdask.temporary_tls(d)
        return cls(require_encryption=True, tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key,
                   tls_scheduler_cert=cert, tls_scheduler_key=key, tls_worker_cert=cert, tls_worker_key=key)

    def identity(self, role: str) -> tuple[str | None, str | None]:
        """(cert, key) for 'client', 'scheduler' or 'worker'; another role's
        when this one has none (one certificate often serves all)."""
        order = {"client": ("client", "worker", "scheduler"), "scheduler": ("scheduler", "worker", "client"),
                 "worker": ("worker", "scheduler", "client")}[role]
        for r in order:
            cert = getattr(self, f"tls_{r}_cert")
            if cert:
                return cert, getattr(self, f"tls_{r}_key") or cert
        return None, None

    @property
    def has_tls(self) -> bool:
        return bool(self.tls_ca_file and any(self.identity(r)[0] for r in ("client", "scheduler", "worker")))

    def apply(self, role: str):
        """Makes this the process's TLS identity for `role`."""
        cert, key = self.identity(role)
        if self.tls_ca_file and not cert:
            raise ValueError(f"Security has a CA file but no certificate for the {role}")
        for path in (self.tls_ca_file, cert, key):
            if path and not os.path.exists(path):
                raise FileNotFoundError(f"TLS file not found: {path}")
        _rdask.configure_tls(self.tls_ca_file, cert, key, self.require_encryption)

    def flags(self, role: str = "worker") -> list[str]:
        """The command-line flags that give a child process this identity."""
        cert, key = self.identity(role)
        if not (self.tls_ca_file and cert):
            return []
        out = ["--tls-ca-file", self.tls_ca_file, "--tls-cert", cert, "--tls-key", key or cert]
        if self.require_encryption:
            out.append("--require-encryption")
        return out

    def __repr__(self):
        return (f"Security(require_encryption={self.require_encryption}, tls_ca_file={self.tls_ca_file!r}, "
                f"tls_client_cert={self.tls_client_cert!r}, ...)")


def from_args(a) -> Security | None:
    """The Security of the TLS flags of a command (or None without them)."""
    files = (a.tls_ca_file, a.tls_cert, a.tls_key)
    if not any(files):
        if getattr(a, "require_encryption", False):
            raise ValueError("--require-encryption needs --tls-ca-file, --tls-cert and --tls-key")
        return None
    if not (a.tls_ca_file and a.tls_cert):
        raise ValueError("TLS needs --tls-ca-file and --tls-cert (and --tls-key unless the certificate file holds the key)")
    cert, key = a.tls_cert, a.tls_key or a.tls_cert
    return Security(require_encryption=getattr(a, "require_encryption", False), tls_ca_file=a.tls_ca_file,
                    tls_client_cert=cert, tls_client_key=key, tls_scheduler_cert=cert, tls_scheduler_key=key,
                    tls_worker_cert=cert, tls_worker_key=key)


def apply_args(a, role: str = "worker") -> Security | None:
    """Makes the command's TLS flags this process's identity and returns
    them as a Security (None without flags); ValueError names what is wrong."""
    try:
        sec = from_args(a)
        if sec:
            sec.apply(role)
        return sec
    except (OSError, _rdask.RdaskError) as e:
        raise ValueError(str(e)) from None


def add_tls_flags(p):
    p.add_argument("--tls-ca-file", default=None, help="CA certificate(s) that sign this cluster's certificates (PEM)")
    p.add_argument("--tls-cert", default=None, help="this process's certificate (PEM); turns on tls://")
    p.add_argument("--tls-key", default=None, help="the certificate's private key (PEM), if not in --tls-cert")
    p.add_argument("--require-encryption", action="store_true", default=False,
                   help="refuse plain tcp:// connections (distributed.comm.require-encryption)")
