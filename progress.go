// Package progress is caddy-progress, a Caddy v2 plugin that gives slow legacy HTTP services
// jobs with progress. Importing it registers the Caddy modules, which is what
// `xcaddy build --with github.com/caddy-progress/progress` does; the code lives in
// caddymodule (the Caddy adapters), engine (jobs and the job API) and store (the job store).
package progress

import _ "github.com/caddy-progress/progress/caddymodule"
