// Package engine turns slow HTTP requests into jobs and serves the job API, with net/http
// alone: it knows the store, not Caddy. The Caddy module (package caddymodule) parses the
// configuration and hands requests over.
//
//   - Route decides, per request, whether it becomes a job (the Prefer header and the route's
//     async mode), reads the body within bounds, creates the job and either answers 202 at once
//     or waits a while for the upstream, passing its response straight through if it comes in
//     time.
//   - Engine runs jobs detached from the requests that started them: it outlives config
//     reloads (one engine per store), queues jobs past a route's concurrency, streams the
//     upstream's response into the store, and cancels the upstream request on demand.
//   - API serves the job endpoints: status with long-poll, Server-Sent Events, result replay,
//     cancel and delete, with every error as an RFC 9457 problem document.
package engine
