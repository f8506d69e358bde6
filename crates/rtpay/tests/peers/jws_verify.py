"""Verifies a dynamic BR Code payload the way a payer's app does, with an independent JOSE library
(PyPI jwcrypto): fetch the JWS at the location, fetch the JWK Set its header's `jku` names (on the
test server's address), check the signature and print the payload. Exits non-zero on any failure.

With a CA, the key must come with its certificate, as the Pix security manual asks: the JWK's
`x5c` chain starts with a certificate for the key, issued by that CA for the jku's host, and the
JWK and the header name its thumbprints. The certificate checks use PyPI cryptography (jwcrypto's
own dependency).

Usage: jws_verify.py BASE_URL LOCATION_PATH EXPECTED_JKU [ALG [CA_PEM]]
"""
import base64
import hashlib
import json
import sys
import urllib.request

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from jwcrypto import jwk, jws


def fetch(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.headers.get("content-type"), r.read().decode()


def main():
    base, path, expected_jku = sys.argv[1], sys.argv[2], sys.argv[3]
    alg = sys.argv[4] if len(sys.argv) > 4 else "ES256"
    ca_path = sys.argv[5] if len(sys.argv) > 5 else None
    content_type, token = fetch(base + path)
    if content_type != "application/jose":
        sys.exit(f"content type {content_type!r}, not application/jose")
    parsed = jws.JWS()
    parsed.deserialize(token)
    header = parsed.jose_header
    if header.get("alg") != alg or header.get("jku") != expected_jku:
        sys.exit(f"unexpected header {header}")
    jku_path = "/" + expected_jku.split("/", 3)[3]
    _, keys = fetch(base + jku_path)
    key_set = jwk.JWKSet.from_json(keys)
    key = key_set.get_key(header["kid"])
    if key is None:
        sys.exit(f"no key {header['kid']} in the set")
    if key.thumbprint() != header["kid"]:
        sys.exit("the kid is not the key's RFC 7638 thumbprint")
    parsed.verify(key, alg=alg)
    if ca_path:
        check_certificate(key, header, ca_path, expected_jku.split("/")[2])
    # A changed payload must not verify with the same signature.
    head, _, sig = token.split(".")
    forged = jws.JWS()
    forged.deserialize(head + "." + jws.base64url_encode(b'{"txid":"forged"}') + "." + sig)
    try:
        forged.verify(key, alg=alg)
        sys.exit("a forged payload verified")
    except jws.InvalidJWSSignature:
        pass
    print(json.dumps(json.loads(parsed.payload)))


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def check_certificate(key, header, ca_path, host):
    exported = json.loads(key.export_public())
    chain = [base64.b64decode(c, validate=True) for c in exported.get("x5c", [])]
    if not chain:
        sys.exit("the key has no certificate chain (x5c)")
    leaf = x509.load_der_x509_certificate(chain[0])
    if jwk.JWK.from_pyca(leaf.public_key()).thumbprint() != header["kid"]:
        sys.exit("the first certificate is not for the signing key")
    for name, digest in (("x5t", hashlib.sha1), ("x5t#S256", hashlib.sha256)):
        if exported.get(name) != b64url(digest(chain[0]).digest()):
            sys.exit(f"the JWK's {name} is not the certificate's thumbprint")
    if header.get("x5t") != exported["x5t"]:
        sys.exit("the header's x5t is not the certificate's")
    with open(ca_path, "rb") as f:
        ca = x509.load_pem_x509_certificate(f.read())
    leaf.verify_directly_issued_by(ca)
    if chain[1:] != [ca.public_bytes(Encoding.DER)]:
        sys.exit("the chain does not go on with the CA's certificate")
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    if host not in names.get_values_for_type(x509.DNSName):
        sys.exit(f"the certificate is not for {host}")


main()
