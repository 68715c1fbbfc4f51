#!/bin/sh
# make-dev-certs.sh OUTDIR DOMAIN [DOMAIN...]
#
# Development certificates for Legate, made with the openssl CLI (Debian package `openssl`):
#   OUTDIR/ca.pem, ca.key          a dev CA (reused if already there); use ca.pem as
#                                  tls.trust_bundle on every node and peer of the lab
#   OUTDIR/<domain>.pem, .key      one leaf per local domain (SNI), SAN = that domain
#   OUTDIR/node.pem, node.key      the node certificate (tls.cert/tls.key): every domain in SAN
# Keys are ECDSA P-256 in PKCS#8; leaves carry serverAuth + clientAuth (one certificate used
# both ways, as Lync/S4B edges do). NEVER use these in production, never commit the keys.
set -eu

if [ $# -lt 2 ]; then
    echo "usage: $0 OUTDIR DOMAIN [DOMAIN...]" >&2
    exit 2
fi
out=$1
shift
command -v openssl >/dev/null 2>&1 || { echo "$0: openssl not found (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$out"
umask 077
days=825

newkey() {
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
}

serial() {
    echo "0x$(openssl rand -hex 16)"
}

if [ ! -f "$out/ca.pem" ] || [ ! -f "$out/ca.key" ]; then
    newkey "$out/ca.key"
    cat >"$out/ca.ext" <<CAEXT
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
CAEXT
    openssl req -new -key "$out/ca.key" -subj "/O=Legate development/CN=Legate Dev CA" \
        -out "$out/ca.csr"
    openssl x509 -req -in "$out/ca.csr" -signkey "$out/ca.key" -days 3650 -sha256 \
        -set_serial "$(serial)" -extfile "$out/ca.ext" -out "$out/ca.pem" 2>/dev/null
    rm -f "$out/ca.csr" "$out/ca.ext"
    chmod 644 "$out/ca.pem"
    echo "created dev CA $out/ca.pem"
fi

# leaf NAME SAN_LIST  (SAN_LIST like "DNS:a.example,DNS:b.example")
leaf() {
    name=$1
    sans=$2
    cn=$3
    newkey "$out/$name.key"
    cat >"$out/$name.ext" <<LEAFEXT
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = $sans
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
LEAFEXT
    openssl req -new -key "$out/$name.key" -subj "/O=Legate development/CN=$cn" \
        -out "$out/$name.csr"
    openssl x509 -req -in "$out/$name.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" \
        -set_serial "$(serial)" -days "$days" -sha256 -extfile "$out/$name.ext" \
        -out "$out/$name.pem" 2>/dev/null
    rm -f "$out/$name.csr" "$out/$name.ext"
    chmod 644 "$out/$name.pem"
    echo "created $out/$name.pem ($sans)"
}

all=""
for d in "$@"; do
    case "$d" in
        *[!A-Za-z0-9.-]* | "" | .* | *..*)
            echo "$0: '$d' is not a domain name" >&2
            exit 2
            ;;
    esac
    d=$(printf '%s' "$d" | tr 'A-Z' 'a-z')
    leaf "$d" "DNS:$d" "$d"
    all="${all:+$all,}DNS:$d"
done
leaf node "$all" "$(printf '%s' "$1" | tr 'A-Z' 'a-z')"
