#!/usr/bin/env bash
# A development CA and certificates for NATS over TLS: never for production.
#
#   infra/tls/make-dev-certs.sh DIR [HOST...]      (default DIR infra/tls/dev, HOST 127.0.0.1 localhost)
#
# Writes DIR/ca.pem + ca-key.pem (the CA), DIR/server.pem + server-key.pem (the server,
# valid for every HOST given) and DIR/client.pem + client-key.pem (a client certificate,
# for servers started with `dpbus nats-config --tls-verify`). Private keys are mode 0600
# and are never committed (.gitignore). Then:
#
#   dpbus nats-config --out secrets --tls-ca DIR/ca.pem --tls-cert DIR/server.pem --tls-key DIR/server-key.pem
#   nats-server -c secrets/nats.conf
#   dpbus ingest --nats-url tls://HOST:4222 --tls-ca DIR/ca.pem ...
set -euo pipefail
dir=${1:-infra/tls/dev}
shift || true
hosts=("$@")
[ ${#hosts[@]} -gt 0 ] || hosts=(127.0.0.1 localhost)
command -v openssl >/dev/null || { echo "make-dev-certs: openssl is not installed" >&2; exit 1; }
mkdir -p "$dir"
umask 077

san=""
for h in "${hosts[@]}"; do
  if [[ $h =~ ^[0-9.]+$ || $h == *:* ]]; then san+="IP:$h,"; else san+="DNS:$h,"; fi
done
san=${san%,}

openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=dpbus dev CA" \
  -keyout "$dir/ca-key.pem" -out "$dir/ca.pem" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

sign() {  # name, subject, extended key usage, subjectAltName (may be empty)
  local name=$1 subject=$2 usage=$3 alt=$4 ext
  ext=$(mktemp)
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=%s\n' \
    "$usage" > "$ext"
  [ -z "$alt" ] || printf 'subjectAltName=%s\n' "$alt" >> "$ext"
  openssl req -newkey rsa:2048 -nodes -subj "$subject" -keyout "$dir/$name-key.pem" -out "$dir/$name.csr" 2>/dev/null
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca-key.pem" -CAcreateserial \
    -days 365 -extfile "$ext" -out "$dir/$name.pem" 2>/dev/null
  rm -f "$dir/$name.csr" "$ext"
}
sign server "/CN=dpbus nats" serverAuth "$san"
sign client "/CN=dpbus client" clientAuth ""
rm -f "$dir/ca.srl"
chmod 644 "$dir/ca.pem" "$dir/server.pem" "$dir/client.pem"
echo "wrote a dev CA and certificates for ${hosts[*]} to $dir"
