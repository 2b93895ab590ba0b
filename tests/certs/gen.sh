#!/usr/bin/env bash
# Generates a throwaway PKI for TLS tests into DIR (default: a new temp dir,
# printed on stdout). Nothing here is committed: tests run this at test time.
#
#   ca.pem / ca.key          test CA (EC P-256, 1 day)
#   server.pem / server.key  coordinator certificate for localhost, 127.0.0.1, ::1
#   client.pem / client.key  client certificate signed by the CA (mTLS)
#   other-ca.pem             an unrelated CA (its client cert: other-client.pem/.key),
#                            to check that a foreign certificate is refused
#
# Needs only `openssl` (1.1.1 or 3.x).
set -euo pipefail

DIR=${1:-$(mktemp -d)}
mkdir -p "$DIR"
cd "$DIR"
umask 077

ec_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

ca() { # name subject
  ec_key "$1.key"
  openssl req -x509 -new -key "$1.key" -sha256 -days 1 -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$1.pem" 2>/dev/null
}

leaf() { # name ca subject ext
  ec_key "$1.key"
  openssl req -new -key "$1.key" -subj "/CN=$3" -out "$1.csr" 2>/dev/null
  printf '%b' "$4" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial \
    -days 1 -sha256 -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}

ca ca "pixfarm test CA"
leaf server ca "localhost" \
  "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n"
leaf client ca "pixfarm test client" \
  "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
ca other-ca "unrelated CA"
leaf other-client other-ca "stranger" \
  "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
rm -f ./*.srl
chmod 644 ./*.pem

echo "$DIR"
