// Package upstreamhook lets an application behind the caddy-progress sidecar report the
// progress of a request the sidecar turned into a job.
//
// When a slow request becomes a job, the sidecar passes it on to the application with three
// more headers: Progress-Job-Id, Progress-Callback (an absolute URL) and Progress-Token. The
// application reports by POSTing a small JSON object to the callback URL with the token as a
// bearer token (DESIGN.md section 4):
//
//	{"percent": 40}
//	{"current": 4, "total": 10, "stage": "resize", "message": "image 4 of 10", "data": {…}}
//
// The sidecar answers 204 once the update is stored; 400 for a malformed update (the body
// names the field), 401 for a wrong token, 404 for an unknown job, 409 for a job already
// finished, 413 for an update too large. Fields left out (or empty strings) keep their value.
//
// # Go applications
//
// Wrap the handler in Middleware and report through the Reporter in the request context:
//
//	mux.Handle("/export", upstreamhook.Middleware(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
//		rows := loadRows(r)
//		upstreamhook.FromContext(r.Context()).Percent(40)
//		writeReport(w, rows)
//	})))
//
// Reporting never waits on the network: a Reporter keeps only the latest unsent update and
// sends it from a goroutine of its own, retrying while the sidecar is unreachable. When the
// handler returns, Middleware sends the last update before the response leaves, because the
// sidecar finishes the job when it sees the response. A request that did not come through the
// sidecar gets a no-op Reporter, so the same handler works with and without it. Work that
// leaves the handler (a queue worker, say) takes the two header values along and uses
// NewReporter, then Close.
//
// # Other languages
//
// Any HTTP client will do. These calls wait for the answer, so give them a short timeout,
// ignore their failures, and do not call them in a tight loop. A CGI or shell script:
//
//	curl -fsS -m 2 -X POST "$HTTP_PROGRESS_CALLBACK" -H "Authorization: Bearer $HTTP_PROGRESS_TOKEN" -H 'Content-Type: application/json' -d '{"percent":40}' || true
//
// PHP:
//
//	@file_get_contents($_SERVER['HTTP_PROGRESS_CALLBACK'], false, stream_context_create(['http' => ['method' => 'POST', 'timeout' => 2, 'header' => "Authorization: Bearer {$_SERVER['HTTP_PROGRESS_TOKEN']}\r\nContent-Type: application/json", 'content' => json_encode(['percent' => 40])]]));
//
// Python with requests (Flask's request shown; WSGI has environ['HTTP_PROGRESS_CALLBACK']):
//
//	requests.post(request.headers['Progress-Callback'], json={'percent': 40}, headers={'Authorization': 'Bearer ' + request.headers['Progress-Token']}, timeout=2)
//
// or with the standard library only:
//
//	urllib.request.urlopen(urllib.request.Request(environ['HTTP_PROGRESS_CALLBACK'], data=json.dumps({'percent': 40}).encode(), headers={'Authorization': 'Bearer ' + environ['HTTP_PROGRESS_TOKEN'], 'Content-Type': 'application/json'}), timeout=2)
//
// # The server half
//
// The sidecar side of the same protocol lives here too, so that both ends agree on it:
// ParseUpdate validates a callback body, Signer makes and checks the per-job tokens, and
// BearerToken reads the Authorization header. This package imports nothing but the standard
// library, so legacy applications can import it without pulling in Caddy.
package upstreamhook
