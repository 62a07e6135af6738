package main

import (
	"context"
	"crypto/tls"
	_ "expvar" // on the admin listener only: /debug/vars, the runtime's memory statistics
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	_ "net/http/pprof" // on the admin listener only: heap?gc=1 settles the heap as Caddy's admin does
	"os"
	"os/signal"
	"sync"
	"syscall"

	"github.com/caddy-progress/progress/tests/internal/caddyrun"
)

// bareMain is the idle scenario's baseline (`bench __bare`): a bare Go net/http server, HTTP/2
// over TLS, whose handler only holds an event stream open. It writes the headers and one
// comment line, flushes once, and then waits; when /fire is posted on the admin listener,
// every stream gets one event (so that memory can be measured after each stream has carried
// an event, as on Caddy). It prints "<tls addr> <admin addr>" as its first line and serves
// until SIGTERM. The admin listener (plain HTTP) also serves net/http/pprof.
func bareMain(args []string) int {
	fs := flag.NewFlagSet("bare", flag.ContinueOnError)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	cert, err := caddyrun.SelfSigned()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bare:", err)
		return 1
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "bare:", err)
		return 1
	}
	adminLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "bare:", err)
		return 1
	}
	var fireOnce sync.Once
	fire := make(chan struct{})
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			h := w.Header()
			h.Set("Content-Type", "text/event-stream")
			h.Set("Cache-Control", "no-store")
			w.WriteHeader(http.StatusOK)
			io.WriteString(w, ": stream open\n\n")
			http.NewResponseController(w).Flush()
			select {
			case <-fire:
				io.WriteString(w, "id: 2\nevent: progress\ndata: {\"percent\":50}\n\n")
				http.NewResponseController(w).Flush()
			case <-r.Context().Done():
				return
			}
			<-r.Context().Done()
		}),
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2"}},
	}
	srv.Protocols = new(http.Protocols)
	srv.Protocols.SetHTTP2(true)
	http.DefaultServeMux.HandleFunc("POST /fire", func(w http.ResponseWriter, r *http.Request) {
		fireOnce.Do(func() { close(fire) })
		w.WriteHeader(http.StatusNoContent)
	})
	admin := &http.Server{Handler: http.DefaultServeMux}
	fmt.Println(ln.Addr().String(), adminLn.Addr().String())
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	go srv.ServeTLS(ln, "", "")
	go admin.Serve(adminLn)
	<-ctx.Done()
	srv.Close()
	admin.Close()
	return 0
}
