"""A loopback HTTP proxy in front of the GCS emulator that injects the faults a real object
store shows: an error status (403, 404, 503, …), a body cut short (a truncated object),
or a stall (no answer). Clients point at it exactly as at the emulator.

A fault may also be an action run when the request arrives (the kill tests SIGKILL the
client there, so a write is cut at exactly that request). Faults are rules, matched in order against each request's method and its decoded URL
(path and query; for a POST also the start of its body, where an upload names its object): the first rule that matches and has uses left applies, once per
request. A rule with `times` None applies to every match. Every request is recorded
(method, decoded URL, the fault applied or None), for tests that assert what a client
asked and how often it retried.

Test-only (a mock of the network's faults, since the emulator cannot fail on demand).
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import re
import threading
import time
import urllib.parse
from collections.abc import Callable

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
        "upgrade", "proxy-authenticate", "proxy-authorization"}


@dataclasses.dataclass
class Rule:
  fault: int | str | Callable[[], None]  # an HTTP status, "truncate", "stall", or an action
  #                                        (e.g. SIGKILL the client) run before a stall
  match: str                # a regex searched in the decoded URL
  method: str = ""          # a regex the method must match ("" = any)
  times: int | None = 1     # uses left (None: every match)
  after: int = 0            # matching requests let through before the rule applies


class FaultProxy:
  """`with FaultProxy(upstream) as proxy:` serves on proxy.url until the block ends."""

  def __init__(self, upstream: str):
    self.upstream = urllib.parse.urlsplit(upstream)
    self.rules: list[Rule] = []
    self.log: list[tuple[str, str, int | str | None]] = []
    self._lock = threading.Lock()
    self._stop = threading.Event()
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):
        pass

      def _any(self):
        proxy._handle(self)

      do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _any

    class Server(http.server.ThreadingHTTPServer):
      def handle_error(self, request, client_address):
        pass  # a client that hangs up on a cut or stalled answer is the point

    self._server = Server(("127.0.0.1", 0), Handler)
    self._server.daemon_threads = True
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

  def __enter__(self) -> FaultProxy:
    threading.Thread(target=self._server.serve_forever, daemon=True).start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._server.shutdown()
    self._server.server_close()

  def add(self, fault: int | str | Callable[[], None], match: str, *, method: str = "",
          times: int | None = 1, after: int = 0) -> Rule:
    rule = Rule(fault, match, method, times, after)
    with self._lock:
      self.rules.append(rule)
    return rule

  def clear(self) -> None:
    with self._lock:
      self.rules.clear()
      self.log.clear()

  def requests(self, match: str, fault: int | str | None = ...) -> int:
    """How many recorded requests matched (and, if given, got `fault`)."""
    with self._lock:
      return sum(1 for _, url, f in self.log
                 if re.search(match, url) and (fault is ... or f == fault))

  def _pick(self, method: str, url: str) -> int | str | None:
    with self._lock:
      for rule in self.rules:
        if ((not rule.method or re.fullmatch(rule.method, method)) and re.search(rule.match, url)
            and (rule.times is None or rule.times > 0)):
          if rule.after > 0:
            rule.after -= 1
            continue
          if rule.times is not None:
            rule.times -= 1
          self.log.append((method, url, rule.fault))
          return rule.fault
      self.log.append((method, url, None))
      return None

  def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
    length = int(h.headers.get("Content-Length") or 0)
    body = h.rfile.read(length) if length else b""
    # an upload names its object in the body (multipart metadata), not in the URL
    seen = urllib.parse.unquote(h.path) + (
        " " + body[:4096].decode("latin-1") if h.command == "POST" and body else "")
    fault = self._pick(h.command, seen)
    if callable(fault):  # the action (a kill: this request never reaches the store)
      fault()
      fault = "stall"
    if fault == "stall":  # hold the connection open, answer nothing
      self._stop.wait(600)
      h.close_connection = True
      return
    if isinstance(fault, int):
      data = (b'{"error": {"code": %d, "message": "injected fault %d", "errors": []}}'
              % (fault, fault))
      h.send_response(fault)
      h.send_header("Content-Type", "application/json")
      h.send_header("Content-Length", str(len(data)))
      h.end_headers()
      h.wfile.write(data)
      return
    conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
    headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
    conn.request(h.command, h.path, body=body or None, headers=headers)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    h.send_response(r.status)
    for k, v in r.getheaders():
      if k.lower() not in _HOP and k.lower() != "content-length":
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    if fault == "truncate" and len(data) > 1:  # the promised length, half the bytes
      h.wfile.write(data[: len(data) // 2])
      h.wfile.flush()
      time.sleep(0.05)
      h.close_connection = True
      return
    if h.command != "HEAD":
      h.wfile.write(data)
