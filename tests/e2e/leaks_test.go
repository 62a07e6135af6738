package e2e

import (
	"bufio"
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// Leak checks: what a Caddy holds once the clients are gone and the jobs have ended must come
// back to what it held at rest, whatever happened in between. A fault test takes a baseline
// with markLeakBaseline after a warm-up, does its damage, closes its clients, waits for its
// jobs to end and calls checkNoLeaks. RELIABILITY.md "Leaks" has the figures.
//
// Two things legitimately stay after a load and are counted apart, not in the tolerance:
//   - Caddy's keep-alive pool to the upstream. Each idle pooled connection is one socket and two
//     goroutines (net/http's persistConn readLoop and writeLoop). The e2e Caddyfile has two
//     reverse_proxy handlers that reach the upstream (one per site), each with its own
//     transport of at most 32 idle connections per host (Caddy's default), so the pool is
//     bounded by upstreamPoolMax. A response body the plugin forgot to close keeps its
//     connection busy instead, and the pool then outgrows the bound.
//   - Nothing else: client connections, event streams, long-polls, job goroutines, callback
//     writers and spooled files all end with their clients and jobs.

// upstreamPoolMax bounds the idle connections Caddy keeps to the upstream: 2 transports × 32.
const upstreamPoolMax = 2 * 32

// Tolerances over the baseline, for what Caddy starts and stops on its own (certificate
// maintenance, the store's sweeper, the runtime's own helpers): measured at rest they vary by a
// few goroutines and no file descriptor. A leak per job, stream or connection exceeds them by
// far in any test that runs more than a handful.
const (
	leakGoroutineSlack = 8
	leakFDSlack        = 2
)

// leakSample is what a Caddy process holds at one moment.
type leakSample struct {
	PID        int
	Goroutines int
	// PoolConns is Caddy's idle keep-alive connections to the upstream, by their goroutines
	// (persistConn.readLoop); their sockets are PoolFDs.
	PoolConns int
	FDs       int // open file descriptors, -1 where /proc is missing
	PoolFDs   int // of FDs, TCP connections to the upstream's address
	Sockets   int // of FDs, sockets of any kind
	// Stacks counts goroutines by their call stack, to name what grew.
	Stacks map[string]int
}

// Core is the sample less the upstream keep-alive pool: what must return to the baseline.
func (s leakSample) coreGoroutines() int { return s.Goroutines - 2*s.PoolConns }
func (s leakSample) coreFDs() int        { return s.FDs - s.PoolFDs }

func (s leakSample) String() string {
	fds := "fds n/a"
	if s.FDs >= 0 {
		fds = fmt.Sprintf("%d fds (%d sockets, %d to the upstream)", s.FDs, s.Sockets, s.PoolFDs)
	}
	return fmt.Sprintf("%d goroutines (%d pooled upstream connections), %s", s.Goroutines, s.PoolConns, fds)
}

var leakBaselines sync.Map // *caddyProc → leakSample

// markLeakBaseline records what c holds now as the state checkNoLeaks compares with. Call it
// after a warm-up (every protocol and route the test uses, once), with no client connected
// and no job running; it waits until two samples 200ms apart agree, so that goroutines of the
// warm-up that are still winding down are not counted in.
func markLeakBaseline(t *testing.T, c *caddyProc) leakSample {
	t.Helper()
	var s leakSample
	prev := -1
	for range 50 {
		s = c.leakSample(t)
		if s.coreGoroutines() == prev {
			break
		}
		prev = s.coreGoroutines()
		time.Sleep(200 * time.Millisecond)
	}
	leakBaselines.Store(c, s)
	return s
}

// checkNoLeaks waits, up to 15 seconds, until c's goroutines and file descriptors are back at
// the baseline of markLeakBaseline (within the slack above, the upstream keep-alive pool
// counted apart and bounded), and fails the test with what grew if they are not. Call it once
// the test's clients are closed and its jobs have ended. It returns the last sample: once
// within the slack, it goes on sampling for up to a second while the counts are still above
// the baseline, so that the figure shown is the settled one, not the connections Caddy is
// still closing. The baseline holds across restarts of c: a restarted Caddy runs the same
// configuration.
func checkNoLeaks(t *testing.T, c *caddyProc) leakSample {
	t.Helper()
	v, ok := leakBaselines.Load(c)
	if !ok {
		t.Fatal("checkNoLeaks without markLeakBaseline")
	}
	base := v.(leakSample)
	deadline := time.Now().Add(15 * time.Second)
	var settle time.Time
	for {
		s := c.leakSample(t)
		problems := leakProblems(base, s)
		if len(problems) == 0 {
			if settle.IsZero() {
				settle = time.Now().Add(time.Second)
			}
			atBase := s.coreGoroutines() <= base.coreGoroutines() && (s.FDs < 0 || s.coreFDs() <= base.coreFDs())
			if atBase || time.Now().After(settle) {
				return s
			}
			time.Sleep(100 * time.Millisecond)
			continue
		}
		if time.Now().After(deadline) {
			t.Errorf("caddy (pid %d) did not return to its baseline within 15s after its clients left and its jobs ended:\n\t%s\nbaseline: %v\nnow:      %v\ngoroutines that grew:\n%s",
				s.PID, strings.Join(problems, "\n\t"), base, s, stackGrowth(base, s))
			return s
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func leakProblems(base, s leakSample) []string {
	var out []string
	if g, b := s.coreGoroutines(), base.coreGoroutines(); g > b+leakGoroutineSlack {
		out = append(out, fmt.Sprintf("%d goroutines besides the upstream pool's, baseline %d (slack %d)", g, b, leakGoroutineSlack))
	}
	if s.PoolConns > upstreamPoolMax {
		out = append(out, fmt.Sprintf("%d connections to the upstream kept, at most %d can be idle: some are held by unclosed responses", s.PoolConns, upstreamPoolMax))
	}
	if s.FDs >= 0 && base.FDs >= 0 {
		if f, b := s.coreFDs(), base.coreFDs(); f > b+leakFDSlack {
			out = append(out, fmt.Sprintf("%d file descriptors besides the upstream pool's, baseline %d (slack %d)", f, b, leakFDSlack))
		}
	}
	return out
}

// stackGrowth lists the call stacks with more goroutines than in the baseline, most first.
func stackGrowth(base, s leakSample) string {
	type grown struct {
		stack string
		n     int
	}
	var gs []grown
	for k, n := range s.Stacks {
		if d := n - base.Stacks[k]; d > 0 {
			gs = append(gs, grown{k, d})
		}
	}
	slices.SortFunc(gs, func(a, b grown) int { return b.n - a.n })
	var b strings.Builder
	for i, g := range gs {
		if i == 10 {
			fmt.Fprintf(&b, "\t… and %d more stacks\n", len(gs)-i)
			break
		}
		frames := strings.Split(g.stack, " ← ")
		if len(frames) > 8 {
			frames = append(frames[:8], "…")
		}
		fmt.Fprintf(&b, "\t+%d  %s\n", g.n, strings.Join(frames, " ← "))
	}
	return b.String()
}

// leakSample takes one sample of c: goroutines from the admin endpoint's pprof profile (the
// debug=1 form, grouped by stack, so no dump is cut short), descriptors from /proc.
func (c *caddyProc) leakSample(t *testing.T) leakSample {
	t.Helper()
	s := leakSample{PID: c.cmd.Process.Pid, FDs: -1}
	total, stacks, err := c.goroutineProfile()
	if err != nil {
		t.Fatalf("caddy's goroutine profile: %v", err)
	}
	s.Goroutines, s.Stacks = total, stacks
	for k, n := range stacks {
		if strings.Contains(k, "net/http.(*persistConn).readLoop") {
			s.PoolConns += n
		}
	}
	if fds, sockets, pool, err := openFDs(s.PID, upstreamAddr); err == nil {
		s.FDs, s.Sockets, s.PoolFDs = fds, sockets, pool
	} else if !os.IsNotExist(err) {
		t.Fatalf("caddy's file descriptors: %v", err)
	}
	return s
}

// goroutineTotal is the number of goroutines in Caddy now, or why it could not be read.
func (c *caddyProc) goroutineTotal() (int, error) {
	n, _, err := c.goroutineProfile()
	return n, err
}

// goroutineProfile reads /debug/pprof/goroutine?debug=1: "goroutine profile: total N", then
// one block per distinct stack, "<count> @ <pcs>" followed by "#\t<pc>\t<func>+<off>\t<file>"
// lines. It returns the total and the count per stack, named by its functions.
func (c *caddyProc) goroutineProfile() (int, map[string]int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+c.admin+"/debug/pprof/goroutine?debug=1", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return 0, nil, fmt.Errorf("status %d: %s", resp.StatusCode, b)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	total := -1
	stacks := make(map[string]int)
	count := 0
	var funcs []string
	flush := func() {
		if count > 0 {
			stacks[strings.Join(funcs, " ← ")] += count
		}
		count, funcs = 0, nil
	}
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "goroutine profile: total "):
			total, err = strconv.Atoi(strings.TrimPrefix(line, "goroutine profile: total "))
			if err != nil {
				return 0, nil, fmt.Errorf("profile header %q", line)
			}
		case strings.HasPrefix(line, "#"):
			fields := strings.Fields(line)
			if len(fields) >= 3 {
				fn, _, _ := strings.Cut(fields[2], "+0x")
				funcs = append(funcs, fn)
			}
		case line == "":
			flush()
		default:
			if n, _, ok := strings.Cut(line, " @ "); ok {
				flush()
				count, _ = strconv.Atoi(n)
			}
		}
	}
	flush()
	if err := sc.Err(); err != nil {
		return 0, nil, err
	}
	if total < 0 {
		return 0, nil, fmt.Errorf("no goroutine profile header")
	}
	return total, stacks, nil
}

// openFDs counts the descriptors of process pid, the sockets among them, and the TCP
// connections among those whose remote end is remote (host:port), by matching each socket's
// inode in the process's /proc/<pid>/net/tcp tables.
func openFDs(pid int, remote string) (fds, sockets, toRemote int, err error) {
	dir := filepath.Join("/proc", strconv.Itoa(pid), "fd")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, 0, 0, err
	}
	inodes := make(map[string]bool)
	for _, e := range ents {
		link, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		fds++
		if ino, ok := strings.CutPrefix(link, "socket:["); ok {
			sockets++
			inodes[strings.TrimSuffix(ino, "]")] = true
		}
	}
	want, err := procNetAddr(remote)
	if err != nil {
		return fds, sockets, 0, err
	}
	for _, table := range []string{"tcp", "tcp6"} {
		f, err := os.Open(filepath.Join("/proc", strconv.Itoa(pid), "net", table))
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			// sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
			fields := strings.Fields(sc.Text())
			if len(fields) < 10 || !inodes[fields[9]] {
				continue
			}
			if strings.EqualFold(fields[2], want) || strings.HasSuffix(strings.ToUpper(fields[2]), "FFFF0000"+want) {
				toRemote++
			}
		}
		f.Close()
	}
	return fds, sockets, toRemote, nil
}

// procNetAddr writes an IPv4 host:port the way /proc/net/tcp does: the address as a
// little-endian hex word, a colon, the port in hex.
func procNetAddr(hostport string) (string, error) {
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		return "", err
	}
	ip := net.ParseIP(host).To4()
	p, err := strconv.Atoi(port)
	if ip == nil || err != nil {
		return "", fmt.Errorf("not an IPv4 host:port: %q", hostport)
	}
	le := []byte{ip[3], ip[2], ip[1], ip[0]}
	return strings.ToUpper(hex.EncodeToString(le)) + fmt.Sprintf(":%04X", p), nil
}

// checkTestGoroutines fails t if goroutines the test process started after this call outlive
// it: call it first in a test (it registers a cleanup that runs after all others, once the
// test's clients and servers are closed).
func checkTestGoroutines(t *testing.T) {
	t.Helper()
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() {
		// Idle keep-alive connections of the default client (the upstream's and Caddy admin
		// endpoint's answers) are a pool, not a leak.
		http.DefaultTransport.(*http.Transport).CloseIdleConnections()
		if err := goleak.Find(ignore); err != nil {
			t.Errorf("goroutines of the test process outlived the test: %v", err)
		}
	})
}
