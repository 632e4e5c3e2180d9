"""A real S3 server for tests and benchmarks: moto's server (what s3fs's own tests run against) as a
subprocess on 127.0.0.1 and a free port, stopped by pid. Its request log counts object-store calls.

Run as a script, this file is that server: moto's, with one change that makes it keep S3's promise
for conditional writes. moto's threaded server checks a PUT's If-None-Match (or If-Match) and then
writes, with no lock between the two, so two requests racing for one new key can both win; S3 makes
the check and the write one step, and the shard leases and commit claims rely on that."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from richpref.common.procs import free_port

# The server checks signatures (moto's IAM auth: the first 3 requests, which create the user, its
# key and its policy, go unchecked), so a wrong secret is refused as on AWS.
NO_AUTH_REQUESTS = 3
# Seconds/1000 the server waits before answering each request: a remote store's round trip (S3 from
# EC2 in its region: a GET of a small object takes about 10-30 ms), for benchmarks that time a run.
LATENCY_ENV = "RICHPREF_S3_LATENCY_MS"


class S3Server:
    """On 127.0.0.1 and a free port, with IAM auth (a user and its key made at start). Or, for a test
    whose nodes are network namespaces, on `host` inside a namespace (`wrap` = `ip netns exec NS`),
    where this process cannot connect: then no auth (any key is accepted; the test still hands its
    processes a key as a user would), and readiness is read from the server's log."""

    def __init__(self, log_dir: Path, *, host: str = "127.0.0.1", port: int | None = None,
                 wrap: list[str] | None = None, latency_ms: float = 0.0) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://{host}:{self.port}"
        self.log_path = Path(log_dir) / f"moto-{self.port}.log"
        self._log = open(self.log_path, "w")
        # werkzeug logs one line per request on stderr: the request count comes from there.
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(NO_AUTH_REQUESTS)} if not wrap else dict(os.environ)
        env[LATENCY_ENV] = str(latency_ms)
        self.proc = subprocess.Popen([*(wrap or []), sys.executable, os.path.abspath(__file__), "-H", host, "-p", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.time() + 60
        while not self._ready(bool(wrap)):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"moto server did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        self.key, self.secret = ("richpref-key", "richpref-secret") if wrap else self._user()

    def _ready(self, from_log: bool) -> bool:
        if from_log:
            return "Running on" in self.log_path.read_text(errors="replace")
        try:
            urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2)
            return True
        except OSError:
            return False

    def _user(self) -> tuple[str, str]:
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, aws_access_key_id="bootstrap",
                           aws_secret_access_key="bootstrap", region_name="us-east-1")
        iam.create_user(UserName="richpref")
        key = iam.create_access_key(UserName="richpref")["AccessKey"]
        iam.put_user_policy(UserName="richpref", PolicyName="s3", PolicyDocument=(
            '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}'))
        return key["AccessKeyId"], key["SecretAccessKey"]

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_ENDPOINT_URL_S3": self.endpoint,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def requests(self) -> list[str]:
        """The request lines logged so far ('GET /bucket/key?...', ...)."""
        return [req for _, req, _ in self.requests_from()]

    def requests_from(self) -> list[tuple[str, str, str]]:
        """(client address, request line, status) of each request logged so far."""
        self._log.flush()
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if '"' in line and " HTTP/1." in line:
                client, req, rest = line.split('"', 2)
                if not req.split(" ", 1)[-1].startswith("/moto-api"):
                    out.append((client.split(" ", 1)[0], req, rest.split()[0] if rest.split() else ""))
        return out

    def make_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key, aws_secret_access_key=self.secret,
                     region_name="us-east-1").create_bucket(Bucket=name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def _conditional_writes_one_at_a_time() -> None:
    from moto.s3.responses import S3Response

    lock = threading.Lock()
    # put_object: a one-shot PUT; _key_response_post: CompleteMultipartUpload, which also takes If-None-Match
    for name in ("put_object", "_key_response_post"):
        plain = getattr(S3Response, name)

        def guarded(self, *args, _plain=plain, **kwargs):
            if "If-None-Match" in self.headers or "If-Match" in self.headers:
                with lock:
                    return _plain(self, *args, **kwargs)
            return _plain(self, *args, **kwargs)

        setattr(S3Response, name, guarded)


def _answer_after(latency_s: float) -> None:
    from werkzeug.serving import WSGIRequestHandler

    plain = WSGIRequestHandler.run_wsgi

    def delayed(self):
        time.sleep(latency_s)
        return plain(self)

    WSGIRequestHandler.run_wsgi = delayed


if __name__ == "__main__":
    from moto import server

    _conditional_writes_one_at_a_time()
    if float(os.environ.get(LATENCY_ENV) or 0) > 0:
        _answer_after(float(os.environ[LATENCY_ENV]) / 1000)
    server.main(sys.argv[1:])
