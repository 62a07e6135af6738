#!/usr/bin/env bash
# xcaddy.sh: build, demo and test caddy-progress with pinned tool versions. Nothing is
# installed globally: pinned tools run through `go run module@version`.
#
#   ./xcaddy.sh build   write ./caddy: Caddy with the plugin from this tree
#   ./xcaddy.sh demo    build and start the demo                  (arrives with issue #4)
#   ./xcaddy.sh test    formatting, go vet, staticcheck, go test -race over the whole module
#   ./xcaddy.sh fuzz    run every fuzz target for FUZZTIME each (default 30s)
#   ./xcaddy.sh bench   Caddy with the plugin against plain reverse_proxy; writes BENCHMARKS.md
set -euo pipefail
cd "$(dirname "$0")"

CADDY_VERSION=v2.11.9
XCADDY_VERSION=v0.4.5
STATICCHECK_VERSION=v0.8.2

say() { printf '\n== %s\n' "$*"; }

verb_test() {
	say "gofmt"
	unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
	if [ -n "$unformatted" ]; then
		echo "not gofmt-formatted (run gofmt -w):"; echo "$unformatted"; exit 1
	fi
	say "go vet"
	go vet ./...
	say "staticcheck $STATICCHECK_VERSION"
	go run "honnef.co/go/tools/cmd/staticcheck@$STATICCHECK_VERSION" ./...
	say "go test -race"
	go test -race -count=1 -timeout 30m ./...
	say "all tests passed"
}

verb_fuzz() {
	local budget=${FUZZTIME:-30s}
	for pkg in $(go list ./...); do
		dir=$(go list -f '{{.Dir}}' "$pkg")
		for target in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //'); do
			say "fuzz $pkg $target for $budget"
			go test -run '^$' -fuzz "^${target}\$" -fuzztime "$budget" "$pkg"
		done
	done
}

verb_build() {
	say "xcaddy $XCADDY_VERSION: Caddy $CADDY_VERSION with github.com/caddy-progress/progress from $(pwd)"
	# xcaddy asks the module proxy for the plugin's latest version before it applies the
	# replacement by this folder. A proxy that answers "forbidden" rather than "not found" for
	# an unpublished module stops the build, so every proxy error falls through ('|') to an
	# empty local proxy, whose "not found" makes Go use the replacement ("direct" is left out:
	# its errors end the chain).
	local empty
	empty=$(mktemp -d)
	trap 'rm -rf "$empty"' RETURN
	local proxies
	proxies=$(go env GOPROXY | tr ',|' '\n\n' | grep -v -x -e direct -e off | paste -sd'|')
	GOPROXY="${proxies:+$proxies|}file://$empty" \
		go run "github.com/caddyserver/xcaddy/cmd/xcaddy@$XCADDY_VERSION" build "$CADDY_VERSION" \
		--with "github.com/caddy-progress/progress=$(pwd)" --output ./caddy
	./caddy list-modules | grep -q '^http.handlers.progress$' || { echo "./caddy lacks the progress module" >&2; exit 1; }
	say "wrote ./caddy ($(./caddy version | head -1))"
}

verb_bench() {
	say "go run ./tests/bench -write (about 10 minutes; see tests/bench/main.go)"
	go run ./tests/bench -write
}

verb_unbuilt() {
	echo "xcaddy.sh $1: not built yet. The demo arrives with issue #4; ./xcaddy.sh build works today." >&2
	exit 2
}

case "${1:-}" in
	test) verb_test ;;
	fuzz) verb_fuzz ;;
	build) verb_build ;;
	demo) verb_unbuilt "$1" ;;
	bench) verb_bench ;;
	*)
		echo "usage: $0 build | demo | test | fuzz | bench" >&2
		exit 2
		;;
esac
