# shellcheck shell=bash
# Sourced by the bench scripts: how the services talk. SECURITY=tls (the
# default, as deployed: a CA and an identity per service, mutual TLS on
# every hop) or SECURITY=plaintext (--insecure-plaintext everywhere).
#
# bench_security DIR: sets the flag arrays TARGET_SEC, COLLECTOR_SEC and
# AGENT_SEC (the CA and identities, if any, go under DIR), and exports
# TIDEMARK_API_CA for the tools when the API is HTTPS.
bench_security() {
  local d=$1 r
  chmod 600 "$d/token"
  case ${SECURITY:-tls} in
    tls)
      "$BIN/tidemark" ca init --dir "$d/ca" >/dev/null
      for r in target collector agent; do
        "$BIN/tidemark" ca issue --ca "$d/ca" "bench-$r" --role "$r" --out "$d/tls-$r" >/dev/null
      done
      TARGET_SEC=(--tls "$d/tls-target")
      COLLECTOR_SEC=(--tls "$d/tls-collector")
      AGENT_SEC=(--tls "$d/tls-agent")
      # The collector's API is HTTPS with its identity: the tools trust the CA.
      export TIDEMARK_API_CA=$d/ca/ca.pem
      ;;
    plaintext)
      TARGET_SEC=(--insecure-plaintext)
      COLLECTOR_SEC=(--insecure-plaintext)
      AGENT_SEC=(--insecure-plaintext)
      unset TIDEMARK_API_CA
      ;;
    *)
      echo "SECURITY=${SECURITY}: give tls or plaintext" >&2
      exit 2
      ;;
  esac
}
