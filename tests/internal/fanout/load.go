package fanout

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/caddy-progress/progress/tests/internal/samples"
	"github.com/quic-go/quic-go/http3"
	bolt "go.etcd.io/bbolt"
)

// shape is one load: jobs × watchers SSE clients, each job reporting rate times a second.
type shape struct {
	jobs     int
	watchers int
	rate     float64 // reports per job per second
}

func (s shape) String() string {
	return fmt.Sprintf("%dx%dx%s", s.jobs, s.watchers, strconv.FormatFloat(s.rate, 'f', -1, 64))
}

func (s shape) reportsPerSec() float64    { return float64(s.jobs) * s.rate }
func (s shape) deliveriesPerSec() float64 { return s.reportsPerSec() * float64(s.watchers) }

func parseShape(v string) (shape, error) {
	var s shape
	var rate string
	parts := bytes.Split([]byte(v), []byte("x"))
	if len(parts) != 3 {
		return s, fmt.Errorf("shape %q: want JOBSxWATCHERSxRATE, such as 1000x10x10", v)
	}
	var err1, err2, err3 error
	s.jobs, err1 = strconv.Atoi(string(parts[0]))
	s.watchers, err2 = strconv.Atoi(string(parts[1]))
	rate = string(parts[2])
	s.rate, err3 = strconv.ParseFloat(rate, 64)
	if err := errors.Join(err1, err2, err3); err != nil {
		return s, fmt.Errorf("shape %q: %w", v, err)
	}
	if s.jobs < 1 || s.jobs > 10000 || s.watchers < 1 || s.watchers > 100 || s.rate <= 0 || s.rate > 1000 || s.jobs*s.watchers > 50000 {
		return s, fmt.Errorf("shape %q: out of range (jobs 1..10000, watchers 1..100, rate (0,1000], at most 50,000 streams)", v)
	}
	return s, nil
}

// runOpts are the knobs of one measurement.
type runOpts struct {
	warmup         time.Duration
	window         time.Duration
	streamsPerConn int
	proto          string // h2 (default) or h3: the subscribers' protocol
	redisFsync     string // caddy-redis3: redis-server's appendfsync
	profilePath    string // a CPU profile of the target over the window, if the target can
	tracePath      string // an execution trace of the target, 3 s from 2 s into the window
	probeDir       string // where the fsync probe writes ("": no probe)
	harnessProfile string // a CPU profile of the harness itself over the window
	ours           map[int]string
}

// result is one measurement.
type result struct {
	target string
	shape  shape
	window time.Duration

	lat   []int64 // callback sent → event parsed by a subscriber, ns, sorted; t0 in the window
	ack   []int64 // callback sent → 204 read, ns, sorted; t0 in the window
	sent  int64   // callbacks sent in the window
	acked int64   // of those, answered 204
	late  int64   // reports sent more than one period after their slot (the job's previous callback was slow)
	// Failures, over the whole run.
	cbErrors   int64
	subErrors  int64
	unmatched  int64 // events whose key had no send time: would be a harness bug
	eventBytes int64 // bytes of data lines of all events parsed in the window
	events     int64 // events parsed in the window (matched or not)
	streams    int
	conns      int
	setup      time.Duration

	targetCPU  float64 // % of one CPU
	harnessCPU float64
	machine    machineUse
	others     []procUse
	fsync      []int64  // the fsync probe: write 4 KiB + fdatasync every 50 ms in the window, ns, sorted
	boltPut    []int64  // the bbolt probe: one db.Update putting 512 B every 50 ms in the window, ns, sorted
	bucketMax  []int64  // the largest latency of the reports sent in each 100 ms of the window
	gcs        []string // the target's gctrace lines in the window
	forks      int64    // processes created on the machine during the window (/proc/stat processes)
	runnable   float64  // mean of procs_running (/proc/stat) sampled every 100 ms over the window
	loadStart  string
	loadEnd    string
	firstErr   string
	// otlpExports are the span exports Caddy sent to the harness's OTLP sink (target caddy-on).
	otlpExports int64
	// cpuParts is the target's CPU by process, when it has several (caddy-redis3).
	cpuParts []procUse
}

// bucketWidth is the time resolution at which the harness looks for stalls.
const bucketWidth = 100 * time.Millisecond

// jobState is the harness's view of one job: when each report was sent.
type jobState struct {
	job
	sent  []atomic.Int64 // report k's send time, ns since the run's base; 0: not sent
	index int            // the job's place in the run
}

// eventsFor is the event stream watcher w of the job opens: with mirrors (several instances
// sharing a store), the job's watchers go round the instances, starting at one that moves with
// the job, so that every instance holds an even share of all the streams.
func (st *jobState) eventsFor(w int) string {
	n := len(st.Mirrors) + 1
	if n == 1 {
		return st.Events
	}
	if i := (st.index + w) % n; i > 0 {
		return st.Mirrors[i-1]
	}
	return st.Events
}

// measure runs one shape against one target.
func measure(ctx context.Context, tg target, sh shape, o runOpts) (*result, error) {
	res := &result{target: tg.name(), shape: sh, window: o.window, loadStart: loadavg()}
	setupStart := time.Now()
	jobs, err := tg.makeJobs(ctx, sh.jobs)
	if err != nil {
		return nil, fmt.Errorf("making %d jobs: %w", sh.jobs, err)
	}
	perJob := int((o.warmup+o.window).Seconds()*sh.rate) + 16
	states := make([]*jobState, len(jobs))
	for i, j := range jobs {
		states[i] = &jobState{job: j, sent: make([]atomic.Int64, perJob), index: i}
	}

	// Subscribers: jobs × watchers HTTP/2 (or HTTP/3) streams, streamsPerConn per connection:
	// one Transport per connection.
	nstreams := sh.jobs * sh.watchers
	nconns := (nstreams + o.streamsPerConn - 1) / o.streamsPerConn
	major := 2
	transports := make([]http.RoundTripper, nconns)
	for i := range transports {
		if o.proto == "h3" {
			major = 3
			transports[i] = &http3.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, DisableCompression: true}
		} else {
			transports[i] = h2Transport()
		}
	}
	defer func() {
		for _, tr := range transports {
			switch tr := tr.(type) {
			case *http3.Transport:
				tr.Close()
			case *http.Transport:
				tr.CloseIdleConnections()
			}
		}
	}()
	res.streams, res.conns = nstreams, nconns

	var base time.Time
	var baseSet atomic.Bool
	var winStart, winEnd int64 = int64(o.warmup), int64(o.warmup + o.window)
	subCtx, cancelSubs := context.WithCancel(ctx)
	defer cancelSubs()
	var ready sync.WaitGroup
	var subsDone sync.WaitGroup
	var firstErr atomic.Value
	noteErr := func(err error) {
		firstErr.CompareAndSwap(nil, err.Error())
	}
	lats := make([][]int64, nstreams)
	buckets := make([]atomic.Int64, int(o.window/bucketWidth)+1) // max latency per 100 ms of t0 in the window
	var events, eventBytes, unmatched, subErrors atomic.Int64
	sem := make(chan struct{}, 256) // streams being opened at once
	for s := range nstreams {
		st := states[s%sh.jobs]
		ready.Add(1)
		subsDone.Add(1)
		go func() {
			defer subsDone.Done()
			sem <- struct{}{}
			var once sync.Once
			isReady := func() { once.Do(func() { <-sem; ready.Done() }) }
			defer isReady()
			// Watcher w of job j goes on connection (j+w) mod nconns: the watchers of one job
			// sit on different connections, as different clients would.
			cl := &http.Client{Transport: transports[(s%sh.jobs+s/sh.jobs)%nconns]}
			req, _ := http.NewRequestWithContext(subCtx, http.MethodGet, st.eventsFor(s/sh.jobs), nil)
			req.Header.Set("Accept", "text/event-stream")
			resp, err := cl.Do(req)
			if err != nil {
				if subCtx.Err() == nil {
					subErrors.Add(1)
					noteErr(fmt.Errorf("subscribe: %w", err))
				}
				return
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK || resp.ProtoMajor != major {
				noteErr(fmt.Errorf("subscribe: %s over %s", resp.Status, resp.Proto))
				return
			}
			br := bufio.NewReaderSize(resp.Body, 4096)
			var mine []int64
			defer func() { lats[s] = mine }()
			key := int64(-1)
			dataLen := 0
			var long []byte
			for {
				line, err := br.ReadSlice('\n')
				if errors.Is(err, bufio.ErrBufferFull) {
					long = append(long[:0], line...)
					for errors.Is(err, bufio.ErrBufferFull) {
						line, err = br.ReadSlice('\n')
						long = append(long, line...)
					}
					line = long
				}
				if err != nil {
					if subCtx.Err() == nil && !errors.Is(err, io.EOF) {
						noteErr(fmt.Errorf("reading events: %w", err))
					}
					return
				}
				if len(line) == 1 { // the blank line that dispatches an event
					if dataLen > 0 {
						isReady()
					}
					if key > 0 && baseSet.Load() {
						t1 := int64(time.Since(base))
						if key < int64(len(st.sent)) {
							if t0 := st.sent[key].Load(); t0 == 0 {
								unmatched.Add(1)
							} else if t0 >= winStart && t0 < winEnd {
								mine = append(mine, t1-t0)
								bm := &buckets[(t0-winStart)/int64(bucketWidth)]
								for v := bm.Load(); t1-t0 > v && !bm.CompareAndSwap(v, t1-t0); v = bm.Load() {
								}
								events.Add(1)
								eventBytes.Add(int64(dataLen))
							}
						} else {
							unmatched.Add(1)
						}
					}
					key, dataLen = -1, 0
					continue
				}
				if data, ok := bytes.CutPrefix(line, []byte("data: ")); ok {
					dataLen = len(data) - 1
					key = messageKey(data)
				}
			}
		}()
	}
	waitc := make(chan struct{})
	go func() { ready.Wait(); close(waitc) }()
	select {
	case <-waitc:
	case <-time.After(3 * time.Minute):
		return nil, fmt.Errorf("the %d subscribers did not all get their first event within 3 minutes", nstreams)
	}
	if v := firstErr.Load(); v != nil {
		return nil, fmt.Errorf("subscribers: %s", v)
	}
	res.setup = time.Since(setupStart)

	// Reporters: one goroutine per job, the legacy app's loop: at its slot, send a report and
	// wait for the 204. Slots are spread evenly over the period across jobs. A report whose
	// slot passed while the previous one was in flight goes out at once (counted as late);
	// slots are not made up in a burst.
	cbTransport := &http.Transport{MaxIdleConns: 4096, MaxIdleConnsPerHost: 4096, DisableCompression: true}
	cbTransport.Protocols = new(http.Protocols)
	cbTransport.Protocols.SetHTTP1(true)
	defer cbTransport.CloseIdleConnections()
	cbClient := &http.Client{Transport: cbTransport, Timeout: 30 * time.Second}
	period := time.Duration(float64(time.Second) / sh.rate)
	acks := make([][]int64, len(states))
	var sent, acked, late, cbErrors atomic.Int64
	var reporters sync.WaitGroup
	base = time.Now()
	baseSet.Store(true)
	for i, st := range states {
		reporters.Add(1)
		go func() {
			defer reporters.Done()
			var mine []int64
			defer func() { acks[i] = mine }()
			next := time.Duration(int64(period) * int64(i) / int64(len(states)))
			body := make([]byte, 0, 64)
			for k := int64(1); k < int64(len(st.sent)); k++ {
				now := time.Since(base)
				if next >= time.Duration(winEnd) || ctx.Err() != nil {
					return
				}
				if next > now {
					time.Sleep(next - now)
				} else if now-next > period {
					late.Add(1)
				}
				body = append(body[:0], `{"percent":`...)
				body = strconv.AppendInt(body, k%100, 10)
				body = append(body, `,"message":"k`...)
				body = strconv.AppendInt(body, k, 10)
				body = append(body, `"}`...)
				req, _ := http.NewRequestWithContext(ctx, http.MethodPost, st.Callback, bytes.NewReader(body))
				req.Header.Set("Authorization", "Bearer "+st.Token)
				req.Header.Set("Content-Type", "application/json")
				t0 := int64(time.Since(base))
				st.sent[k].Store(t0)
				resp, err := cbClient.Do(req)
				inWin := t0 >= winStart && t0 < winEnd
				if inWin {
					sent.Add(1)
				}
				if err != nil {
					cbErrors.Add(1)
					noteErr(fmt.Errorf("callback: %w", err))
				} else {
					b, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					t2 := int64(time.Since(base))
					if resp.StatusCode != http.StatusNoContent {
						cbErrors.Add(1)
						noteErr(fmt.Errorf("callback: %s %s", resp.Status, b))
					} else if inWin {
						acked.Add(1)
						mine = append(mine, t2-t0)
					}
				}
				next += period
				if now := time.Since(base); next < now-period {
					next = now // do not burst to make up missed slots
				}
			}
		}()
	}

	// The window: CPU snapshots at its ends, optional profiles inside it.
	time.Sleep(time.Until(base.Add(o.warmup)))
	a := takeSnapshot()
	forks0 := forkCount()
	gcTarget, hasGC := tg.(interface{ gcLines() []string })
	gc0 := 0
	if hasGC {
		gc0 = len(gcTarget.gcLines())
	}
	profErr := make(chan error, 1)
	if o.profilePath != "" {
		secs := max(1, int((o.window-time.Second)/time.Second))
		go func() {
			pctx, cancel := context.WithTimeout(ctx, o.window+30*time.Second)
			defer cancel()
			profErr <- tg.profile(pctx, secs, o.profilePath)
		}()
	} else {
		profErr <- nil
	}
	traceErr := make(chan error, 1)
	if o.tracePath != "" {
		go func() {
			time.Sleep(2 * time.Second)
			pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			traceErr <- tg.trace(pctx, 3, o.tracePath)
		}()
	} else {
		traceErr <- nil
	}
	if o.harnessProfile != "" {
		if f, err := os.Create(o.harnessProfile); err == nil {
			if pprof.StartCPUProfile(f) == nil {
				defer f.Close()
				time.AfterFunc(o.window-time.Second, pprof.StopCPUProfile)
			} else {
				f.Close()
			}
		}
	}
	probe, boltProbe := make(chan []int64, 1), make(chan []int64, 1)
	go func() { probe <- fsyncProbe(o.probeDir, base.Add(o.warmup+o.window)) }()
	go func() { boltProbe <- boltUpdateProbe(o.probeDir, base.Add(o.warmup+o.window)) }()
	runq := make(chan float64, 1)
	go func() {
		var sum float64
		n := 0
		for time.Until(base.Add(o.warmup+o.window)) > 100*time.Millisecond {
			sum += float64(procsRunning())
			n++
			time.Sleep(100 * time.Millisecond)
		}
		runq <- sum / float64(max(n, 1))
	}()
	time.Sleep(time.Until(base.Add(o.warmup + o.window)))
	b := takeSnapshot()
	res.forks = forkCount() - forks0
	if hasGC {
		if lines := gcTarget.gcLines(); len(lines) >= gc0 {
			res.gcs = lines[gc0:]
		}
	}
	res.runnable = <-runq
	res.fsync, res.boltPut = <-probe, <-boltProbe
	slices.Sort(res.fsync)
	slices.Sort(res.boltPut)
	res.loadEnd = loadavg()
	mine, others := usage(a, b, o.ours)
	res.targetCPU, res.harnessCPU, res.machine, res.others = mine[tg.name()], mine["harness"], machineUsage(a, b), others
	if multi, ok := tg.(interface{ parts() map[int]string }); ok {
		// Several processes: the target's CPU is theirs together, labelled one by one in o.ours.
		for pid, label := range multi.parts() {
			res.targetCPU += mine[label]
			res.cpuParts = append(res.cpuParts, procUse{PID: pid, Comm: label, Pct: mine[label]})
		}
		slices.SortFunc(res.cpuParts, func(x, y procUse) int { return cmp.Compare(x.Comm, y.Comm) })
	}
	if tg.pid() == os.Getpid() { // in-process hub: not separable
		res.targetCPU = mine["harness"]
	}

	repDone := make(chan struct{})
	go func() { reporters.Wait(); close(repDone) }()
	select {
	case <-repDone:
	case <-time.After(40 * time.Second):
		return nil, errors.New("reporters did not finish within 40s of the window's end")
	}
	time.Sleep(2 * time.Second) // deliveries of the last reports
	cancelSubs()
	subsDone.Wait()
	if err := <-profErr; err != nil && !errors.Is(err, errNotSupported) {
		return nil, fmt.Errorf("profile: %w", err)
	}
	if err := <-traceErr; err != nil && !errors.Is(err, errNotSupported) {
		return nil, fmt.Errorf("trace: %w", err)
	}

	res.bucketMax = make([]int64, len(buckets))
	for i := range buckets {
		res.bucketMax[i] = buckets[i].Load()
	}
	for _, l := range lats {
		res.lat = append(res.lat, l...)
	}
	for _, l := range acks {
		res.ack = append(res.ack, l...)
	}
	slices.Sort(res.lat)
	slices.Sort(res.ack)
	res.sent, res.acked, res.late, res.cbErrors = sent.Load(), acked.Load(), late.Load(), cbErrors.Load()
	res.events, res.eventBytes, res.unmatched, res.subErrors = events.Load(), eventBytes.Load(), unmatched.Load(), subErrors.Load()
	if v := firstErr.Load(); v != nil {
		res.firstErr = v.(string)
	}
	return res, nil
}

var (
	messageKey = samples.MessageKey
	pct        = samples.Pct
)

// fsyncProbe writes 4 KiB and fdatasyncs a file in dir every 50 ms until end, and returns how
// long each took: what one durable write costs on this disk while the measurement runs (a
// bbolt commit has two). A probe adds 20 small writes a second to the disk's load.
func fsyncProbe(dir string, end time.Time) []int64 {
	if dir == "" {
		return nil
	}
	f, err := os.CreateTemp(dir, "fsync-probe-")
	if err != nil {
		return nil
	}
	defer os.Remove(f.Name())
	defer f.Close()
	buf := make([]byte, 4096)
	var out []int64
	for i := 0; time.Until(end) > 50*time.Millisecond; i++ {
		buf[0] = byte(i)
		t := time.Now()
		if _, err := f.WriteAt(buf, int64(i%16)*4096); err != nil {
			return out
		}
		if err := syscall.Fdatasync(int(f.Fd())); err != nil {
			return out
		}
		out = append(out, int64(time.Since(t)))
		time.Sleep(50 * time.Millisecond)
	}
	return out
}

// boltUpdateProbe is the durable floor of the store on this disk, measured meanwhile: one raw
// bbolt db.Update (a 512-byte Put, the hashmap freelist as the store uses, fsync on) every
// 50 ms until end, in a file of its own. Each commit costs what a lone report's commit would,
// without the store's encoding and without the queueing behind other reports.
func boltUpdateProbe(dir string, end time.Time) []int64 {
	if dir == "" {
		return nil
	}
	path := filepath.Join(dir, fmt.Sprintf("bolt-probe-%d.db", time.Now().UnixNano()))
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second, FreelistType: bolt.FreelistMapType})
	if err != nil {
		return nil
	}
	defer os.Remove(path)
	defer db.Close()
	val := make([]byte, 512)
	var out []int64
	for i := 0; time.Until(end) > 50*time.Millisecond; i++ {
		t := time.Now()
		err := db.Update(func(tx *bolt.Tx) error {
			b, err := tx.CreateBucketIfNotExists([]byte("probe"))
			if err != nil {
				return err
			}
			return b.Put([]byte(strconv.Itoa(i%1000)), val)
		})
		if err != nil {
			return out
		}
		out = append(out, int64(time.Since(t)))
		time.Sleep(50 * time.Millisecond)
	}
	return out
}
