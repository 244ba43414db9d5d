#!/bin/sh
# Certificates for a test deployment of lstm-stream (not for production: no
# passphrases, keys readable by the user who runs this). Usage:
#   deploy/tls/make-test-certs.sh DIR [SERVER_NAME] [CLIENT_NAME ...]
# DIR gets ca.pem/ca.key (the CA), server.pem/server.key (for SERVER_NAME,
# default localhost, also valid for 127.0.0.1), and CLIENT.pem/CLIENT.key for
# each client name (its certificate's common name, e.g. a tenant).
set -eu
dir=$1; shift
server=${1:-localhost}; [ $# -gt 0 ] && shift
mkdir -p "$dir"; cd "$dir"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key ca.key
openssl req -x509 -new -key ca.key -out ca.pem -days 365 -subj "/CN=lstm-stream test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"

sign() {  # name, extensions
  key "$1.key"
  openssl req -new -key "$1.key" -out "$1.csr" -subj "/CN=$1"
  printf '%s\n' "$2" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -out "$1.pem" \
    -days 365 -extfile "$1.ext" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
sign "$server" "subjectAltName=DNS:$server,DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth"
[ "$server" = server ] || { mv "$server.pem" server.pem; mv "$server.key" server.key; }
for client in "$@"; do
  sign "$client" "extendedKeyUsage=clientAuth"
done
echo "wrote $(pwd)/ca.pem, server.pem, server.key${*:+ and client certificates for: $*}"
