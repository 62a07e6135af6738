package upstreamhook_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http"
	"time"

	"github.com/caddy-progress/progress/upstreamhook"
)

func ExampleMiddleware() {
	mux := http.NewServeMux()
	mux.Handle("/export", upstreamhook.Middleware(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		progress := upstreamhook.FromContext(r.Context())
		const rows = 500
		for i := range rows {
			exportRow(i) // the slow part
			progress.Step(float64(i+1), rows, "exporting rows")
		}
		progress.Report(upstreamhook.Update{Percent: upstreamhook.Float(100), Stage: "done"})
		io.WriteString(w, "exported\n")
	})))
	log.Fatal(http.ListenAndServe("127.0.0.1:8080", mux))
}

func exportRow(int) {}

// A worker that got the request's headers along with the work reports with its own reporter.
func ExampleNewReporter() {
	job := struct{ Callback, Token string }{
		Callback: "http://127.0.0.1:2080/_jobs/8f14e45f/progress",
		Token:    "token-from-the-Progress-Token-header",
	}
	progress := upstreamhook.NewReporter(job.Callback, job.Token, upstreamhook.Options{
		MinInterval: time.Second,
	})
	for i := range 10 {
		exportRow(i)
		progress.Percent(float64(i+1) * 10)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := progress.Close(ctx); err != nil {
		log.Printf("job %s: last progress update lost: %v", progress.JobID(), err)
	}
}

// Outside a request that came through the sidecar, the reporter does nothing, so the same
// code runs with and without it.
func ExampleFromContext() {
	progress := upstreamhook.FromContext(context.Background())
	progress.Percent(40) // does nothing
	fmt.Println(progress.Active())
	// Output: false
}
