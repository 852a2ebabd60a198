"""`megafleet web --cert --key`: HTTPS with a certificate made here (self-signed,
for 127.0.0.1). A client that trusts it gets answers; one that does not, and
plain HTTP to the same port, get none. No testbed is needed: the server answers
its document and an empty or foreign list of testbeds all the same."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import subprocess
import sys

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .conftest import REPO, WebServer


def self_signed(directory) -> tuple[str, str]:
    """(cert.pem, key.pem): a P-256 key and a certificate for 127.0.0.1 and
    localhost, signed by itself, valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "megafleet web test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            # Its own trust anchor: a CA certificate, as strict verifiers want one to be.
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_serves_https_with_the_given_certificate(tmp_path):
    cert, key = self_signed(tmp_path)
    web = WebServer("--cert", cert, "--key", key)
    try:
        assert web.base.startswith("https://")
        assert web.info["url"].startswith("https://") and web.info["login"].startswith("https://")
        trusting = ssl.create_default_context(cafile=cert)
        r = httpx.get(f"{web.base}/api/v1/openapi.json", verify=trusting, timeout=10)
        assert r.status_code == 200 and r.json()["openapi"].startswith("3.")
        assert r.http_version in ("HTTP/1.1", "HTTP/2")
        r = httpx.get(f"{web.base}/api/v1/testbeds", verify=trusting, timeout=30)
        assert r.status_code == 200 and isinstance(r.json(), list)
        # The login link's session cookie is for HTTPS only.
        r = httpx.get(web.info["login"], verify=trusting, follow_redirects=False, timeout=10)
        assert r.status_code == 303
        cookie = r.headers["set-cookie"].lower()
        assert cookie.startswith("megafleet_session=") and "; secure" in cookie and "httponly" in cookie
        # It is this certificate that is served: the system's trust store does not know it.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{web.base}/api/v1/openapi.json", timeout=10)
        # Plain HTTP to the TLS port gets no HTTP answer.
        with pytest.raises(httpx.TransportError):
            httpx.get(web.base.replace("https://", "http://") + "/api/v1/openapi.json", timeout=10)
        assert web.proc.poll() is None
    finally:
        web.stop()


def test_cert_needs_its_key(tmp_path):
    cert, _ = self_signed(tmp_path)
    r = subprocess.run([sys.executable, "-m", "megafleet", "web", "--cert", cert, "--listen", "127.0.0.1:1"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2 and "--cert and --key go together" in r.stderr
