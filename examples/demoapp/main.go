// Command demoapp is the legacy application of the caddy-progress demo: a slow report
// generator that knows nothing of jobs, queues or event streams. Caddy turns its requests into
// jobs; the app only answers, slowly, and (on one endpoint) says how far it has got.
//
//	POST /reports/generate  collects rows, renders pages one by one and answers with a JSON
//	                        report; on the way it reports stage, "page 3 of 10" and percent
//	                        through upstreamhook, which posts them to the sidecar's callback
//	POST /reports/quiet     sleeps, then answers; it reports nothing, like an app that cannot
//	                        be changed, so only the sidecar's own estimate shows life
//	GET  /healthz           200 "ok", for scripts that wait for the app to be up
//
// Without the sidecar's headers (a request that did not become a job) upstreamhook's reporter
// does nothing and the endpoints behave as before: the legacy behaviour is untouched.
//
// It listens on -addr (loopback by default) and prints the address it got as the first line on
// stdout, so a test can ask for port 0; it logs to stderr. The flags set how long the work
// takes, so the browser test can run it fast.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/caddy-progress/progress/upstreamhook"
)

// config is what the flags set.
type config struct {
	collect time.Duration // the "collect" stage of /reports/generate
	pages   int           // pages /reports/generate renders
	page    time.Duration // time per page
	quiet   time.Duration // how long /reports/quiet takes
}

func main() {
	addr := flag.String("addr", "127.0.0.1:8481", "address to listen on (host:port; port 0 picks a free one)")
	var c config
	flag.DurationVar(&c.collect, "collect", 1200*time.Millisecond, "/reports/generate: how long the collect stage takes")
	flag.IntVar(&c.pages, "pages", 10, "/reports/generate: how many pages it renders")
	flag.DurationVar(&c.page, "page", 700*time.Millisecond, "/reports/generate: how long one page takes")
	flag.DurationVar(&c.quiet, "quiet", 8*time.Second, "/reports/quiet: how long it takes")
	flag.Parse()
	log.SetPrefix("demoapp: ")
	log.SetFlags(log.Ltime | log.Lmicroseconds)
	if c.pages < 1 {
		log.Fatal("-pages must be at least 1")
	}

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(ln.Addr().String())
	os.Stdout.Sync()

	srv := &http.Server{Handler: newMux(c), ReadHeaderTimeout: 10 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	log.Printf("listening on http://%s", ln.Addr())
	select {
	case err := <-served:
		log.Fatal(err)
	case <-ctx.Done():
	}
	// A report in progress may take seconds more; whoever stops the demo wants it gone now,
	// and Caddy records such a job as failed, which is what really happened.
	shutCtx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutCtx); err != nil {
		srv.Close()
	}
	log.Print("stopped")
}

func newMux(c config) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("POST /reports/generate", upstreamhook.Middleware(http.HandlerFunc(c.generate)))
	mux.HandleFunc("POST /reports/quiet", c.quietReport)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Write([]byte("ok\n"))
	})
	return mux
}

// generate does the reporting endpoint's fake work in three stages and tells the sidecar about
// each step. Report never blocks, so the work's pace does not depend on the sidecar's.
func (c config) generate(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	rep := upstreamhook.FromContext(ctx)
	job := r.Header.Get(upstreamhook.HeaderJobID)
	start := time.Now()
	rows := 1000 * (c.pages + 2)

	rep.Report(upstreamhook.Update{Percent: upstreamhook.Float(2), Stage: "collect", Message: "querying the sales database"})
	if !pause(ctx, c.collect) {
		logGone(job, "collecting")
		return
	}
	// Percent: collect is the first 10%, the pages the next 85%, writing the file the rest.
	rep.Report(upstreamhook.Update{Percent: upstreamhook.Float(10), Stage: "collect", Message: strconv.Itoa(rows) + " rows collected"})
	for page := 1; page <= c.pages; page++ {
		if !pause(ctx, c.page) {
			logGone(job, fmt.Sprintf("page %d of %d", page, c.pages))
			return
		}
		rep.Report(upstreamhook.Update{
			Percent: upstreamhook.Float(10 + 85*float64(page)/float64(c.pages)),
			Current: upstreamhook.Float(float64(page)),
			Total:   upstreamhook.Float(float64(c.pages)),
			Stage:   "render",
			Message: fmt.Sprintf("page %d of %d", page, c.pages),
		})
	}
	// The sidecar keeps fields an update leaves out, so these repeat current and total: all
	// pages are done.
	all := upstreamhook.Float(float64(c.pages))
	rep.Report(upstreamhook.Update{Percent: upstreamhook.Float(97), Current: all, Total: all, Stage: "write", Message: "writing the report"})
	if !pause(ctx, c.page/2) {
		logGone(job, "writing")
		return
	}
	rep.Report(upstreamhook.Update{Percent: upstreamhook.Float(100), Current: all, Total: all, Stage: "write", Message: "report ready"})

	log.Printf("job %q: report of %d pages done in %v", job, c.pages, time.Since(start).Round(time.Millisecond))
	writeJSON(w, map[string]any{
		"report":       "Quarterly sales",
		"pages":        c.pages,
		"rows":         rows,
		"total_eur":    1234567.89,
		"job_id":       job,
		"took_ms":      time.Since(start).Milliseconds(),
		"generated_at": time.Now().UTC().Format(time.RFC3339),
	})
}

// quietReport is the endpoint of an app that cannot be changed: it works, then answers.
func (c config) quietReport(w http.ResponseWriter, r *http.Request) {
	job := r.Header.Get(upstreamhook.HeaderJobID)
	start := time.Now()
	if !pause(r.Context(), c.quiet) {
		logGone(job, "working quietly")
		return
	}
	log.Printf("job %q: quiet report done in %v", job, time.Since(start).Round(time.Millisecond))
	writeJSON(w, map[string]any{
		"report":       "Inventory (quiet)",
		"job_id":       job,
		"took_ms":      time.Since(start).Milliseconds(),
		"generated_at": time.Now().UTC().Format(time.RFC3339),
	})
}

// pause waits d, or less if the request ends first (the job was canceled, the sidecar or the
// client went away); it reports whether the work should go on. Stopping then is the point of
// a cancel button: the legacy app stops burning time on a report nobody will read.
func pause(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

func logGone(job, where string) {
	log.Printf("job %q: request ended while %s; stopping", job, where)
}

func writeJSON(w http.ResponseWriter, v any) {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)+1))
	w.Write(append(b, '\n'))
}
