package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// The load generator's markers on stderr, which the harness uses to sample CPU use exactly
// over the measured window.
const (
	markWindowStart = "BENCH-MARK window-start"
	markWindowEnd   = "BENCH-MARK window-end"
)

// loadResult is what one load generator run reports, as JSON on stdout.
type loadResult struct {
	URL     string `json:"url"`
	Method  string `json:"method"`
	Prefer  string `json:"prefer"`
	Conns   int    `json:"conns"`
	Streams int    `json:"streams"`
	Expect  int    `json:"expect"`

	WarmupSeconds float64 `json:"warmup_s"`
	WindowSeconds float64 `json:"window_s"`

	// Within the window: responses with the expected status, every status, transport errors.
	OK       int            `json:"ok"`
	Statuses map[string]int `json:"statuses"`
	Errors   int            `json:"errors"`
	RPS      float64        `json:"rps"` // OK / window

	// Latency of the expected responses completed in the window, in milliseconds.
	P50  float64 `json:"p50_ms"`
	P90  float64 `json:"p90_ms"`
	P99  float64 `json:"p99_ms"`
	P999 float64 `json:"p999_ms"`
	Max  float64 `json:"max_ms"`
	Mean float64 `json:"mean_ms"`

	// The whole run, warm-up and the requests in flight at the end included.
	AllStatuses map[string]int `json:"all_statuses"`
	AllErrors   int            `json:"all_errors"`
	ErrorSample string         `json:"error_sample,omitempty"`

	Dials    int            `json:"dials"`    // TCP connections opened
	Protos   map[string]int `json:"protos"`   // response protocols
	Location string         `json:"location"` // the Location of one expected response
}

// loadMain is the load generator: conns HTTP/2 connections, each carrying streams concurrent
// request loops (closed loop: a loop sends its next request when the previous response has been
// read), for warmup then duration. Every latency of the window is kept, so the percentiles are
// exact, not estimated.
func loadMain(args []string) int {
	fs := flag.NewFlagSet("load", flag.ContinueOnError)
	target := fs.String("url", "", "URL to load")
	method := fs.String("method", http.MethodGet, "request method")
	prefer := fs.String("prefer", "", "Prefer header value; empty sends none")
	body := fs.String("body", "", "request body")
	conns := fs.Int("conns", 2, "HTTP/2 connections")
	streams := fs.Int("streams", 16, "concurrent streams (request loops) per connection")
	warmup := fs.Duration("warmup", 3*time.Second, "warm-up before the window")
	duration := fs.Duration("duration", 10*time.Second, "measured window")
	expect := fs.Int("expect", http.StatusOK, "the status that counts as a success")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *target == "" || *conns < 1 || *streams < 1 || *conns**streams > 4096 ||
		*duration <= 0 || *duration > 10*time.Minute || *warmup < 0 || *warmup > 10*time.Minute {
		fmt.Fprintln(os.Stderr, "load: bad arguments")
		return 2
	}
	res, err := runLoad(*target, *method, *prefer, []byte(*body), *conns, *streams, *warmup, *duration, *expect)
	if err != nil {
		fmt.Fprintln(os.Stderr, "load:", err)
		return 1
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		fmt.Fprintln(os.Stderr, "load:", err)
		return 1
	}
	return 0
}

// workerStats is what one request loop saw.
type workerStats struct {
	lat         []time.Duration // expected responses completed in the window
	statuses    map[int]int     // in the window
	errors      int             // in the window
	allStatuses map[int]int
	allErrors   int
	protos      map[string]int
	errSample   string
	location    string
}

func newH2Transport(dials *atomic.Int64) *http.Transport {
	d := &net.Dialer{Timeout: 5 * time.Second}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			dials.Add(1)
			return d.DialContext(ctx, network, addr)
		},
		// Loopback, against Caddy's own internal CA: nothing to verify.
		TLSClientConfig:     &tls.Config{InsecureSkipVerify: true},
		ForceAttemptHTTP2:   true,
		MaxConnsPerHost:     1,
		MaxIdleConnsPerHost: 1,
		DisableCompression:  true,
		TLSHandshakeTimeout: 5 * time.Second,
		IdleConnTimeout:     time.Minute,
	}
	tr.Protocols = new(http.Protocols)
	tr.Protocols.SetHTTP2(true) // HTTP/2 only: a server that does not offer h2 fails the run
	return tr
}

func runLoad(target, method, prefer string, body []byte, conns, streams int, warmup, duration time.Duration, expect int) (*loadResult, error) {
	var dials atomic.Int64
	clients := make([]*http.Client, conns)
	for i := range clients {
		tr := newH2Transport(&dials)
		defer tr.CloseIdleConnections()
		clients[i] = &http.Client{Transport: tr, Timeout: 30 * time.Second}
	}
	do := func(c *http.Client) (status int, proto, location string, err error) {
		var rd io.Reader
		if len(body) > 0 {
			rd = bytes.NewReader(body)
		}
		req, err := http.NewRequest(method, target, rd)
		if err != nil {
			return 0, "", "", err
		}
		if len(body) > 0 {
			req.Header.Set("Content-Type", "application/json")
		}
		if prefer != "" {
			req.Header.Set("Prefer", prefer)
		}
		resp, err := c.Do(req)
		if err != nil {
			return 0, "", "", err
		}
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode, resp.Proto, resp.Header.Get("Location"), err
	}
	// One request per client, one after another, opens exactly one connection each before the
	// loops start (concurrent first requests could each dial).
	primed := map[int]int{}
	for _, c := range clients {
		status, _, _, err := do(c)
		if err != nil {
			return nil, fmt.Errorf("first request: %w", err)
		}
		primed[status]++
	}

	start := time.Now()
	t0 := start.Add(warmup)
	t1 := t0.Add(duration)
	workers := make([]*workerStats, conns*streams)
	var wg sync.WaitGroup
	for i := range workers {
		ws := &workerStats{statuses: map[int]int{}, allStatuses: map[int]int{}, protos: map[string]int{},
			lat: make([]time.Duration, 0, 4096)}
		workers[i] = ws
		c := clients[i%conns]
		wg.Go(func() {
			for {
				begin := time.Now()
				if !begin.Before(t1) {
					return
				}
				status, proto, location, err := do(c)
				end := time.Now()
				inWindow := !end.Before(t0) && !end.After(t1)
				if err != nil {
					ws.allErrors++
					if ws.errSample == "" {
						ws.errSample = err.Error()
					}
					if inWindow {
						ws.errors++
					}
					if errors.Is(err, context.DeadlineExceeded) {
						continue
					}
					time.Sleep(10 * time.Millisecond) // a refused connection must not spin
					continue
				}
				ws.allStatuses[status]++
				ws.protos[proto]++
				if !inWindow {
					continue
				}
				ws.statuses[status]++
				if status == expect {
					ws.lat = append(ws.lat, end.Sub(begin))
					if ws.location == "" {
						ws.location = location
					}
				}
			}
		})
	}
	// The markers let the harness sample CPU use over the window itself.
	sleepUntil(t0)
	fmt.Fprintln(os.Stderr, markWindowStart)
	sleepUntil(t1)
	fmt.Fprintln(os.Stderr, markWindowEnd)
	wg.Wait() // every loop ends after its request in flight, which the client bounds to 30s

	res := &loadResult{URL: target, Method: method, Prefer: prefer, Conns: conns, Streams: streams, Expect: expect,
		WarmupSeconds: warmup.Seconds(), WindowSeconds: duration.Seconds(),
		Statuses: map[string]int{}, AllStatuses: map[string]int{}, Protos: map[string]int{}}
	for s, n := range primed {
		res.AllStatuses[strconv.Itoa(s)] += n
	}
	var lat []time.Duration
	for _, ws := range workers {
		lat = append(lat, ws.lat...)
		for s, n := range ws.statuses {
			res.Statuses[strconv.Itoa(s)] += n
		}
		for s, n := range ws.allStatuses {
			res.AllStatuses[strconv.Itoa(s)] += n
		}
		for p, n := range ws.protos {
			res.Protos[p] += n
		}
		res.Errors += ws.errors
		res.AllErrors += ws.allErrors
		if res.ErrorSample == "" {
			res.ErrorSample = ws.errSample
		}
		if res.Location == "" {
			res.Location = ws.location
		}
	}
	res.Dials = int(dials.Load())
	res.OK = len(lat)
	res.RPS = float64(res.OK) / duration.Seconds()
	slices.Sort(lat)
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	if len(lat) > 0 {
		res.P50 = ms(percentile(lat, 0.50))
		res.P90 = ms(percentile(lat, 0.90))
		res.P99 = ms(percentile(lat, 0.99))
		res.P999 = ms(percentile(lat, 0.999))
		res.Max = ms(lat[len(lat)-1])
		var sum time.Duration
		for _, d := range lat {
			sum += d
		}
		res.Mean = ms(sum / time.Duration(len(lat)))
	}
	return res, nil
}

// percentile is the nearest-rank percentile of sorted durations: the smallest value that at
// least a fraction q of all values do not exceed.
func percentile(sorted []time.Duration, q float64) time.Duration {
	rank := int(math.Ceil(q * float64(len(sorted))))
	rank = min(max(rank, 1), len(sorted))
	return sorted[rank-1]
}

func sleepUntil(t time.Time) {
	if d := time.Until(t); d > 0 {
		time.Sleep(d)
	}
}
