package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/caddy-progress/progress/tests/internal/fanout"
)

// The fan-out scenario (issue #6, scenario 3): -fan-shape (jobs × SSE subscribers per job ×
// reports per second per job; the 1000x10x1 is 10,000 subscribers and 10,000
// deliveries a second), latency from just before each callback is sent to the subscriber's
// parse of the event that carries it, over HTTP/2 and HTTP/3 (quic-go's client; Caddy's site
// serves h3), against the in-memory Go hub of tests/latency over HTTP/2 in the same run. The
// harness is tests/internal/fanout (the callback-to-subscriber harness of issue #4, shared);
// this scenario runs it with the Caddy built by this run and takes its output and figures.
// Targets: p50 < 1 ms, p99 < 2 ms over HTTP/2 and < 5 ms over HTTP/3, no event lost.

func (h *harness) runFanout() error {
	o := h.opts
	h.logf("\n# fanout: tests/internal/fanout, shape %s, protocols h2,h3, window %v after %v of warm-up", o.fanShape, o.fanWindow, o.fanWarmup)
	args, err := h.fanoutMain(o.fanShape, "caddy,hub", "h2,h3", o.fanRounds)
	if err != nil {
		return err
	}
	h.fanout = fanout.Summaries()
	h.fanoutArgs = args
	return nil
}

// fanoutMain runs tests/internal/fanout with this run's Caddy, the -fan-warmup and -fan-window
// flags and what is left of the quiet-wait budget, keeping its output in the raw output; it
// returns the arguments it ran with.
func (h *harness) fanoutMain(shapes, targets, protos string, rounds int) ([]string, error) {
	o := h.opts
	var out bytes.Buffer
	fanout.Out = io.MultiWriter(os.Stdout, &out)
	defer func() { fanout.Out = os.Stdout }()
	args := []string{"-shapes", shapes, "-targets", targets, "-protos", protos, "-caddy-bin", h.caddyBin,
		"-warmup", o.fanWarmup.String(), "-window", o.fanWindow.String(), "-rounds", strconv.Itoa(rounds),
		"-quiet-wait", max(h.quietLeft, 0).Truncate(time.Second).String()}
	code := fanout.Main(args)
	h.raw.WriteString("# fanout " + strings.Join(args, " ") + "\n")
	h.raw.Write(out.Bytes())
	if code != 0 {
		return nil, fmt.Errorf("fanout harness: exit status %d", code)
	}
	return args, nil
}

// fanoutTable is the fan-out scenario's table and verdicts (Markdown).
func (h *harness) fanoutTable() string {
	if len(h.fanout) == 0 {
		return ""
	}
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("| target | shape | deliveries measured / expected | p50 | p99 | p99.9 | errors | CPU per 1,000 deliveries/s |\n|---|---|--:|--:|--:|--:|--:|--:|\n")
	for _, s := range h.fanout {
		w("| %s | %s | %s / %s | %s | %s | %s | %d | %s%% of a CPU |\n", s.Target, s.Shape, commas(s.Delivered), commas(s.Expected),
			msStr(int64(s.P50)), msStr(int64(s.P99)), msStr(int64(s.P999)), s.Errors, trunc(s.CPUPer1000, 1))
	}
	w("\n")
	for _, s := range h.fanout {
		p99 := 2 * time.Millisecond
		switch {
		case strings.HasPrefix(s.Target, "hub"):
			continue
		case strings.HasSuffix(s.Target, "/h3"):
			p99 = 5 * time.Millisecond
		}
		verdict := "met"
		if s.P50 >= time.Millisecond || s.P99 >= p99 || s.Delivered < s.Expected || s.Errors > 0 || s.Expected == 0 {
			verdict = "MISSED"
		}
		w("Target %s %s: p50 < 1 ms, p99 < %v, no event lost: %s (p50 %s, p99 %s, %s of %s deliveries)\n\n", s.Target, s.Shape, p99, verdict,
			msStr(int64(s.P50)), msStr(int64(s.P99)), commas(s.Delivered), commas(s.Expected))
	}
	return b.String()
}
