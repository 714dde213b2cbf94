# Sourced by scripts/test: installs the real peers the suite drives, when they are missing.
#   - Debian's Chromium (the browser journey drives it through Playwright; no browser download),
#   - Node >= 22 and npm (from Debian's packages; scripts/conformance adds Node 22 from npm if Debian's is older),
#   - the official MCP conformance suite and npm's oidc-provider (the test authorization server), under .tools/.
# Each step does nothing when its part is already there, so a second run costs well under a second.
apt_install() {
  local as_root=""
  [[ "$(id -u)" -eq 0 ]] || as_root=sudo
  echo "installing $* from Debian's packages…" >&2
  $as_root apt-get update -qq >/dev/null
  $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
missing=()
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
[[ -x /usr/bin/chromium ]] || missing+=(chromium)
if [[ ${#missing[@]} -gt 0 ]]; then
  apt_install "${missing[@]}"
fi
./scripts/oidc-as install >/dev/null
