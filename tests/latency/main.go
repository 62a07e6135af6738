// Command latency measures the callback-to-subscriber latency of issue #4: the harness is
// tests/internal/fanout (see its package comment for what runs and what is measured), which
// tests/bench -scenario fanout (issue #6) runs too.
//
//	go run ./tests/latency                               # the shapes, plugin and baseline
//	go run ./tests/latency -shapes 100x10x10 -rounds 3
//	./xcaddy.sh bench-latency                            # the same as the first line
package main

import (
	"os"

	"github.com/caddy-progress/progress/tests/internal/fanout"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "__hub" {
		os.Exit(fanout.HubMain(os.Args[2:]))
	}
	os.Exit(fanout.Main(os.Args[1:]))
}
