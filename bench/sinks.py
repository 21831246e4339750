"""Where the pushes go: fast stand-ins for APNs and FCM, each in its own process.

**nginx** (Debian `nginx-light` + `libnginx-mod-stream`), one instance per service,
one worker, on loopback with a certificate from `tests.standins.tlsca`:

* APNs: HTTP/2 answering a fixed 200 that echoes `apns-id`. nginx 1.22 speaks HTTP/2
  over TLS only when ALPN picks `h2`, and aioapns (the baseline) offers no ALPN at all,
  so TLS ends in nginx's stream module (`ssl_alpn h2` for clients that ask; prior
  knowledge for those that don't) and the bytes go on to an HTTP/2 (h2c) listener of
  the same nginx. Both clients take exactly this path. Requests for
  `LOGGED_APNS_TOPIC` (direct mode's registrations) are logged to `requests.log`,
  `$msec $uri` each, unbuffered, so that the harness sees every push as it arrives
  (`Sink.request_log`); the app-server runs' requests are not, and pay nothing for it.
* FCM: HTTP/2 or HTTP/1.1 over TLS, as ALPN picks (the project's client offers `h2`,
  the baseline's aiohttp only `http/1.1`), a fixed OAuth token at `/token` and a fixed
  `{"name": …}` for `messages:send`.

Nothing checks what arrives: the sinks exist to be fast. Behaviour (JWT checks, error
answers) is what `tests/standins` are for; they are the fallback here (`--sink
python`, or `auto` without nginx), and they saturate near 2,100 requests/s
(PROTOCOLS.md §8), so figures taken with them say little about the component.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import select
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bench.procstat import CpuClock
from tests.standins.tlsca import TestCA

__all__ = [
    "NGINX_STREAM_MODULE",
    "Sink",
    "nginx_available",
    "nginx_version",
    "start_sink",
]

NGINX_STREAM_MODULE: Final = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
PROJECT_ID: Final = "xmpp-push-bench"
APNS_TOPIC: Final = "org.example.bench"
LOGGED_APNS_TOPIC: Final = "org.bench.messenger"
"""The topic of the registrations bench.registrations loads (bench.direct's pushes):
the APNs sink logs the requests for it, and only those."""
_ACCESS_TOKEN: Final = "ya29.bench-sink-" + "x" * 40
_REPO: Final = Path(__file__).resolve().parent.parent


@dataclass
class Sink:
    """A running sink and what a client needs to reach it."""

    service: str
    kind: str
    """"nginx" or "python"."""
    endpoint: str
    ca_file: Path
    process: subprocess.Popen[bytes]
    directory: Path
    apns_key_file: Path | None = None
    apns_key_id: str = ""
    apns_team_id: str = ""
    fcm_service_account_file: Path | None = None
    accepts_without_alpn: bool = False
    """Whether a TLS client that offers no ALPN still gets HTTP/2 (aioapns needs it)."""
    request_log: Path | None = None
    """APNs nginx sink: one line per request for LOGGED_APNS_TOPIC, `<$msec> <path>`."""
    notes: list[str] = field(default_factory=list)
    _log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_clock(self) -> CpuClock:
        """CPU of the sink: the nginx master and its workers, or the Python process."""
        return CpuClock([self.pid], include_children=True)

    def config_section(self) -> dict[str, object]:
        """This sink as the `[apns]` or `[fcm]` section of an xmpp-push config."""
        if self.service == "apns":
            assert self.apns_key_file is not None
            return {
                "key_file": str(self.apns_key_file),
                "key_id": self.apns_key_id,
                "team_id": self.apns_team_id,
                "topic": APNS_TOPIC,
                "endpoint": self.endpoint,
                "ca_file": str(self.ca_file),
            }
        assert self.fcm_service_account_file is not None
        return {
            "service_account_file": str(self.fcm_service_account_file),
            "endpoint": self.endpoint,
            "ca_file": str(self.ca_file),
        }

    def describe(self) -> dict[str, object]:
        return {
            "service": self.service,
            "kind": self.kind,
            "endpoint": self.endpoint,
            "accepts_http2_without_alpn": self.accepts_without_alpn,
            "notes": self.notes,
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()


def nginx_available() -> bool:
    return shutil.which("nginx") is not None


def nginx_version() -> str | None:
    nginx = shutil.which("nginx")
    if nginx is None:
        return None
    done = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False)
    return done.stderr.strip().removeprefix("nginx version: ") or None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _random_id(length: int = 10) -> str:
    alphabet = string.ascii_uppercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sink exited with {process.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"sink did not listen on {port}: {log.read_text()[-2000:]}")


# --------------------------------------------------------------------------------------
# nginx

_NGINX_COMMON: Final = """\
worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
"""

_HTTP_COMMON: Final = """\
  access_log off;
  server_tokens off;
  client_body_temp_path {dir}/tmp/body;
  proxy_temp_path {dir}/tmp/proxy;
  fastcgi_temp_path {dir}/tmp/fastcgi;
  uwsgi_temp_path {dir}/tmp/uwsgi;
  scgi_temp_path {dir}/tmp/scgi;
  # Clients keep one connection for the whole run (nginx's default closes after 1000).
  keepalive_requests 1000000000;
  keepalive_timeout 1h;
"""

_APNS_CONFIG: Final = """\
{load_stream}{common}
stream {{
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_alpn h2;
    proxy_pass 127.0.0.1:{h2c_port};
    proxy_timeout 1h;
  }}
}}
http {{
{http_common}
{request_log}
  server {{
    listen 127.0.0.1:{h2c_port} http2;
    http2_max_concurrent_streams 1000;
    access_log {request_log_file} push if=$logged_push;
    location / {{
      add_header apns-id $http_apns_id always;
      return 200;
    }}
  }}
}}
"""

_APNS_CONFIG_ALPN_ONLY: Final = """\
{common}
http {{
{http_common}
{request_log}
  server {{
    listen 127.0.0.1:{port} ssl http2;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    http2_max_concurrent_streams 1000;
    access_log {request_log_file} push if=$logged_push;
    location / {{
      add_header apns-id $http_apns_id always;
      return 200;
    }}
  }}
}}
"""

_APNS_REQUEST_LOG: Final = """\
  # Direct mode's pushes only (their registrations' topic), each as it is answered.
  map $http_apns_topic $logged_push {{
    {topic} 1;
    default 0;
  }}
  log_format push '$msec $uri';"""

_FCM_CONFIG: Final = """\
{common}
http {{
{http_common}
  default_type application/json;
  server {{
    # HTTP/2 for clients that offer h2 in ALPN (the project's), HTTP/1.1 for the rest
    # (aiohttp in the baseline, requests for the token), as Google's front end does.
    listen 127.0.0.1:{port} ssl http2;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    location = /token {{
      return 200 '{token_answer}';
    }}
    location / {{
      return 200 '{{"name":"projects/{project}/messages/0:1"}}';
    }}
  }}
}}
"""


def _stream_module_line() -> str | None:
    """The `load_module` line for the stream module, "" if built in, None if absent."""
    nginx = shutil.which("nginx")
    if nginx is None:
        return None
    built = subprocess.run([nginx, "-V"], capture_output=True, text=True, check=False).stderr
    if "--with-stream " in built or built.rstrip().endswith("--with-stream"):
        return ""
    if NGINX_STREAM_MODULE.is_file():
        return f"load_module {NGINX_STREAM_MODULE};\n"
    return None


def _write_apns_key(directory: Path, key_id: str) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    path = directory / f"AuthKey_{key_id}.p8"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _write_service_account(directory: Path, token_uri: str) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    info = {
        "type": "service_account",
        "project_id": PROJECT_ID,
        "private_key_id": secrets.token_hex(20),
        "private_key": key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode("ascii"),
        "client_email": f"bench@{PROJECT_ID}.iam.gserviceaccount.com",
        "client_id": str(secrets.randbelow(10**20)),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "universe_domain": "googleapis.com",
    }
    path = directory / "service-account.json"
    path.write_text(json.dumps(info, indent=2))
    path.chmod(0o600)
    return path


def _start_nginx(service: str, directory: Path) -> Sink:
    nginx = shutil.which("nginx")
    assert nginx is not None
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tmp").mkdir(exist_ok=True)
    ca = TestCA(directory / "ca")
    certificate = ca.issue("sink")
    port = _free_port()
    common = _NGINX_COMMON.format(dir=directory)
    http_common = _HTTP_COMMON.format(dir=directory)
    notes: list[str] = []
    without_alpn = False
    if service == "apns":
        request_log = _APNS_REQUEST_LOG.format(topic=LOGGED_APNS_TOPIC)
        load_stream = _stream_module_line()
        if load_stream is None:
            config = _APNS_CONFIG_ALPN_ONLY.format(
                common=common,
                http_common=http_common,
                request_log=request_log,
                request_log_file=directory / "requests.log",
                port=port,
                cert=certificate.cert_file,
                key=certificate.key_file,
            )
            notes.append(
                "nginx has no stream module (apt-get install libnginx-mod-stream): "
                "HTTP/2 only via ALPN, so aioapns cannot use this sink"
            )
        else:
            without_alpn = True
            config = _APNS_CONFIG.format(
                load_stream=load_stream,
                common=common,
                http_common=http_common,
                request_log=request_log,
                request_log_file=directory / "requests.log",
                port=port,
                h2c_port=_free_port(),
                cert=certificate.cert_file,
                key=certificate.key_file,
            )
            notes.append(
                "TLS ends in nginx's stream module (ALPN h2 if offered), "
                "HTTP/2 by prior knowledge behind it"
            )
    else:
        token_answer = json.dumps(
            {"access_token": _ACCESS_TOKEN, "expires_in": 3599, "token_type": "Bearer"},
            separators=(",", ":"),
        )
        config = _FCM_CONFIG.format(
            common=common,
            http_common=http_common,
            port=port,
            cert=certificate.cert_file,
            key=certificate.key_file,
            token_answer=token_answer,
            project=PROJECT_ID,
        )
    config_file = directory / "nginx.conf"
    config_file.write_text(config)
    log_path = directory / "nginx.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        [nginx, "-e", "stderr", "-p", str(directory), "-c", str(config_file)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    sink = Sink(
        service=service,
        kind="nginx",
        endpoint=f"https://127.0.0.1:{port}",
        ca_file=ca.ca_file,
        process=process,
        directory=directory,
        accepts_without_alpn=without_alpn or service == "fcm",
        notes=notes,
        _log=log,
    )
    try:
        _wait_for_port(port, process, log_path)
    except BaseException:
        sink.stop()
        raise
    if service == "apns":
        sink.request_log = directory / "requests.log"
        sink.apns_key_id = _random_id()
        sink.apns_team_id = _random_id()
        sink.apns_key_file = _write_apns_key(directory, sink.apns_key_id)
    else:
        sink.fcm_service_account_file = _write_service_account(directory, f"{sink.endpoint}/token")
    return sink


# --------------------------------------------------------------------------------------
# The Python stand-ins (fallback)


def _start_standin(service: str, directory: Path) -> Sink:
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "standin.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", f"tests.standins.{service}", "--dir", str(directory)],
        stdout=subprocess.PIPE,
        stderr=log,
        stdin=subprocess.DEVNULL,
        cwd=_REPO,
    )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 30)
    line = process.stdout.readline() if ready else b""
    if not line:
        process.wait()
        log.close()
        raise RuntimeError(f"{service} stand-in failed: {log_path.read_text()[-2000:]}")
    info = json.loads(line)
    note = "Python stand-in (tests/standins): saturates near 2,100 requests/s"
    sink = Sink(
        service=service,
        kind="python",
        endpoint=info.get("endpoint") or f"https://127.0.0.1:{info['port']}",
        ca_file=Path(info["ca_file"]),
        process=process,
        directory=directory,
        notes=[note],
        _log=log,
    )
    if service == "apns":
        sink.apns_key_file = Path(info["key_file"])
        sink.apns_key_id = info["key_id"]
        sink.apns_team_id = info["team_id"]
        sink.notes.append("needs ALPN h2: aioapns (the baseline) cannot use it")
    else:
        sink.fcm_service_account_file = Path(info["service_account_file"])
        sink.accepts_without_alpn = True
    return sink


def start_sink(service: str, kind: str, directory: Path) -> Sink:
    """Start the `service` ("apns" | "fcm") sink of `kind` ("nginx" | "python" | "auto")."""
    if kind == "auto":
        kind = "nginx" if nginx_available() else "python"
    if kind == "nginx":
        if not nginx_available():
            raise RuntimeError("nginx is not installed: apt-get install -y nginx-light")
        return _start_nginx(service, directory)
    return _start_standin(service, directory)
