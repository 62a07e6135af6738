package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// idleLoadMain is the idle scenario's client (`bench __idle`): it opens -n SSE streams over
// HTTP/2, -streams per TCP connection (one Transport, so one http2 ClientConn, per connection),
// the connections spread over -sources loopback source addresses (127.0.0.1, .2, …), and the
// streams spread round-robin over the URLs of the -urls file. Per stream it keeps one goroutine
// and a 512-byte read buffer, and counts the lines that start with "data:".
//
// It prints "opened N" once every stream has answered 200 and carried -fresh-data data lines
// (1 on Caddy: a new subscriber gets the job's current document; 0 on the bare server) and
// something at all, then "evented N" once every stream has carried one data line more. Lines
// "progress …" report its state every 2 s; "failed …" a stream that failed (the harness stops
// at the first). It ends on SIGTERM, or after -max.
func idleLoadMain(args []string) int {
	fs := flag.NewFlagSet("idle", flag.ContinueOnError)
	urlsFile := fs.String("urls", "", "file with one event-stream URL a line")
	n := fs.Int("n", 1000, "streams")
	perConn := fs.Int("streams", 200, "streams per TCP connection")
	sources := fs.Int("sources", 1, "loopback source addresses 127.0.0.1 … 127.0.0.<sources>")
	freshData := fs.Int("fresh-data", 0, "data lines each stream carries when fresh")
	opening := fs.Int("opening", 256, "streams being opened at once")
	maxRun := fs.Duration("max", 30*time.Minute, "end after this long in any case")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	b, err := os.ReadFile(*urlsFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, "idle:", err)
		return 1
	}
	urls := strings.Fields(string(b))
	if len(urls) == 0 || *n < 1 || *perConn < 1 || *sources < 1 || *sources > 250 {
		fmt.Fprintln(os.Stderr, "idle: no URLs, or a flag out of range")
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *maxRun)
	defer cancel()

	nconns := (*n + *perConn - 1) / *perConn
	clients := make([]*http.Client, nconns)
	for i := range clients {
		local := &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(1+i%*sources))}
		dialer := &net.Dialer{LocalAddr: local, Timeout: 30 * time.Second}
		tr := &http.Transport{
			TLSClientConfig:   &tls.Config{InsecureSkipVerify: true},
			ForceAttemptHTTP2: true,
			DialContext:       dialer.DialContext,
			// Small HTTP/1-era buffers: HTTP/2 framing has its own; these only size the
			// connection's bufio reader and writer.
			ReadBufferSize:  4 << 10,
			WriteBufferSize: 4 << 10,
		}
		tr.Protocols = new(http.Protocols)
		tr.Protocols.SetHTTP2(true)
		// One connection per Transport: the harness sizes -streams under the servers'
		// max concurrent streams (250 in Go and Caddy), so it never opens a second.
		clients[i] = &http.Client{Transport: tr}
	}

	var opened, fresh, evented, failed atomic.Int64
	var firstFailure atomic.Value
	sem := make(chan struct{}, *opening)
	for s := range *n {
		url := urls[s%len(urls)]
		cl := clients[s / *perConn]
		sem <- struct{}{}
		go func() {
			released := false
			release := func() {
				if !released {
					released = true
					<-sem
				}
			}
			defer release()
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
			req.Header.Set("Accept", "text/event-stream")
			resp, err := cl.Do(req)
			if err != nil {
				if ctx.Err() == nil {
					failed.Add(1)
					firstFailure.CompareAndSwap(nil, err.Error())
				}
				return
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				failed.Add(1)
				firstFailure.CompareAndSwap(nil, "GET "+url+": "+resp.Status)
				return
			}
			opened.Add(1)
			buf := make([]byte, 512)
			data, got := 0, false
			lineStart, match := true, 0 // how much of "data:" the current line has matched
			for {
				k, err := resp.Body.Read(buf)
				for _, c := range buf[:k] {
					switch {
					case c == '\n':
						lineStart, match = true, 0
						continue
					case lineStart && match < 5 && c == "data:"[match]:
						match++
						if match == 5 {
							data++
							if data == *freshData+1 {
								evented.Add(1)
							}
						}
						continue
					}
					lineStart = false
				}
				if k > 0 && !got && data >= *freshData {
					got = true
					fresh.Add(1)
					release()
				}
				if err != nil {
					if ctx.Err() == nil {
						failed.Add(1)
						firstFailure.CompareAndSwap(nil, fmt.Sprintf("stream ended: %v", err))
					}
					return
				}
			}
		}()
	}

	out := bufio.NewWriter(os.Stdout)
	say := func(format string, args ...any) {
		fmt.Fprintf(out, format+"\n", args...)
		out.Flush()
	}
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	saidOpen, saidEvented := false, false
	lastProgress := time.Now()
	for {
		select {
		case <-ctx.Done():
			return 0
		case <-tick.C:
		}
		if f := failed.Load(); f > 0 {
			say("failed %d: %v", f, firstFailure.Load())
			<-ctx.Done()
			return 1
		}
		if !saidOpen && fresh.Load() == int64(*n) {
			saidOpen = true
			say("opened %d", *n)
		}
		if saidOpen && !saidEvented && evented.Load() == int64(*n) {
			saidEvented = true
			say("evented %d", *n)
		}
		if time.Since(lastProgress) >= 2*time.Second {
			lastProgress = time.Now()
			say("progress opened %d fresh %d evented %d connections %d", opened.Load(), fresh.Load(), evented.Load(), nconns)
		}
	}
}
