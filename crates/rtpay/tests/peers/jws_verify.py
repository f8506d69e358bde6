"""Verifies a dynamic BR Code payload the way a payer's app does, with an independent JOSE library
(PyPI jwcrypto): fetch the JWS at the location, fetch the JWK Set its header's `jku` names (on the
test server's address), check the signature and print the payload. Exits non-zero on any failure.

Usage: jws_verify.py BASE_URL LOCATION_PATH EXPECTED_JKU
"""
import json
import sys
import urllib.request

from jwcrypto import jwk, jws


def fetch(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.headers.get("content-type"), r.read().decode()


def main():
    base, path, expected_jku = sys.argv[1], sys.argv[2], sys.argv[3]
    content_type, token = fetch(base + path)
    if content_type != "application/jose":
        sys.exit(f"content type {content_type!r}, not application/jose")
    parsed = jws.JWS()
    parsed.deserialize(token)
    header = parsed.jose_header
    if header.get("alg") != "ES256" or header.get("jku") != expected_jku:
        sys.exit(f"unexpected header {header}")
    jku_path = "/" + expected_jku.split("/", 3)[3]
    _, keys = fetch(base + jku_path)
    key_set = jwk.JWKSet.from_json(keys)
    key = key_set.get_key(header["kid"])
    if key is None:
        sys.exit(f"no key {header['kid']} in the set")
    if key.thumbprint() != header["kid"]:
        sys.exit("the kid is not the key's RFC 7638 thumbprint")
    parsed.verify(key, alg="ES256")
    # A changed payload must not verify with the same signature.
    head, _, sig = token.split(".")
    forged = jws.JWS()
    forged.deserialize(head + "." + jws.base64url_encode(b'{"txid":"forged"}') + "." + sig)
    try:
        forged.verify(key, alg="ES256")
        sys.exit("a forged payload verified")
    except jws.InvalidJWSSignature:
        pass
    print(json.dumps(json.loads(parsed.payload)))


main()
