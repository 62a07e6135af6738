// Command caddy is Caddy with the standard modules and caddy-progress, built from this
// repository for the end-to-end tests and benchmarks (users build theirs with ./xcaddy.sh build).
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-progress/progress/caddymodule"
)

func main() {
	caddycmd.Main()
}
