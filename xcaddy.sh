#!/usr/bin/env bash
# xcaddy.sh: build, demo and test caddy-progress with pinned tool versions. Nothing is
# installed globally: pinned tools run through `go run module@version`.
#
#   ./xcaddy.sh build   write ./caddy: Caddy with the plugin from this tree
#   ./xcaddy.sh demo    build ./caddy and the demo app (examples/), run both until Ctrl-C
#   ./xcaddy.sh test    formatting, go vet, staticcheck, go test -race over the whole module,
#                       then every fuzz target for FUZZTIME_CI each (default 5s)
#   ./xcaddy.sh fuzz    run every fuzz target for FUZZTIME each (default 30s)
#   ./xcaddy.sh bench   Caddy with the plugin against plain reverse_proxy; writes BENCHMARKS.md
#   ./xcaddy.sh bench-latency  callback-to-subscriber latency (issue #4); prints, writes nothing
#   ./xcaddy.sh bench-scale [flags]  issue #6: idle subscribers (100,000; memory against a bare
#                       net/http server) and long-poll wake-up; writes BENCHMARKS.md
#   ./xcaddy.sh bench-observe [flags]  issue #5: job creation and callback-to-delivery latency with
#                       tracing and metrics off, then on, in one run; writes BENCHMARKS.md
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
	# A short fixed budget per target: new inputs each run, on top of the seed corpus (testdata/
	# fuzz/) that go test above already ran. 13 targets at 5s plus their builds: about 2 minutes.
	FUZZTIME="${FUZZTIME_CI:-5s}" verb_fuzz
	say "all tests passed"
}

verb_fuzz() {
	local budget=${FUZZTIME:-30s}
	for pkg in $(go list ./...); do
		dir=$(go list -f '{{.Dir}}' "$pkg")
		for target in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //'); do
			say "fuzz $pkg $target for $budget"
			fuzz_one "$pkg" "$dir" "$target" "$budget"
		done
	done
}

# fuzz_one runs one fuzz target. Go 1.26's fuzzing coordinator can fail a run that found nothing
# with a bare "context deadline exceeded" at the end of a -fuzztime duration: the deadline
# reaches the coordinator before its workers' context is cancelled (golang/go#75804, fixed in
# Go 1.27). That one failure, with no failing input written to testdata/fuzz/<target>, is
# reported loudly and counted as a pass; any other failure, or any new input file, fails.
fuzz_one() {
	local pkg=$1 dir=$2 target=$3 budget=$4
	local corpus="$dir/testdata/fuzz/$target" out before status=0
	out=$(mktemp)
	before=$(ls "$corpus" 2>/dev/null | sort || true)
	go test -run '^$' -fuzz "^${target}\$" -fuzztime "$budget" "$pkg" 2>&1 | tee "$out" || status=$?
	if [ "$status" -ne 0 ]; then
		local after failures
		after=$(ls "$corpus" 2>/dev/null | sort || true)
		failures=$(grep -c -e '^--- FAIL' -e 'Failing input written' -e '^panic:' "$out" || true)
		if [ "$before" = "$after" ] && [ "$failures" -eq 1 ] &&
			grep -A1 -e "^--- FAIL: $target (" "$out" | tail -n1 | grep -qx '    context deadline exceeded'; then
			echo "WARNING: $target: Go's fuzz coordinator failed at the end of its time budget" \
				"with no failing input (golang/go#75804); counted as passed" >&2
			status=0
		fi
	fi
	rm -f "$out"
	return "$status"
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

verb_bench_scale() {
	say "go run ./tests/bench -scenario scale -write $* (about 10 minutes on a quiet machine; see tests/bench/main.go)"
	go run ./tests/bench -scenario scale -write "$@"
}

verb_bench_observe() {
	say "go run ./tests/bench -scenario observe -write $* (about 15 minutes on a quiet machine; see tests/bench/observe.go)"
	go run ./tests/bench -scenario observe -write "$@"
}

verb_bench_latency() {
	say "go run ./tests/latency $* (several minutes; see tests/latency/main.go)"
	go run ./tests/latency "$@"
}

# verb_demo runs the demo: the demo app (examples/demoapp) and ./caddy with examples/Caddyfile,
# both on loopback, until Ctrl-C. Everything they write stays in .demo/: the job store, Caddy's
# local CA and certificates (XDG_DATA_HOME), its autosaved config (XDG_CONFIG_HOME) and logs.
verb_demo() {
	command -v curl >/dev/null || { echo "xcaddy.sh demo: needs curl, to see when the demo is up" >&2; exit 1; }
	verb_build
	local state
	state="$(pwd)/.demo"
	mkdir -p "$state/bin" "$state/data" "$state/config"
	say "go build ./examples/demoapp"
	go build -o "$state/bin/demoapp" ./examples/demoapp

	export DEMO_PORT="${DEMO_PORT:-8443}" DEMO_CALLBACK_PORT="${DEMO_CALLBACK_PORT:-8480}"
	export DEMO_APP_PORT="${DEMO_APP_PORT:-8481}" DEMO_ADMIN_PORT="${DEMO_ADMIN_PORT:-2119}"
	export DEMO_STATE="$state" DEMO_SITE="$(pwd)/examples/site"
	local url="https://localhost:$DEMO_PORT/"

	# One cleanup for every way out (Ctrl-C, kill, an error below). The INT and TERM traps
	# only exit; the EXIT trap then stops both processes.
	trap demo_stop EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM

	say "starting the demo app on 127.0.0.1:$DEMO_APP_PORT (log: .demo/demoapp.log)"
	"$state/bin/demoapp" -addr "127.0.0.1:$DEMO_APP_PORT" >"$state/demoapp.log" 2>&1 &
	demo_pids+=($!)
	local app_pid=$!
	say "starting caddy with examples/Caddyfile (log: .demo/caddy.log)"
	XDG_DATA_HOME="$state/data" XDG_CONFIG_HOME="$state/config" \
		./caddy run --config examples/Caddyfile --adapter caddyfile >"$state/caddy.log" 2>&1 &
	demo_pids+=($!)
	local caddy_pid=$!

	demo_wait "the demo app" "$app_pid" "$state/demoapp.log" \
		curl -fsS -o /dev/null "http://127.0.0.1:$DEMO_APP_PORT/healthz"
	# -k: the certificate comes from Caddy's local CA, which this machine does not trust
	# (skip_install_trust); the first good answer also means the certificate has been issued.
	demo_wait "caddy" "$caddy_pid" "$state/caddy.log" \
		curl -fsSk -o /dev/null --resolve "localhost:$DEMO_PORT:127.0.0.1" "$url"

	printf '\n== the demo is running\n\n'
	printf '   open  %s\n' "$url"
	printf '         (the browser will warn about the certificate: it comes from Caddy'\''s local CA in .demo/)\n\n'
	printf '   or with curl:\n'
	printf "     curl -ik -X POST -H 'Prefer: respond-async' %sreports/generate\n" "$url"
	printf '     curl -Nk %s_jobs/<id>/events\n' "$url"
	printf '     curl -k  %s_jobs/<id>/result\n\n' "$url"
	printf '   logs: .demo/caddy.log, .demo/demoapp.log (followed below)      stop: Ctrl-C\n\n'
	# Follow the app's log here, so the pages it renders show up as they happen.
	tail -n 0 -f "$state/demoapp.log" &
	demo_pids+=($!)
	# Either process ending on its own ends the demo. (A poll rather than `wait -n`, which
	# older bash lacks; Ctrl-C reaches sleep too, so it does not delay the stop.)
	while kill -0 "$app_pid" 2>/dev/null && kill -0 "$caddy_pid" 2>/dev/null; do
		sleep 1
	done
	echo "xcaddy.sh demo: a demo process exited on its own; see .demo/caddy.log and .demo/demoapp.log" >&2
	exit 1
}

demo_pids=()

# demo_wait NAME PID LOG CMD...: runs CMD every 200ms until it succeeds; fails after 60s or as
# soon as the process PID has exited, showing the end of its log.
demo_wait() {
	local name=$1 pid=$2 log=$3
	shift 3
	local deadline=$((SECONDS + 60))
	until "$@" 2>/dev/null; do
		if ! kill -0 "$pid" 2>/dev/null; then
			echo "xcaddy.sh demo: $name exited at start; the end of its log ($log):" >&2
			tail -n 20 "$log" >&2
			exit 1
		fi
		if ((SECONDS >= deadline)); then
			echo "xcaddy.sh demo: $name did not answer within 60s; the end of its log ($log):" >&2
			tail -n 20 "$log" >&2
			exit 1
		fi
		sleep 0.2
	done
}

# demo_stop sends SIGTERM to every process the demo started, as a service manager would, waits
# up to 10 seconds for them all, then sends SIGKILL to any still there.
demo_stop() {
	trap - EXIT INT TERM
	[ ${#demo_pids[@]} -eq 0 ] && return
	printf '\n== stopping the demo\n'
	local pid
	for pid in "${demo_pids[@]}"; do
		kill -TERM "$pid" 2>/dev/null || true
	done
	local deadline=$((SECONDS + 10))
	for pid in "${demo_pids[@]}"; do
		while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
		kill -KILL "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	done
	demo_pids=()
}

case "${1:-}" in
	test) verb_test ;;
	fuzz) verb_fuzz ;;
	build) verb_build ;;
	demo) verb_demo ;;
	bench) verb_bench ;;
	bench-latency) shift; verb_bench_latency "$@" ;;
	bench-scale) shift; verb_bench_scale "$@" ;;
	bench-observe) shift; verb_bench_observe "$@" ;;
	*)
		echo "usage: $0 build | demo | test | fuzz | bench | bench-latency [flags] | bench-scale [flags] | bench-observe [flags]" >&2
		exit 2
		;;
esac
